"""FitNet (Romero et al., ICLR 2015) as mdistiller runs it: hint + regressor in one stage.

``loss = ce_weight * CE(s, y) + feat_weight * mean_k MSE(R_k(f_S), f_T,k) + kd_weight * T^2 KL(p || q)``:
f_S is the student's map at the hint boundary, f_T,k teacher k's map at the boundary of the same
spatial size (``hint`` indexes the boundaries they share, mdistiller's hint layer 2 by default),
R_k a regressor per teacher (conv3x3-BN-ReLU, mdistiller's ``ConvReg``), p the fused soft target.
The regressors are dropped at export: the student is the plain network.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from graftkd.config import ExperimentConfig, MethodConfig
from graftkd.methods.base import METHODS, StepContext
from graftkd.methods.features import FeatureMethod, conv_regressor, pick
from graftkd.teachers.targets import build_teacher_targets


class FitNetMethod(MethodConfig):
    """FitNet: the student's map at a hint boundary regressed onto each teacher's (mdistiller defaults)."""

    name: Literal["fitnet"] = "fitnet"
    hint: int = Field(2, description="index into the boundaries teacher and student share (equal spatial size; "
                                     "the stem's is 0 when both have one); negative counts from the last")
    feat_weight: float = Field(100.0, ge=0, description="weight of the hint MSE (mdistiller: 100)")
    ce_weight: float = Field(1.0, ge=0, description="weight of CE to the labels")
    kd_weight: float = Field(0.0, ge=0, description="weight of T^2 KL to the fused soft target (mdistiller: 0)")
    temperature: float = Field(4.0, gt=0, description="T of the KD term")


class FitNet(FeatureMethod):
    def __init__(self, cfg: ExperimentConfig, student: nn.Module, targets: Any, input_size: int, name: str) -> None:
        super().__init__(cfg, student, targets, input_size, name)
        m = cfg.method
        assert isinstance(m, FitNetMethod)
        self.m = m
        self.hints = [pick(p, m.hint, "method.hint", f"{v.label} and {self.S.label}") for p, v in zip(self.pairs, self.T)]
        self.regressors = nn.ModuleList(conv_regressor(self.S.channels[s], v.channels[t])
                                        for (t, s), v in zip(self.hints, self.T))

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"]
        maps, logits = self.S.intermediates(x)
        teachers = self.teacher_outputs(x)
        hint = torch.stack([F.mse_loss(r(maps[s]).float(), t_maps[t].float())
                            for r, (t, s), (t_maps, _) in zip(self.regressors, self.hints, teachers)]).mean()
        return self.feature_losses("hint", hint, logits, y, [z for _, z in teachers], self.m)


@METHODS.register("fitnet", config=FitNetMethod)
def build_fitnet(cfg: ExperimentConfig, data: Any, build_student: Any, run_dir: Any, device: torch.device,
                 dist: Any, **_: Any) -> FitNet:
    assert isinstance(cfg.method, FitNetMethod)
    targets = build_teacher_targets(cfg, data, run_dir, device, dist, cfg.method.temperature, False)
    return FitNet(cfg, build_student().to(device), targets, data.image_size, cfg.model.name)
