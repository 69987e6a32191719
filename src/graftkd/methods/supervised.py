"""Supervised training: the degenerate method (one phase, one cross-entropy term)."""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from graftkd.config import ExperimentConfig, MethodConfig
from graftkd.methods.base import METHODS, Method, Phase, StepContext, single_phase


class SupervisedMethod(MethodConfig):
    name: Literal["supervised"] = "supervised"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class Supervised(Method):
    def __init__(self, cfg: ExperimentConfig, model: nn.Module) -> None:
        super().__init__()
        assert isinstance(cfg.method, SupervisedMethod)
        self.cfg = cfg
        self.model = model
        self.label_smoothing = cfg.method.label_smoothing

    def phases(self) -> list[Phase]:
        return single_phase(self.cfg, self.model.parameters())

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = self.model(batch["image"])
        ce = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce, "acc": (logits.argmax(1) == batch["label"]).float().mean()}

    def student(self) -> nn.Module:
        return self.model


@METHODS.register("supervised", config=SupervisedMethod)
def build_supervised(cfg: ExperimentConfig, data, build_student, **_: Any) -> Supervised:
    return Supervised(cfg, build_student())
