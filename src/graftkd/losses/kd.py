"""Hinton KD and deep mutual learning, on logits ``[B, C]``, computed in float32."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from graftkd.losses.divergences import kl_divergence
from graftkd.losses.standardize import soft_targets
from graftkd.losses.standardize import standardize as zscore


def kd_loss_from_probs(student_logits: Tensor, target_probs: Tensor, T: float, standardize: bool = False) -> Tensor:
    """``T^2 * mean_b KL(p || softmax(v/T))`` with given target probabilities p (one teacher at
    temperature T, or a fused multi-teacher distribution); ``v = Z(s)`` if ``standardize``."""
    s = zscore(student_logits) if standardize else student_logits.float()
    return T**2 * kl_divergence(target_probs, s, T).mean()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float, standardize: bool = False) -> Tensor:
    """Hinton KD ``T^2 * mean_b KL(softmax(t/T) || softmax(s/T))``; with ``standardize`` both
    logits go through ``Z()`` first (logit-standardisation KD)."""
    return kd_loss_from_probs(student_logits, soft_targets(teacher_logits, T, standardize), T, standardize)


def dml_loss(student_logits: Tensor, peer_logits: Sequence[Tensor], T: float = 1.0) -> Tensor:
    """Deep mutual learning term ``mean_k T^2 * mean_b KL(softmax(z_k/T) || softmax(s/T))`` over
    the peers, which are detached (treated as constants)."""
    if not peer_logits:
        raise ValueError("dml_loss needs at least one peer")
    return torch.stack([kd_loss(student_logits, z.detach(), T) for z in peer_logits]).mean()
