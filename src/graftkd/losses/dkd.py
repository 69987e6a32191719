"""Decoupled KD (Zhao et al., CVPR 2022) as in mdistiller ``distillers/DKD.py``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graftkd.losses.standardize import standardize as zscore

_MASK = 1000.0  # mdistiller's trick: softmax(z/T - 1000 * onehot) = distribution over non-target classes


def _kl(p: Tensor, log_q: Tensor) -> Tensor:
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


def dkd_parts(
    student_logits: Tensor,
    target: Tensor,
    T: float,
    *,
    teacher_logits: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    standardize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-sample ``(TCKD, NCKD)``, both scaled by T^2.

    ``TCKD = T^2 KL(b_T || b_S)`` with ``b = [p_t, 1 - p_t]``; ``NCKD = T^2 KL(p^_T || p^_S)`` with
    ``p^`` the distribution over non-target classes, ``softmax(z/T - 1000 * onehot)``.
    Teacher side from logits (``Z()`` applied if ``standardize``) or, for fused multi-teacher
    targets, from probabilities p already at temperature T: ``b_T = [p_t, 1 - p_t]`` and ``p^_T``
    = p renormalised over the non-target classes. ``standardize`` always applies to the student.
    """
    if (teacher_logits is None) == (teacher_probs is None):
        raise ValueError("dkd: pass exactly one of teacher_logits, teacher_probs")
    s = zscore(student_logits) if standardize else student_logits.float()
    gt = F.one_hot(target, s.shape[-1]).bool()
    log_q = torch.log_softmax(s / T, dim=-1)
    log_b_s = torch.stack(
        [log_q.masked_fill(~gt, -torch.inf).logsumexp(-1), log_q.masked_fill(gt, -torch.inf).logsumexp(-1)], -1
    )
    log_q_hat = torch.log_softmax(s / T - _MASK * gt, dim=-1)
    if teacher_logits is not None:
        t = zscore(teacher_logits) if standardize else teacher_logits.float()
        p = torch.softmax(t / T, dim=-1)
        p_hat = torch.softmax(t / T - _MASK * gt, dim=-1)
    else:
        p = teacher_probs.float()  # type: ignore[union-attr]
        other = p.masked_fill(gt, 0.0)
        p_hat = other / other.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    b_t = torch.stack([(p * gt).sum(-1), p.masked_fill(gt, 0.0).sum(-1)], -1)
    return T**2 * _kl(b_t, log_b_s), T**2 * _kl(p_hat, log_q_hat)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
    standardize: bool = False,
) -> Tensor:
    """``mean_b (alpha * TCKD + beta * NCKD)`` (mdistiller: sum / batch size), no warm-up."""
    tckd, nckd = dkd_parts(student_logits, target, T, teacher_logits=teacher_logits, standardize=standardize)
    return (alpha * tckd + beta * nckd).mean()


class DKDLoss(nn.Module):
    """``min(epoch / warmup, 1) * mean_b (alpha TCKD + beta NCKD)``; mdistiller defaults
    alpha 1, beta 8, T 4, warm-up 20 epochs (``epoch`` as the trainer counts it, may be fractional;
    warmup <= 0 disables the ramp). Teacher as logits, or probabilities via ``teacher_probs=``."""

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: float = 20.0, standardize: bool = False
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.T, self.warmup, self.standardize = alpha, beta, T, warmup, standardize

    def forward(
        self,
        student_logits: Tensor,
        target: Tensor,
        epoch: float,
        *,
        teacher_logits: Tensor | None = None,
        teacher_probs: Tensor | None = None,
    ) -> Tensor:
        tckd, nckd = dkd_parts(
            student_logits, target, self.T,
            teacher_logits=teacher_logits, teacher_probs=teacher_probs, standardize=self.standardize,
        )
        ramp = min(epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0
        return ramp * (self.alpha * tckd + self.beta * nckd).mean()
