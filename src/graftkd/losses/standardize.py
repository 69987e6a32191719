"""Logit standardisation (Sun et al., CVPR 2024, `logit-standardization-KD`)."""
from __future__ import annotations

import torch
from torch import Tensor


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """``Z(v) = (v - mean(v)) / (std(v) + eps)`` per sample over classes; std is unbiased
    (``torch.std``), as in the official code. Computed in float32."""
    v = logits.float()
    return (v - v.mean(dim=-1, keepdim=True)) / (v.std(dim=-1, keepdim=True) + eps)


def soft_targets(logits: Tensor, T: float = 1.0, standardize_logits: bool = False) -> Tensor:
    """Target probabilities ``softmax(v / T)`` with ``v = Z(logits)`` if ``standardize_logits``."""
    v = standardize(logits) if standardize_logits else logits.float()
    return torch.softmax(v / T, dim=-1)
