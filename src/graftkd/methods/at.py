"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017) as mdistiller runs it.

``a(f) = normalize(mean_c f^p)`` flattened per sample (p = 2); ``loss = ce_weight * CE(s, y) +
feat_weight * mean_k sum_b mean((a(f_S,b) - a(f_T,k,b))^2) + kd_weight * T^2 KL``, summed over the
boundaries b each teacher shares with the student (equal spatial size), without the first one
(mdistiller skips the stem) when ``skip_first``. Attention maps have no channels: no regressor,
any widths.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from graftkd.config import ExperimentConfig, MethodConfig
from graftkd.methods.base import METHODS, StepContext
from graftkd.methods.features import FeatureMethod
from graftkd.teachers.targets import build_teacher_targets


class ATMethod(MethodConfig):
    """Attention transfer at every shared boundary (mdistiller defaults)."""

    name: Literal["at"] = "at"
    p: float = Field(2.0, gt=0, description="exponent of the attention map mean_c |f|^p")
    feat_weight: float = Field(1000.0, ge=0, description="weight of the attention loss (mdistiller: 1000)")
    skip_first: bool = Field(True, description="leave out the first shared boundary (mdistiller: the stem)")
    ce_weight: float = Field(1.0, ge=0, description="weight of CE to the labels")
    kd_weight: float = Field(0.0, ge=0, description="weight of T^2 KL to the fused soft target")
    temperature: float = Field(4.0, gt=0, description="T of the KD term")


def attention(f: Tensor, p: float) -> Tensor:
    """mdistiller's ``at``: ``F.normalize(f.pow(p).mean(1).reshape(B, -1))``."""
    return F.normalize(f.float().pow(p).mean(1).reshape(f.shape[0], -1))


def at_loss(fs: Tensor, ft: Tensor, p: float) -> Tensor:
    return (attention(fs, p) - attention(ft, p)).pow(2).mean()


class AT(FeatureMethod):
    def __init__(self, cfg: ExperimentConfig, student: nn.Module, targets: Any, input_size: int, name: str) -> None:
        super().__init__(cfg, student, targets, input_size, name)
        m = cfg.method
        assert isinstance(m, ATMethod)
        self.m = m
        self.layers = [pairs[1:] if m.skip_first else pairs for pairs in self.pairs]

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"]
        maps, logits = self.S.intermediates(x)
        teachers = self.teacher_outputs(x)
        terms = [sum((at_loss(maps[s], t_maps[t], self.m.p) for t, s in layers), torch.zeros((), device=x.device))
                 for layers, (t_maps, _) in zip(self.layers, teachers)]
        att = torch.stack(terms).mean()
        return self.feature_losses("at", att, logits, y, [z for _, z in teachers], self.m)


@METHODS.register("at", config=ATMethod)
def build_at(cfg: ExperimentConfig, data: Any, build_student: Any, run_dir: Any, device: torch.device,
             dist: Any, **_: Any) -> AT:
    assert isinstance(cfg.method, ATMethod)
    targets = build_teacher_targets(cfg, data, run_dir, device, dist, cfg.method.temperature, False)
    return AT(cfg, build_student().to(device), targets, data.image_size, cfg.model.name)
