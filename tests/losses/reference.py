"""Independent float64 NumPy references, written out from the formulas in methods.md."""
import numpy as np

S = np.array([[2.0, -1.0, 0.5, 0.0, 1.5], [-0.3, 0.8, 2.2, -1.7, 0.1], [1.0, 1.0, -2.0, 3.0, 0.4]])
T_LOGITS = np.array([[3.0, -2.0, 1.0, 0.5, 0.0], [0.2, 0.1, 4.0, -1.0, -0.5], [-1.0, 2.0, 0.0, 2.5, 1.0]])
Y = np.array([0, 2, 3])


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def zscore(v, eps=1e-7):
    mean = v.mean(axis=1, keepdims=True)
    std = np.sqrt(((v - mean) ** 2).sum(axis=1, keepdims=True) / (v.shape[1] - 1))
    return (v - mean) / (std + eps)


def kl_rows(p, q):
    out = np.zeros(p.shape[0])
    for b in range(p.shape[0]):
        for i in range(p.shape[1]):
            if p[b, i] > 0:
                out[b] += p[b, i] * (np.log(p[b, i]) - np.log(q[b, i]))
    return out


def alpha_rows(p, q, a):
    """1/(a(a-1)) sum q [(p/q)^a - 1], literal."""
    return ((q * ((p / q) ** a - 1)).sum(axis=1)) / (a * (a - 1))


def alpha_beta_rows(p, q, a, b):
    """-(1/(a b)) sum [p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)], literal."""
    lam = a + b
    return -(p**a * q**b - a / lam * p**lam - b / lam * q**lam).sum(axis=1) / (a * b)


def alphanet_rows(p, q, a, clip):
    """AlphaNet's f-divergence (Wang et al. 2021, loss_ops.f_divergence), literal: (value, rho) per
    class with w = p/q; a = 0: w clipped at clip, f = -log w, rho = log w - 1; a = 1: f = w log w,
    rho = w; else w^a clipped at clip, f = (w^a - 1) / (a(a-1)), rho = w^a/a + 1/(a(a-1))."""
    w = p / q
    if a == 0:
        w = np.minimum(w, clip)
        f, rho = -np.log(w), np.log(w) - 1
    elif a == 1:
        f, rho = w * np.log(w), w
    else:
        wa = np.minimum(w**a, clip)
        f, rho = (wa - 1) / (a * (a - 1)), wa / a + 1 / (a * (a - 1))
    return (q * f).sum(axis=1), rho


def alphanet_grad(p, s, T, a, clip):
    """d/ds of AlphaNet's surrogate -sum_i stopgrad(q_i rho_i) log q_i, q = softmax(s/T):
    -(c_j - q_j sum_i c_i) / T with c = q rho."""
    q = softmax(s / T)
    c = q * alphanet_rows(p, q, a, clip)[1]
    return -(c - q * c.sum(axis=1, keepdims=True)) / T


def alphanet_adaptive_grad(p, s, T, a_min, a_max, clip):
    """AdaptiveLossSoft: per sample the gradient of the branch whose value is larger (a_max on ties)."""
    q = softmax(s / T)
    lo = alphanet_rows(p, q, a_min, clip)[0]
    hi = alphanet_rows(p, q, a_max, clip)[0]
    return np.where((lo > hi)[:, None], alphanet_grad(p, s, T, a_min, clip), alphanet_grad(p, s, T, a_max, clip))


def zscore_vjp(v, g, eps=1e-7):
    """d/dv of sum_i g_i Z(v)_i per row, Z(v) = (v - mean) / (std + eps), std unbiased, written out:
    (g - mean(g)) / d - (sum_i g_i c_i) c / ((C - 1) std d^2), c = v - mean, d = std + eps."""
    n = v.shape[1]
    c = v - v.mean(axis=1, keepdims=True)
    std = np.sqrt((c**2).sum(axis=1, keepdims=True) / (n - 1))
    d = std + eps
    return (g - g.mean(axis=1, keepdims=True)) / d - (g * c).sum(axis=1, keepdims=True) * c / ((n - 1) * std * d**2)


def teacher_side_grad(p_student, z, T, a, clip):
    """d/dz of ATF's teacher term T^2 D_a(p_S || softmax(Z(z) / T)) per row (AlphaNet's gradient in
    the standardised logits, through Z)."""
    return T**2 * zscore_vjp(z, alphanet_grad(p_student, zscore(z), T, a, clip))
