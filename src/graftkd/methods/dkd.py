"""Decoupled KD (methods.md I.1, II.4.2) to one teacher or a fused multi-teacher target.

``loss = ce_weight * CE(s, y) + min(epoch / warmup, 1) * mean_b (alpha TCKD + beta NCKD)``, epoch
counted from 1 as in mdistiller (with ``warmup_steps``: the phase's optimiser step from 1). The teacher side goes through the probability path: the target
``p = sum_k w_k softmax(Z?(z_k) / T)`` gives ``b_T = [p_y, 1 - p_y]`` and the non-target
distribution ``p`` renormalised without class y (for one teacher this equals mdistiller's
logit form exactly).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from graftkd.config import ExperimentConfig, MethodConfig, WarmupInSteps
from graftkd.losses.dkd import DKDLoss
from graftkd.methods.base import METHODS, UNLABELED, StepContext, labelled_acc, labelled_ce
from graftkd.methods.kd import TeacherStudent, agreement
from graftkd.teachers.targets import TeacherTargets, build_teacher_targets


class DKDMethod(MethodConfig, WarmupInSteps):
    """ce_weight * CE + min(epoch / warmup, 1) * (alpha TCKD + beta NCKD), epoch from 1 (mdistiller defaults)."""

    name: Literal["dkd"] = "dkd"
    temperature: float = Field(4.0, gt=0, description="T of the teachers' and the student's softmax")
    ce_weight: float = Field(1.0, ge=0, description="weight of CE to the labels")
    alpha: float = Field(1.0, ge=0, description="weight of target-class KD (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of non-target-class KD (NCKD); mdistiller uses 6 or 2 for some pairs")
    warmup_epochs: int = Field(20, ge=0, description="linear ramp of the DKD term over this many epochs (0: none)")
    warmup_steps: int | None = Field(None, ge=1, description="the ramp in optimiser steps instead (then "
                                                             "warmup_epochs must be 0; it is, unless given)")
    standardize: bool = Field(False, description="logit standardisation Z() of teacher and student logits before /T")


class DKD(TeacherStudent):
    def __init__(self, cfg: ExperimentConfig, model: nn.Module, targets: TeacherTargets) -> None:
        super().__init__(cfg, model, targets)
        m = cfg.method
        assert isinstance(m, DKDMethod)
        self.m = m
        self.dkd = DKDLoss(m.alpha, m.beta, m.temperature, m.warmup_steps or m.warmup_epochs, m.standardize)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = self.model(batch["image"])
        target = self.targets(batch)
        y = batch["label"]
        ce = labelled_ce(logits.float(), y)
        progress = ctx.phase_step + 1 if self.m.warmup_steps else ctx.epoch + 1  # the ramp's unit
        # an unlabelled image's target class (TCKD/NCKD split) is the fused teacher's top class
        dkd = self.dkd(logits, torch.where(y == UNLABELED, target.argmax(1), y), progress, teacher_probs=target)
        return {"loss": self.m.ce_weight * ce + dkd, "ce": ce, "dkd": dkd,
                "acc": labelled_acc(logits, y), "agreement": agreement(logits, target)}


@METHODS.register("dkd", config=DKDMethod)
def build_dkd(cfg: ExperimentConfig, data: Any, build_student: Any, run_dir: Any, device: torch.device, dist: Any,
              **_: Any) -> DKD:
    assert isinstance(cfg.method, DKDMethod)
    targets = build_teacher_targets(cfg, data, run_dir, device, dist, cfg.method.temperature, cfg.method.standardize)
    return DKD(cfg, build_student(), targets)
