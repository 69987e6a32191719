import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graftkd.config import DivergenceConfig
from graftkd.errors import UserError
from graftkd.losses import (
    LOSSES,
    DKDLoss,
    Divergence,
    adaptive_alpha_divergence,
    alpha_beta_divergence,
    alpha_divergence,
    divergence,
    dkd_loss,
    dkd_parts,
    dml_loss,
    kd_loss,
    kd_loss_from_probs,
    kl_divergence,
    normalized_logit_mse,
    soft_targets,
    standardize,
)

from .reference import (
    S,
    T_LOGITS,
    Y,
    alpha_beta_rows,
    alpha_rows,
    alphanet_adaptive_grad,
    alphanet_grad,
    kl_rows,
    softmax,
    teacher_side_grad,
    zscore,
)

s_t = torch.tensor(S, dtype=torch.float32)
t_t = torch.tensor(T_LOGITS, dtype=torch.float32)
y_t = torch.tensor(Y)
INF = math.inf


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(torch.as_tensor(a).detach().double()), b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------- standardisation, CE


def test_standardize_exact_values():
    close(standardize(torch.tensor([[1.0, 2.0, 3.0, 4.0]])), [[-1.5, -0.5, 0.5, 1.5]] / np.sqrt(5 / 3), rtol=1e-6)
    close(standardize(s_t), zscore(S))


def test_standardize_rows_have_mean0_std1():
    z = standardize(torch.randn(8, 100) * 7 + 3)
    assert z.dtype == torch.float32
    close(z.mean(1), np.zeros(8), atol=1e-6)
    close(z.std(1), np.ones(8), atol=1e-6)


# ----------------------------------------------------------------- KD


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_reference(T):
    expected = T**2 * kl_rows(softmax(T_LOGITS / T), softmax(S / T)).mean()
    close(kd_loss(s_t, t_t, T), expected)
    close(kd_loss_from_probs(s_t, soft_targets(t_t, T), T), expected)


def test_kd_standardized_matches_reference():
    T = 2.0
    expected = T**2 * kl_rows(softmax(zscore(T_LOGITS) / T), softmax(zscore(S) / T)).mean()
    close(kd_loss(s_t, t_t, T, standardize=True), expected)


def test_kd_gradient_is_T_times_q_minus_p_over_B():
    T = 3.0
    s = s_t.clone().requires_grad_(True)
    kd_loss(s, t_t, T).backward()
    expected = T * (softmax(S / T) - softmax(T_LOGITS / T)) / S.shape[0]
    close(s.grad, expected, atol=1e-6)


def test_kd_with_zero_probabilities_in_target():
    onehot = torch.nn.functional.one_hot(y_t, 5).float()
    close(kd_loss_from_probs(s_t, onehot, 1.0), -np.log(softmax(S)[np.arange(3), Y]).mean())


def test_dml_mean_over_detached_peers():
    p1, p2 = t_t.clone().requires_grad_(True), (-t_t).clone().requires_grad_(True)
    s = s_t.clone().requires_grad_(True)
    expected = (kl_rows(softmax(T_LOGITS), softmax(S)).mean() + kl_rows(softmax(-T_LOGITS), softmax(S)).mean()) / 2
    loss = dml_loss(s, [p1, p2])
    close(loss, expected)
    loss.backward()
    assert s.grad is not None and p1.grad is None and p2.grad is None


# ----------------------------------------------------------------- DKD


def _dkd_reference(p_teacher, q_student, y, T):
    """TCKD, NCKD per sample (with T^2) from probabilities, by renormalisation."""
    B = p_teacher.shape[0]
    tckd, nckd = np.zeros(B), np.zeros(B)
    for b in range(B):
        pt, qt = p_teacher[b, y[b]], q_student[b, y[b]]
        tckd[b] = pt * np.log(pt / qt) + (1 - pt) * np.log((1 - pt) / (1 - qt))
        others = [i for i in range(p_teacher.shape[1]) if i != y[b]]
        ph = p_teacher[b, others] / p_teacher[b, others].sum()
        qh = q_student[b, others] / q_student[b, others].sum()
        nckd[b] = (ph * np.log(ph / qh)).sum()
    return T**2 * tckd, T**2 * nckd


@pytest.mark.parametrize("standardize_logits", [False, True])
def test_dkd_matches_reference(standardize_logits):
    T = 4.0
    s_ref, t_ref = (zscore(S), zscore(T_LOGITS)) if standardize_logits else (S, T_LOGITS)
    tckd, nckd = _dkd_reference(softmax(t_ref / T), softmax(s_ref / T), Y, T)
    got_t, got_n = dkd_parts(s_t, y_t, T, teacher_logits=t_t, standardize=standardize_logits)
    close(got_t, tckd, atol=1e-5)  # T^2 = 16 times a float32 KL of nearby binary distributions
    close(got_n, nckd, atol=1e-5)
    close(dkd_loss(s_t, t_t, y_t, 1.0, 8.0, T, standardize_logits), (tckd + 8 * nckd).mean())


def test_dkd_identity_with_kd():
    """Per sample: KD = TCKD + (1 - p_t^T) * NCKD (alpha = 1, beta = 1 - p_t)."""
    T = 2.0
    p = softmax(T_LOGITS / T)
    kd = T**2 * kl_rows(p, softmax(S / T))
    tckd, nckd = dkd_parts(s_t, y_t, T, teacher_logits=t_t)
    close(tckd + torch.tensor(1 - p[np.arange(3), Y], dtype=torch.float32) * nckd, kd)
    close(T**2 * kl_divergence(soft_targets(t_t, T), s_t, T), kd)


def test_dkd_soft_target_path_and_warmup():
    T = 4.0
    probs = 0.7 * soft_targets(t_t, T) + 0.3 * soft_targets(-t_t, T)  # a fused 2-teacher target
    tckd, nckd = _dkd_reference(probs.double().numpy(), softmax(S / T), Y, T)
    got_t, got_n = dkd_parts(s_t, y_t, T, teacher_probs=probs)
    close(got_t, tckd, atol=1e-5)
    close(got_n, nckd, atol=1e-5)
    full = (tckd + 8 * nckd).mean()
    dkd = DKDLoss(alpha=1.0, beta=8.0, T=T, warmup=20)
    close(dkd(s_t, y_t, 5, teacher_probs=probs), 0.25 * full)
    close(dkd(s_t, y_t, 40, teacher_probs=probs), full)
    close(DKDLoss(T=T, warmup=0)(s_t, y_t, 0, teacher_logits=t_t), dkd_loss(s_t, t_t, y_t, T=T))
    with pytest.raises(ValueError, match="exactly one"):
        dkd(s_t, y_t, 1, teacher_logits=t_t, teacher_probs=probs)


# ----------------------------------------------------------------- alpha-divergence


P = softmax(T_LOGITS / 2.0)
Q = softmax(S / 2.0)
p_t = torch.tensor(P, dtype=torch.float32)


@pytest.mark.parametrize("a", [2.0, 0.5, 0.3, -1.0, 0.7])
def test_alpha_divergence_matches_literal_formula(a):
    close(alpha_divergence(p_t, s_t, 2.0, a, iw_clip=INF), alpha_rows(P, Q, a), rtol=2e-5)


def test_alpha_limits_exact_and_near():
    kl, rkl = kl_rows(P, Q), kl_rows(Q, P)
    close(alpha_divergence(p_t, s_t, 2.0, 1.0, INF), kl)
    close(alpha_divergence(p_t, s_t, 2.0, 0.0, INF), rkl)
    for eps in (1e-4, -1e-4):
        close(alpha_divergence(p_t, s_t, 2.0, 1 + eps, INF), kl, rtol=1e-3)
        close(alpha_divergence(p_t, s_t, 2.0, eps, INF), rkl, rtol=1e-3)
        # no cancellation: float32 agrees with the float64 literal formula next to the singular points
        close(alpha_divergence(p_t, s_t, 2.0, 1 + eps, INF), alpha_rows(P, Q, 1 + eps), rtol=1e-5)
        close(alpha_divergence(p_t, s_t, 2.0, eps, INF), alpha_rows(P, Q, eps), rtol=1e-5)
    for tiny in (1e-12, -1e-300):  # would underflow in float32 without the Taylor branch
        close(alpha_divergence(p_t, s_t, 2.0, 1 + tiny, INF), kl)
        close(alpha_divergence(p_t, s_t, 2.0, tiny, INF), rkl)


def test_alpha_importance_weight_clipping():
    a, c = 0.5, 1.5  # (p/q)^0.5 exceeds 1.5 for some classes of this fixture
    w = (P / Q) ** a
    assert (w > c).any()
    r_c = np.minimum(P / Q, c ** (1 / a))
    expected = (Q * (r_c**a - 1 - a * (r_c - 1))).sum(axis=1) / (a * (a - 1))
    close(alpha_divergence(p_t, s_t, 2.0, a, iw_clip=c), expected)
    a = -1.0  # negative alpha clips small ratios: (p/q)^-1 <= c
    r_c = np.maximum(P / Q, c ** (1 / a))
    expected = (Q * (r_c**a - 1 - a * (r_c - 1))).sum(axis=1) / (a * (a - 1))
    close(alpha_divergence(p_t, s_t, 2.0, a, iw_clip=c), expected)


def test_alpha_with_zero_target_probabilities():
    onehot = np.eye(5)[Y]
    q = softmax(S)
    oh = torch.tensor(onehot, dtype=torch.float32)
    close(alpha_divergence(oh, s_t, 1.0, 1.0, INF), -np.log(q[np.arange(3), Y]))
    close(alpha_divergence(oh, s_t, 1.0, 0.5, INF), alpha_rows(onehot, q, 0.5))
    assert torch.isinf(alpha_divergence(oh, s_t, 1.0, 0.0, INF)).all()  # KL(q||onehot) is infinite


def test_adaptive_alpha_is_per_sample_max():
    p = np.array([[0.45, 0.45, 0.1], [0.6, 0.3, 0.1]])
    q = np.array([[0.01, 0.98, 0.01], [0.1, 0.3, 0.6]])
    lo, hi = alpha_rows(p, q, -1.0), kl_rows(p, q)
    assert lo[0] < hi[0] and lo[1] > hi[1]  # each row takes a different branch
    got = adaptive_alpha_divergence(torch.tensor(p), torch.tensor(np.log(q)), 1.0, -1.0, 1.0, iw_clip=INF)
    close(got, np.maximum(lo, hi))


def _grad(fn, p, s, *args):
    st_ = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    fn(torch.tensor(p, dtype=torch.float32), st_, *args).sum().backward()
    return st_.grad.double().numpy()


def _peaked(n_classes, top=3, mass=0.92):
    p = np.full((1, n_classes), (1 - mass) / (n_classes - 1))
    p[0, top] = mass
    return p


def test_alpha_gradient_issue_example_pushes_top_class_up():
    """100 classes, teacher 0.92 on one class, uniform student, alpha 0.5, iw_clip 5: the clipped
    weight (92^0.5 > 5) must not flip the gradient (differentiating the clipped value gave +0.30)."""
    p, s = _peaked(100), np.zeros((1, 100))
    assert (p[0, 3] / (1 / 100)) ** 0.5 > 5  # the top class is clipped
    g = _grad(alpha_divergence, p, s, 1.0, 0.5, 5.0)
    close(g, alphanet_grad(p, s, 1.0, 0.5, 5.0), rtol=1e-5, atol=1e-8)
    kl = _grad(kl_divergence, p, s, 1.0)
    close(kl[0, 3], -0.91)
    assert g[0, 3] < -0.09 and np.sign(g[0, 3]) == np.sign(kl[0, 3])
    assert (g[0, np.arange(100) != 3] > 0).all()  # and every other logit down


# student logits whose softmax puts less than the teacher on the teacher's top class, so that class
# has the largest p/q: a descent step must raise it for every alpha and clip
GRAD_STUDENTS = np.array([[0.0] * 10, [2.0, -1.0, 0.5, -3.0, 1.5, 0.0, 1.0, -0.5, 0.3, 2.5],
                          [-1.0, 4.0, 0.0, 0.5, -2.0, 1.0, 3.0, 0.0, -0.7, 0.2]])


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("a", [-1.0, 0.0, 0.5, 1.0, 2.0])
def test_alpha_gradient_is_alphanets_at_default_clip(a, T):
    p = np.repeat(_peaked(10), 3, axis=0)
    clip = DivergenceConfig().iw_clip
    g = _grad(alpha_divergence, p, GRAD_STUDENTS, T, a, clip)
    close(g, alphanet_grad(p, GRAD_STUDENTS, T, a, clip), rtol=1e-4, atol=1e-7)
    assert (g[:, 3] < 0).all()


def test_adaptive_alpha_gradient_is_alphanets_at_default_clip():
    cfg = DivergenceConfig(kind="alpha", adaptive=True)
    p = np.concatenate([np.repeat(_peaked(10), 3, axis=0), softmax(GRAD_STUDENTS[1:2] / 3)])
    s = np.concatenate([GRAD_STUDENTS, GRAD_STUDENTS[1:2]])
    args = (2.0, cfg.alpha_min, cfg.alpha_max, cfg.iw_clip)
    g = _grad(adaptive_alpha_divergence, p, s, *args)
    close(g, alphanet_adaptive_grad(p, s, *args), rtol=1e-4, atol=1e-7)
    assert (g[:3, 3] < 0).all()
    # through divergence(): T^2 times the same gradient
    kw = dict(zip(("alpha_min", "alpha_max", "iw_clip"), args[1:]))
    g2 = _grad(lambda pp, ss: divergence("adaptive_alpha", pp, ss, 2.0, **kw), p, s)
    close(g2, 4.0 * alphanet_adaptive_grad(p, s, *args), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("a", [0.5, 1.0, -1.0])
@pytest.mark.parametrize("scale", [1.0, 1e-2])
def test_teacher_side_gradient_of_standardised_alpha_matches_float64_reference(a, scale):
    """ATF's teacher term T^2 D_a(stopgrad(p_S) || softmax(Z(z)/T)): its gradient in the teacher's
    logits z equals the float64 chain through Z (AlphaNet's gradient in Z(z) times Z's Jacobian).
    Z is scale-invariant, so the gradient scales as 1/scale: a teacher whose logits flatten by 100x
    gets a 100x larger push (what makes a collapsing teacher's steps explode)."""
    T, clip = 2.0, DivergenceConfig().iw_clip
    p_s = softmax(zscore(S) / T)
    z = T_LOGITS * scale
    g = _grad(lambda p, v: divergence("alpha", p, v, T, standardize=True, alpha=a, iw_clip=clip), p_s, z)
    close(g, teacher_side_grad(p_s, z, T, a, clip), rtol=1e-4, atol=1e-6 / scale)
    assert np.abs(g).max() > 0.05 / scale
    close(g * scale, teacher_side_grad(p_s, T_LOGITS, T, a, clip), rtol=1e-3, atol=1e-6)


def test_alpha_gradient_with_zero_target_probabilities_is_finite():
    onehot = torch.tensor(np.eye(5)[Y], dtype=torch.float32)
    for a in (-1.0, 0.0, 0.5, 1.0):
        s = s_t.clone().requires_grad_(True)
        alpha_divergence(onehot, s, 1.0, a, 5.0).sum().backward()
        assert torch.isfinite(s.grad).all()
        assert (s.grad[torch.arange(3), y_t] < 0).all()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    a=st.floats(-2.0, 3.0),
    logits=st.lists(st.floats(-6, 6), min_size=8, max_size=8),
)
def test_alpha_divergence_nonnegative_and_zero_at_equality(a, logits):
    s = torch.tensor(logits).view(2, 4)
    p = torch.softmax(s.flip(1), dim=1)
    d = alpha_divergence(p, s, 1.0, a, INF)
    assert torch.all(d >= -1e-5)
    close(alpha_divergence(torch.softmax(s, 1), s, 1.0, a, INF), np.zeros(2), atol=1e-5)


# ----------------------------------------------------------------- alpha-beta divergence


@pytest.mark.parametrize("a,b", [(0.8, 0.3), (0.5, 0.7), (1.5, -0.4), (-0.3, 1.0)])
def test_alpha_beta_matches_literal_formula(a, b):
    close(alpha_beta_divergence(p_t, s_t, 2.0, a, b), alpha_beta_rows(P, Q, a, b), rtol=2e-5)


def test_alpha_beta_limits():
    kl, rkl = kl_rows(P, Q), kl_rows(Q, P)
    close(alpha_beta_divergence(p_t, s_t, 2.0, 1.0, 0.0), kl)
    close(alpha_beta_divergence(p_t, s_t, 2.0, 0.0, 1.0), rkl)
    close(alpha_beta_divergence(p_t, s_t, 2.0, 1.0, 1e-4), kl, rtol=1e-3)
    close(alpha_beta_divergence(p_t, s_t, 2.0, 1e-4, 1.0), rkl, rtol=1e-3)
    d = np.log(Q) - np.log(P)
    close(alpha_beta_divergence(p_t, s_t, 2.0, 0.0, 0.0), (d**2 / 2).sum(axis=1))
    a = 0.5  # alpha + beta = 0: Cichocki's (1/a^2) sum [log(q^a/p^a) + (q^a/p^a)^-1 - 1]
    ratio = Q**a / P**a
    close(alpha_beta_divergence(p_t, s_t, 2.0, a, -a), (np.log(ratio) + 1 / ratio - 1).sum(axis=1) / a**2)


def test_alpha_beta_with_zero_target_probabilities():
    onehot = np.eye(5)[Y]
    q = softmax(S)
    oh = torch.tensor(onehot, dtype=torch.float32)
    close(alpha_beta_divergence(oh, s_t, 1.0, 0.8, 0.3), alpha_beta_rows(onehot, q, 0.8, 0.3))
    close(alpha_beta_divergence(oh, s_t, 1.0, 1.0, 0.0), -np.log(q[np.arange(3), Y]))
    assert torch.isinf(alpha_beta_divergence(oh, s_t, 1.0, 0.0, 1.0)).all()


# ----------------------------------------------------------------- registry, NetGraft, precision


def test_registry_and_uniform_signature():
    assert LOSSES.names() == ["adaptive_alpha", "alpha", "alpha_beta", "kl"]
    T = 2.0
    close(divergence("kl", p_t, s_t, T), T**2 * kl_rows(P, Q))
    close(divergence("alpha", p_t, s_t, T, alpha=0.5, iw_clip=INF), T**2 * alpha_rows(P, Q, 0.5), rtol=2e-5)
    close(divergence("alpha_beta", p_t, s_t, T, alpha=0.8, beta=0.3), T**2 * alpha_beta_rows(P, Q, 0.8, 0.3), rtol=2e-5)
    close(divergence("kl", p_t, s_t, T, standardize=True), T**2 * kl_rows(P, softmax(zscore(S) / T)))
    close(Divergence("alpha", T, alpha=0.5, iw_clip=INF)(s_t, p_t), T**2 * alpha_rows(P, Q, 0.5).mean(), rtol=2e-5)
    with pytest.raises(UserError, match="divergence.kind: unknown 'kll'"):
        divergence("kll", p_t, s_t, T)
    with pytest.raises(UserError, match="divergence 'kl'"):
        divergence("kl", p_t, s_t, T, alpha=0.5)


def test_normalized_logit_mse():
    sn = S / np.linalg.norm(S, axis=1, keepdims=True)
    tn = T_LOGITS / np.linalg.norm(T_LOGITS, axis=1, keepdims=True)
    expected = ((sn - tn) ** 2).sum()
    close(normalized_logit_mse(s_t, t_t), expected)
    close(normalized_logit_mse(2 * t_t, t_t), 0.0, atol=1e-6)  # scale invariant


def test_losses_finite_and_float32_under_bf16_autocast():
    s = (s_t * 4).bfloat16().requires_grad_(True)
    t = (t_t * 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = soft_targets(t, 4.0)
        values = [
            kd_loss(s, t, 4.0),
            kd_loss(s, t, 2.0, standardize=True),
            DKDLoss(T=4.0)(s, y_t, 1, teacher_logits=t),
            DKDLoss(T=4.0, standardize=True)(s, y_t, 1, teacher_probs=p),
            normalized_logit_mse(s, t),
            dml_loss(s, [t]),
        ] + [divergence(k, p, s, 4.0).mean() for k in ("kl", "alpha", "adaptive_alpha", "alpha_beta")]
    for v in values:
        assert v.dtype == torch.float32 and torch.isfinite(v)
    torch.stack(values).sum().backward()
    assert torch.isfinite(s.grad.float()).all()
