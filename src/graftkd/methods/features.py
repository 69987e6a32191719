"""What the feature methods (FitNet, AT, MiR, FSKD) share: stage views of the student and of every
teacher (``graftkd.models.staged``: any network of the feature contract), the boundaries a
teacher and the student share (equal spatial size), the teachers' maps and logits in one forward,
and the fused KD target computed from those logits (no second teacher forward).

Not a method: it registers nothing.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from graftkd.config import ExperimentConfig
from graftkd.errors import UserError
from graftkd.methods.base import Method, Phase, labelled_acc, labelled_ce, single_phase
from graftkd.losses import kd_loss_from_probs
from graftkd.methods.graft import shared_boundaries
from graftkd.models import count_params
from graftkd.models.staged import StagedModel
from graftkd.teachers import fusion
from graftkd.teachers.targets import Score, TeacherTargets, teachers_report


def conv_regressor(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    """mdistiller's ``ConvReg`` for maps of equal size: conv (kernel 3, padding 1) -> BN -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def pick(pairs: list[tuple[int, int]], index: int, what: str, label: str) -> tuple[int, int]:
    """``pairs[index]`` or a UserError naming how many shared boundaries there are."""
    if not -len(pairs) <= index < len(pairs):
        raise UserError(f"{what} = {index}, but {label} share only {len(pairs)} boundaries (index from 0, or negative)")
    return pairs[index]


def chosen_teacher(index: int | None, targets: TeacherTargets) -> int:
    """``method.teacher`` checked against the teachers there are; None: the best on validation."""
    k = len(targets.ensemble)
    if index is not None and index >= k:
        raise UserError(f"method.teacher = {index} but there are only {k} teachers")
    return index if index is not None else int(targets.ensemble.val_acc.argmax())


class FeatureMethod(Method):
    """A student trained against frozen teachers' features (and optionally their fused soft target)."""

    def __init__(self, cfg: ExperimentConfig, student: nn.Module, targets: TeacherTargets, input_size: int,
                 student_name: str) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = student
        self.targets = targets
        self.frozen = [targets]
        self.S = StagedModel(student, f"student ({student_name})")
        teachers = targets.ensemble.teachers
        self.T = [StagedModel(t.model, f"teacher {i} ({t.name})") for i, t in enumerate(teachers)]
        s_shapes = self.S.boundary_shapes(input_size)
        self.pairs = [shared_boundaries(v.boundary_shapes(input_size), s_shapes) for v in self.T]

    def teacher_outputs(self, x: Tensor) -> list[tuple[list[Tensor], Tensor]]:
        """Every teacher's boundary maps and logits (frozen, no gradient)."""
        with torch.no_grad():
            return [v.intermediates(t.renormalised(x)) for v, t in zip(self.T, self.targets.ensemble.teachers)]

    def fused_target(self, logits: list[Tensor], y: Tensor, temperature: float) -> Tensor:
        """``sum_k w_k softmax(z_k / T)`` from logits already computed (the ensemble's fusion rule)."""
        z = torch.stack([t.float() for t in logits])
        return fusion.fuse(z, self.targets.ensemble.weights(z, y), temperature, False)

    def feature_losses(self, name: str, feature: Tensor, logits: Tensor, y: Tensor, teacher_logits: list[Tensor],
                       opts: Any) -> dict[str, Tensor]:
        """The step's named terms: ``ce_weight * CE + feat_weight * feature`` (logged as ``name``), plus
        ``kd_weight * KD`` to the fused target of ``teacher_logits`` when kd_weight > 0. CE and accuracy
        use the labelled images only; the feature and KD terms every image (``data.unlabeled``)."""
        ce = labelled_ce(logits.float(), y)
        return self.with_kd({name: feature, "ce": ce}, opts.ce_weight * ce + opts.feat_weight * feature, logits, y,
                            opts, lambda: self.fused_target(teacher_logits, y, opts.temperature))

    def with_kd(self, out: dict[str, Tensor], loss: Tensor, logits: Tensor, y: Tensor, opts: Any,
                target: Callable[[], Tensor]) -> dict[str, Tensor]:
        """``out`` with ``kd`` (``T^2 KL`` to the soft target ``target()``, computed only when
        ``opts.kd_weight > 0``), ``loss`` (``loss + kd_weight * kd``) and ``acc`` (labelled images):
        the tail of every feature method's step."""
        if opts.kd_weight > 0:
            out["kd"] = kd_loss_from_probs(logits.float(), target(), opts.temperature)
            loss = loss + opts.kd_weight * out["kd"]
        out["loss"] = loss
        out["acc"] = labelled_acc(logits, y)
        return out

    def phases(self) -> list[Phase]:
        return single_phase(self.cfg, [p for p in self.parameters() if p.requires_grad])

    def uses_unlabeled(self) -> bool:
        return True  # the feature term (and the optional KD term) needs no label

    def eval_logits(self, images: Tensor) -> Tensor:
        return self.model(images)

    def student(self) -> nn.Module:
        return self.model

    def final_metrics(self, score: Score) -> dict[str, Any]:
        report = teachers_report(self.targets.ensemble, score)
        report["params"] = {"student": count_params(self.model),
                            "teachers": [t["params"] for t in report["teachers"]]}
        return report

