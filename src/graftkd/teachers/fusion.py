"""Multi-teacher soft-target fusion: per-sample teacher weights and the fused target distribution.

Pure functions on logits ``[K, B, C]`` (K teachers, B samples, C classes). Every strategy returns
weights ``[B, K]`` whose rows sum to one; ``fuse`` turns them into ``sum_k w_k softmax(z_k / T)``.

- ``mean``: w_k = 1/K.
- ``accuracy``: w = softmax(acc / tau), one weight per teacher from validation accuracy.
- ``entropy`` (EBKD): w_k proportional to 1 - H_k / sum_j H_j, H_k the entropy of softmax(z_k).
- ``confidence`` (CA-MKD): w_k = (1 - softmax_k(CE(z_k, y))) / (K - 1); needs the labels.
- ``best``: all weight on the teacher with the best validation accuracy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graftkd.losses import standardize as standardize_logits

STRATEGIES = ("mean", "accuracy", "entropy", "confidence", "best")
#: strategies whose weights are one vector per teacher, the same for every sample
GLOBAL_STRATEGIES = ("mean", "accuracy", "best")


def global_weights(strategy: str, val_acc: torch.Tensor, tau: float) -> torch.Tensor:
    """[K] weights of a global strategy (mean, accuracy, best) from validation accuracies [K]."""
    acc = val_acc.double()
    k = acc.numel()
    if strategy == "mean":
        w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    elif strategy == "accuracy":
        w = torch.softmax(acc / tau, dim=0)
    elif strategy == "best":
        w = F.one_hot(acc.argmax(), k).double()
    else:
        raise ValueError(f"'{strategy}' is not a global fusion strategy ({', '.join(GLOBAL_STRATEGIES)})")
    return w.float()


def entropy_weights(logits: torch.Tensor) -> torch.Tensor:
    """EBKD: [B, K] weights, w_k = (1 - H_k / sum_j H_j) / (K - 1), H from softmax(z_k) at T = 1."""
    k = logits.shape[0]
    if k == 1:
        return logits.new_ones(logits.shape[1], 1, dtype=torch.float32)
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1).T  # [B, K]
    w = 1.0 - h / h.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return w / w.sum(1, keepdim=True)  # = / (K - 1) unless every entropy is 0 (then uniform)


def confidence_weights(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CA-MKD: [B, K] weights, w_k = (1 - softmax_k(CE(z_k, y))) / (K - 1)."""
    k, b, c = logits.shape
    if k == 1:
        return logits.new_ones(b, 1, dtype=torch.float32)
    ce = F.cross_entropy(logits.float().reshape(k * b, c), labels.repeat(k), reduction="none").view(k, b).T
    return (1.0 - torch.softmax(ce, dim=1)) / (k - 1)


def weights(strategy: str, logits: torch.Tensor, labels: torch.Tensor | None = None,
            val_acc: torch.Tensor | None = None, tau: float = 1.0) -> torch.Tensor:
    """[B, K] fusion weights of ``strategy`` for teacher logits [K, B, C]; rows sum to one."""
    b = logits.shape[1]
    if strategy in GLOBAL_STRATEGIES:
        if val_acc is None:
            raise ValueError(f"fusion '{strategy}' needs the teachers' validation accuracies")
        return global_weights(strategy, val_acc, tau).to(logits.device).expand(b, -1)
    if strategy == "entropy":
        return entropy_weights(logits)
    if strategy == "confidence":
        if labels is None:
            raise ValueError("fusion 'confidence' needs the labels")
        return confidence_weights(logits, labels)
    raise ValueError(f"unknown fusion strategy '{strategy}' (known: {', '.join(STRATEGIES)})")


def fuse(logits: torch.Tensor, w: torch.Tensor, temperature: float, standardize: bool) -> torch.Tensor:
    """[B, C] fused target ``sum_k w[:, k] softmax(z_k / T)`` (logits standardised first if asked)."""
    z = logits.float()
    if standardize:
        z = standardize_logits(z)
    p = torch.softmax(z / temperature, dim=-1)  # [K, B, C]
    return torch.einsum("bk,kbc->bc", w.float(), p)


FUSED_LOGITS = ("normalized_mean", "mean", "log_probs")


def fuse_logits(logits: torch.Tensor, w: torch.Tensor, how: str, temperature: float = 1.0) -> torch.Tensor:
    """[B, C] one logit vector per sample from teacher logits [K, B, C] and weights [B, K].

    - ``normalized_mean``: ``sum_k w_k z_k / ||z_k||`` (each teacher's logits L2-normalised first, so a
      teacher's logit scale does not change its weight; matching its direction with the normalised-logit
      MSE has the gradient of ``sum_k w_k`` times each teacher's normalised-logit MSE, up to a per-sample
      scale ``1 / ||sum_k w_k z_k / ||z_k|| ||``).
    - ``mean``: ``sum_k w_k z_k``.
    - ``log_probs``: ``T log sum_k w_k softmax(z_k / T)``, centred over classes (a logit vector is only
      defined up to a constant; the centred one is the zero-mean representative), so that its softmax at
      T is the fused distribution.
    """
    z = logits.float()
    w = w.float()
    if how == "normalized_mean":
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.einsum("bk,kbc->bc", w, z)
    if how == "mean":
        return torch.einsum("bk,kbc->bc", w, z)
    if how == "log_probs":
        logp = torch.logsumexp(torch.log_softmax(z / temperature, dim=-1) + w.T.clamp_min(1e-30).log()[..., None], dim=0)
        v = temperature * logp
        return v - v.mean(dim=-1, keepdim=True)
    raise ValueError(f"unknown fused logits '{how}' (known: {', '.join(FUSED_LOGITS)})")
