"""Losses on logits ``[B, C]``, computed in float32: functions (and ``DKDLoss``, which keeps its warm-up)."""
from graftkd.losses.divergences import (
    LOSSES,
    Divergence,
    adaptive_alpha_divergence,
    alpha_beta_divergence,
    alpha_divergence,
    divergence,
    kl_divergence,
)
from graftkd.losses.dkd import DKDLoss, dkd_loss, dkd_parts
from graftkd.losses.kd import dml_loss, kd_loss, kd_loss_from_probs
from graftkd.losses.netgraft import normalized_logit_mse
from graftkd.losses.standardize import soft_targets, standardize

__all__ = [
    "LOSSES",
    "DKDLoss",
    "Divergence",
    "adaptive_alpha_divergence",
    "alpha_beta_divergence",
    "alpha_divergence",
    "divergence",
    "dkd_loss",
    "dkd_parts",
    "dml_loss",
    "kd_loss",
    "kd_loss_from_probs",
    "kl_divergence",
    "normalized_logit_mse",
    "soft_targets",
    "standardize",
]
