"""Hinton KD to one teacher or to a fused multi-teacher target (methods.md I.1, I.2, II.4.1).

``loss = ce_weight * CE(s, y) + kd_weight * mean_b T^2 D(p || softmax(v / T))`` with p the
teacher's softmax (one teacher) or ``sum_k w_k softmax(z_k / T)`` (several, ``fusion``),
``v = Z(s)`` and teacher logits standardised too when ``standardize``, and D the configured
divergence (``kl``, ``alpha``, ``alpha_beta``). The target comes from the live frozen ensemble or
from the soft-target cache (``teacher_cache.enabled``).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from graftkd.config import DivergenceConfig, ExperimentConfig, MethodConfig
from graftkd.losses.divergences import divergence, divergence_spec
from graftkd.methods.base import METHODS, Method, Phase, StepContext, labelled_acc, labelled_ce, single_phase
from graftkd.models import count_params
from graftkd.teachers.targets import Score, TeacherTargets, build_teacher_targets, teachers_report


class KDMethod(MethodConfig):
    """ce_weight * CE + kd_weight * T^2 D(target || softmax(s/T)); target = one teacher's softmax or the
    fused multi-teacher distribution (mdistiller defaults)."""

    name: Literal["kd"] = "kd"
    temperature: float = Field(4.0, gt=0, description="T of the teachers' and the student's softmax")
    ce_weight: float = Field(0.1, ge=0, description="weight of CE to the labels")
    kd_weight: float = Field(0.9, ge=0, description="weight of the T^2-scaled divergence to the target")
    standardize: bool = Field(False, description="logit standardisation Z() of teacher and student logits before /T")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the CE term")
    divergence: DivergenceConfig = Field(DivergenceConfig(), description="kl | alpha | alpha_beta")


def agreement(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of the batch where the student's argmax equals the target's argmax."""
    return (student_logits.argmax(1) == target.argmax(1)).float().mean()


class TeacherStudent(Method):
    """A student trained against frozen teachers' targets: the common part of KD and DKD."""

    def __init__(self, cfg: ExperimentConfig, model: nn.Module, targets: TeacherTargets) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.targets = targets
        self.frozen = [targets]

    def phases(self) -> list[Phase]:
        return single_phase(self.cfg, self.model.parameters())

    def student(self) -> nn.Module:
        return self.model

    def uses_unlabeled(self) -> bool:
        return True

    def final_metrics(self, score: Score) -> dict[str, Any]:
        report = teachers_report(self.targets.ensemble, score)
        report["params"] = {"student": count_params(self.model),
                            "teachers": [t["params"] for t in report["teachers"]]}
        return report


class KD(TeacherStudent):
    def __init__(self, cfg: ExperimentConfig, model: nn.Module, targets: TeacherTargets) -> None:
        super().__init__(cfg, model, targets)
        m = cfg.method
        assert isinstance(m, KDMethod)
        self.m = m
        self.div_kind, self.div_params = divergence_spec(m.divergence)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        m = self.m
        logits = self.model(batch["image"])
        target = self.targets(batch)
        ce = labelled_ce(logits.float(), batch["label"], label_smoothing=m.label_smoothing)
        kd = divergence(self.div_kind, target, logits, m.temperature, standardize=m.standardize,
                        **self.div_params).mean()  # every image, labelled or not
        return {"loss": m.ce_weight * ce + m.kd_weight * kd, "ce": ce, "kd": kd,
                "acc": labelled_acc(logits, batch["label"]), "agreement": agreement(logits, target)}


@METHODS.register("kd", config=KDMethod)
def build_kd(cfg: ExperimentConfig, data: Any, build_student: Any, run_dir: Any, device: torch.device, dist: Any,
             **_: Any) -> KD:
    assert isinstance(cfg.method, KDMethod)
    targets = build_teacher_targets(cfg, data, run_dir, device, dist, cfg.method.temperature, cfg.method.standardize)
    return KD(cfg, build_student(), targets)
