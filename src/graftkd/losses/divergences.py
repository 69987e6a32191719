"""Distribution-matching divergences between a target distribution p and a student q = softmax(s/T).

Every registered divergence has the signature ``fn(target_probs [B,C], student_logits [B,C], T,
**params) -> [B]`` and returns the raw per-sample divergence D(p || q) (no T^2). ``divergence()``
multiplies by T^2, the KD convention that keeps gradient magnitudes independent of T.
Everything is computed in float32 (inputs are cast with ``.float()``), also under autocast.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from graftkd.errors import UserError
from graftkd.losses.standardize import standardize as zscore
from graftkd.registry import Registry

DivergenceFn = Callable[..., Tensor]
LOSSES: Registry[DivergenceFn] = Registry("divergence")


def _log_probs(p: Tensor) -> tuple[Tensor, Tensor]:
    """(log p with zeros replaced by 0, mask p > 0); safe for autograd."""
    p = p.float()
    pos = p > 0
    return torch.log(torch.where(pos, p, torch.ones_like(p))), pos


def _phi(x: Tensor, h: float) -> Tensor:
    """``expm1(h x) / h``, continuous at h = 0 where it is ``x``; for |h| < 1e-8 the Taylor form
    ``x (1 + h x / 2)`` (h would underflow in float32)."""
    return x * (1 + h * x / 2) if abs(h) < 1e-8 else torch.expm1(h * x) / h


@LOSSES.register("kl")
def kl_divergence(target_probs: Tensor, student_logits: Tensor, T: float = 1.0) -> Tensor:
    """``KL(p || q) = sum_i p_i (log p_i - log q_i)`` per sample (0 log 0 = 0)."""
    p = target_probs.float()
    log_q = torch.log_softmax(student_logits.float() / T, dim=-1)
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


def _alphanet_grad(value: Tensor, log_q: Tensor, coef: Tensor) -> Tensor:
    """``value`` in the forward pass, with the gradient of AlphaNet's surrogate
    ``-sum_i stopgrad(c_i) log q_i`` (``c_i = q_i rho_i``, computed without autograd). No gradient
    reaches the target distribution."""
    surrogate = -(coef.detach() * log_q).sum(-1)
    return value.detach() + (surrogate - surrogate.detach())


@LOSSES.register("alpha")
def alpha_divergence(
    target_probs: Tensor, student_logits: Tensor, T: float = 1.0, alpha: float = 1.0, iw_clip: float = 1e3
) -> Tensor:
    """AlphaNet alpha-divergence ``D_a(p||q) = 1/(a(a-1)) sum_i q_i [(p_i/q_i)^a - 1]`` per sample.

    **Value** (logged, and compared by the adaptive variant): ``sum_i q_i f_a(r_i)`` with ``r = p/q``
    and the generator ``f_a(r) = (r^a - 1 - a(r - 1)) / (a(a-1)) >= 0`` (equal to the formula above
    since sum q (r - 1) = 0), written with expm1 so that a -> 1 gives ``KL(p||q)`` and a -> 0 gives
    ``KL(q||p)`` continuously, without cancellation. The importance weight ``(p/q)^a`` is clipped at
    ``iw_clip`` for a not in {0, 1}; a = 1 is the exact ``KL(p||q)`` and a = 0 the exact ``KL(q||p)``.

    **Gradient** (AlphaNet's, Wang et al. 2021): that of the surrogate
    ``-sum_i stopgrad(q_i rho_i) log q_i`` with ``rho_i = ((p_i/q_i)^a clipped at iw_clip - 1) / a``
    (a != 0, 1), ``rho_i = log min(p_i/q_i, iw_clip)`` (a = 0) and ``rho_i = p_i/q_i - 1`` (a = 1,
    unclipped: the KL gradient ``q - p``); rho is AlphaNet's up to a constant, which has no gradient.
    Unclipped this is the exact gradient of ``D_a``; clipped, the weight stays positive, so the
    student is still pulled towards the target's large classes (differentiating the clipped value
    instead flips the sign on a clipped class). No gradient reaches ``target_probs``.
    """
    a = float(alpha)
    log_q = torch.log_softmax(student_logits.float() / T, dim=-1)
    q = log_q.detach().exp()
    log_p, pos = _log_probs(target_probs)
    with torch.no_grad():
        log_r = torch.where(pos, log_p - log_q, torch.full_like(log_q, -math.inf))
        x = log_r
        if a > 0 and a != 1:
            x = x.clamp(max=math.log(iw_clip) / a)
        elif a < 0:
            x = x.clamp(min=math.log(iw_clip) / a)
        finite = torch.isfinite(x)
        x = torch.where(finite, x, torch.zeros_like(x))
        qr = (log_q + x).exp()  # q * r (= p where unclipped), without overflow of exp(x)
        if a >= 0.5:
            term = (qr * (_phi(x, a - 1) - 1) + q) / a
        else:
            term = (q * _phi(x, a) - qr + q) / (a - 1)
        # p_i = 0 without clipping: q_i f_a(0) = q_i / a for a > 0, else +inf
        zero = q / a if a > 0 else torch.full_like(q, math.inf)
        value = torch.where(finite, term, zero).sum(-1)
        if a == 1:
            coef = target_probs.float() - q
        elif a == 0:  # log r clipped above at log(iw_clip), and finite where p = 0
            coef = q * log_r.clamp(min=math.log(torch.finfo(torch.float32).tiny), max=math.log(iw_clip))
        else:  # where p = 0 and a > 0: (0 - 1) / a (finite in float32); a < 0 was clipped to a finite weight
            big = torch.finfo(torch.float32).max
            at_zero = min(max(-1.0 / a, -big), big)
            coef = q * torch.where(finite, _phi(x, a), torch.full_like(x, at_zero))
    return _alphanet_grad(value, log_q, coef)


@LOSSES.register("adaptive_alpha")
def adaptive_alpha_divergence(
    target_probs: Tensor,
    student_logits: Tensor,
    T: float = 1.0,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    iw_clip: float = 5.0,
) -> Tensor:
    """AlphaNet adaptive loss: per sample the larger of ``D_{alpha_min}`` and ``D_{alpha_max}``
    (``alpha_max`` on ties, as AlphaNet; defaults from AlphaNet's configs), with that branch's
    AlphaNet gradient (see ``alpha_divergence``)."""
    lo = alpha_divergence(target_probs, student_logits, T, alpha_min, iw_clip)
    hi = alpha_divergence(target_probs, student_logits, T, alpha_max, iw_clip)
    return torch.where(lo > hi, lo, hi)


@LOSSES.register("alpha_beta")
def alpha_beta_divergence(
    target_probs: Tensor, student_logits: Tensor, T: float = 1.0, alpha: float = 1.0, beta: float = 0.0
) -> Tensor:
    """ABKD alpha-beta divergence per sample, p = target, q = softmax(s/T):
    ``-(1/(a b)) sum_i [p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)]``.

    Evaluated with ``d = log q - log p`` as ``(1/(a+b)) sum_i [p^a q^b phi(d, a) - p^(a+b) phi(d, b)]``,
    ``phi(d, h) = expm1(h d)/h`` (= d at h = 0), which covers a = 0 or b = 0 exactly
    ((1, 0) = KL(p||q), (0, 1) = KL(q||p)); a + b = 0 uses Cichocki's limit
    ``(expm1(-a d) + a d) / a^2`` (a = b = 0: ``d^2 / 2``). A class with p = 0 contributes
    ``q^(a+b) / (a (a+b))`` when a > 0 and a + b > 0, else +inf.
    """
    a, b = float(alpha), float(beta)
    lam = a + b
    log_q = torch.log_softmax(student_logits.float() / T, dim=-1)
    u, pos = _log_probs(target_probs)
    d = log_q - u
    if lam == 0:
        g = d.square() / 2 if a == 0 else (torch.expm1(-a * d) + a * d) / a**2
    else:
        g = ((a * u + b * log_q).exp() * _phi(d, a) - (lam * u).exp() * _phi(d, b)) / lam
    g0 = (lam * log_q).exp() / (a * lam) if a > 0 and lam > 0 else torch.full_like(g, math.inf)
    return torch.where(pos, g, g0).sum(-1)


def divergence(
    kind: str,
    target_probs: Tensor,
    student_logits: Tensor,
    T: float = 1.0,
    *,
    standardize: bool = False,
    **params: Any,
) -> Tensor:
    """Per-sample ``T^2 * D_kind(p || softmax(v / T))``, ``v = Z(s)`` if ``standardize`` (the
    target side is the caller's: build it with ``soft_targets(t, T, standardize)``)."""
    if kind not in LOSSES:
        raise UserError(f"divergence.kind: unknown '{kind}' (known: {', '.join(LOSSES)})")
    s = zscore(student_logits) if standardize else student_logits.float()
    try:
        return T**2 * LOSSES.get(kind)(target_probs, s, T, **params)
    except TypeError as e:
        raise UserError(f"divergence '{kind}': {e}") from None


def divergence_spec(cfg: Any) -> tuple[str, dict[str, float]]:
    """(registered kind, keyword parameters) for a ``config.DivergenceConfig``: ``kl``; ``alpha``
    (``adaptive_alpha`` when ``cfg.adaptive``); ``alpha_beta``."""
    if cfg.kind == "kl":
        return "kl", {}
    if cfg.kind == "alpha_beta":
        return "alpha_beta", {"alpha": cfg.alpha, "beta": cfg.beta}
    if cfg.adaptive:
        return "adaptive_alpha", {"alpha_min": cfg.alpha_min, "alpha_max": cfg.alpha_max, "iw_clip": cfg.iw_clip}
    return "alpha", {"alpha": cfg.alpha, "iw_clip": cfg.iw_clip}


class Divergence(nn.Module):
    """Batch mean of ``divergence(kind, p, s, T, standardize=..., **params)``."""

    def __init__(self, kind: str = "kl", T: float = 1.0, standardize: bool = False, **params: Any) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise UserError(f"divergence.kind: unknown '{kind}' (known: {', '.join(LOSSES)})")
        self.kind, self.T, self.standardize, self.params = kind, T, standardize, params

    def forward(self, student_logits: Tensor, target_probs: Tensor) -> Tensor:
        return divergence(
            self.kind, target_probs, student_logits, self.T, standardize=self.standardize, **self.params
        ).mean()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, T={self.T}, standardize={self.standardize}, params={self.params}"
