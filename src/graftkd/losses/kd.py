"""Cross-entropy, Hinton KD and deep mutual learning, on logits ``[B, C]``, computed in float32."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graftkd.losses.divergences import kl_divergence
from graftkd.losses.standardize import soft_targets
from graftkd.losses.standardize import standardize as zscore


class CrossEntropy(nn.Module):
    """``CE(s, y)`` with optional label smoothing; y = class indices ``[B]`` (or probabilities)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: Tensor, target: Tensor) -> Tensor:
        target = target if target.dtype == torch.long else target.float()
        return F.cross_entropy(student_logits.float(), target, label_smoothing=self.label_smoothing)


def kd_loss_from_probs(student_logits: Tensor, target_probs: Tensor, T: float, standardize: bool = False) -> Tensor:
    """``T^2 * mean_b KL(p || softmax(v/T))`` with given target probabilities p (one teacher at
    temperature T, or a fused multi-teacher distribution); ``v = Z(s)`` if ``standardize``."""
    s = zscore(student_logits) if standardize else student_logits.float()
    return T**2 * kl_divergence(target_probs, s, T).mean()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float, standardize: bool = False) -> Tensor:
    """Hinton KD ``T^2 * mean_b KL(softmax(t/T) || softmax(s/T))``; with ``standardize`` both
    logits go through ``Z()`` first (logit-standardisation KD)."""
    return kd_loss_from_probs(student_logits, soft_targets(teacher_logits, T, standardize), T, standardize)


class KDLoss(nn.Module):
    """Hinton KD (mdistiller default T = 4); give teacher logits, or target probabilities via
    ``target_probs=`` (then ``standardize`` only applies to the student)."""

    def __init__(self, T: float = 4.0, standardize: bool = False) -> None:
        super().__init__()
        self.T, self.standardize = T, standardize

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor | None = None, *, target_probs: Tensor | None = None
    ) -> Tensor:
        if (teacher_logits is None) == (target_probs is None):
            raise ValueError("KDLoss: pass exactly one of teacher_logits, target_probs")
        if teacher_logits is not None:
            return kd_loss(student_logits, teacher_logits, self.T, self.standardize)
        return kd_loss_from_probs(student_logits, target_probs, self.T, self.standardize)  # type: ignore[arg-type]


def dml_loss(student_logits: Tensor, peer_logits: Sequence[Tensor], T: float = 1.0) -> Tensor:
    """Deep mutual learning term ``mean_k T^2 * mean_b KL(softmax(z_k/T) || softmax(s/T))`` over
    the peers, which are detached (treated as constants)."""
    if not peer_logits:
        raise ValueError("dml_loss needs at least one peer")
    return torch.stack([kd_loss(student_logits, z.detach(), T) for z in peer_logits]).mean()


class DMLLoss(nn.Module):
    """Module form of ``dml_loss`` (DML uses T = 1)."""

    def __init__(self, T: float = 1.0) -> None:
        super().__init__()
        self.T = T

    def forward(self, student_logits: Tensor, peer_logits: Sequence[Tensor]) -> Tensor:
        return dml_loss(student_logits, peer_logits, self.T)
