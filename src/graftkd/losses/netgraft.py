"""NetGraft's logit loss (``norm_loss=True`` in the official code)."""
from __future__ import annotations

from torch import Tensor


def normalized_logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``sum_b || s_b/||s_b|| - t_b/||t_b|| ||^2`` (MSE with reduction 'sum', as NetGraft);
    norms are clamped at 1e-12 so an all-zero row gives 0 instead of NaN."""
    s, t = student_logits.float(), teacher_logits.float()
    s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (s - t).square().sum()
