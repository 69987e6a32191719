"""Fusion strategies: exact weights, better teacher weighs more, rows sum to one, limits."""
import math

import pytest
import torch

from graftkd.teachers import fusion

STRATS = ["mean", "accuracy", "entropy", "confidence", "best"]


def _logits(k: int = 3, b: int = 5, c: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, b, c, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("strategy", STRATS)
def test_rows_sum_to_one(strategy):
    z = _logits()
    w = fusion.weights(strategy, z, torch.tensor([0, 1, 2, 3, 0]), torch.tensor([0.7, 0.9, 0.8]), tau=0.05)
    assert w.shape == (5, 3)
    assert torch.allclose(w.sum(1), torch.ones(5), atol=1e-6)
    assert (w >= 0).all()


@pytest.mark.parametrize("strategy", STRATS)
def test_single_teacher_weight_one_and_target_is_its_softmax(strategy):
    z = _logits(k=1)
    w = fusion.weights(strategy, z, torch.zeros(5, dtype=torch.long), torch.tensor([0.6]), tau=0.05)
    assert torch.equal(w, torch.ones(5, 1))
    assert torch.allclose(fusion.fuse(z, w, 4.0, False), torch.softmax(z[0] / 4.0, -1), atol=1e-7)


def test_accuracy_exact_and_better_teacher_weighs_more():
    w = fusion.global_weights("accuracy", torch.tensor([0.9, 0.8]), tau=0.05)
    e = math.exp(-2.0)  # softmax([18, 16])
    assert w.tolist() == pytest.approx([1 / (1 + e), e / (1 + e)], abs=1e-7)
    assert w[0] > w[1]


def test_accuracy_tau_to_infinity_is_mean():
    z = _logits()
    w = fusion.weights("accuracy", z, None, torch.tensor([0.2, 0.9, 0.5]), tau=1e9)
    assert torch.allclose(w, fusion.weights("mean", z, None, torch.tensor([0.2, 0.9, 0.5])), atol=1e-7)
    assert torch.allclose(w, torch.full((5, 3), 1 / 3), atol=1e-7)


def test_accuracy_small_tau_is_best():
    acc = torch.tensor([0.7, 0.9, 0.8])
    assert torch.equal(fusion.global_weights("best", acc, 1.0), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(fusion.global_weights("accuracy", acc, 1e-4), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def test_entropy_exact_and_confident_teacher_weighs_more():
    z = torch.tensor([[[4.0, 0.0, 0.0]], [[1.0, 0.5, 0.0]], [[0.0, 0.0, 0.0]]], dtype=torch.float64)
    p = torch.softmax(z, -1)
    h = -(p * p.log()).sum(-1)[:, 0]  # [K]
    expected = (1 - h / h.sum()) / 2
    w = fusion.weights("entropy", z.float())
    assert torch.allclose(w[0].double(), expected, atol=1e-6)
    assert w[0, 0] > w[0, 1] > w[0, 2]


def test_confidence_exact_and_teacher_closer_to_label_weighs_more():
    z = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                      [[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]],
                      [[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    ce = torch.stack([-torch.log_softmax(z[k], -1)[torch.arange(2), y] for k in range(3)], 1)  # [B, K]
    expected = (1 - torch.softmax(ce, 1)) / 2
    w = fusion.weights("confidence", z.float(), y)
    assert torch.allclose(w.double(), expected, atol=1e-6)
    assert w[0].argmax() == 0 and w[1].argmax() == 1
    assert w[0, 0] > w[0, 2] > w[0, 1]


def test_confidence_needs_labels_and_global_needs_accuracy():
    with pytest.raises(ValueError, match="labels"):
        fusion.weights("confidence", _logits())
    with pytest.raises(ValueError, match="validation"):
        fusion.weights("accuracy", _logits())


def test_fuse_exact_with_and_without_standardisation():
    z = _logits(k=2, b=3, c=5).double()
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    T = 2.0
    plain = sum(w[:, k:k + 1] * torch.softmax(z[k] / T, -1) for k in range(2))
    zs = (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)
    stand = sum(w[:, k:k + 1] * torch.softmax(zs[k] / T, -1) for k in range(2))
    assert torch.allclose(fusion.fuse(z.float(), w.float(), T, False).double(), plain, atol=1e-6)
    assert torch.allclose(fusion.fuse(z.float(), w.float(), T, True).double(), stand, atol=1e-6)
    assert torch.allclose(fusion.fuse(z.float(), w.float(), T, True).sum(-1), torch.ones(3), atol=1e-6)


def test_fuse_logits_exact():
    z = torch.tensor([[[3.0, 4.0, 0.0]], [[0.0, 0.0, 2.0]]])  # 2 teachers, 1 sample, 3 classes; norms 5 and 2
    w = torch.tensor([[0.25, 0.75]])
    torch.testing.assert_close(fusion.fuse_logits(z, w, "normalized_mean"),
                               torch.tensor([[0.25 * 0.6, 0.25 * 0.8, 0.75 * 1.0]]))
    torch.testing.assert_close(fusion.fuse_logits(z, w, "mean"), torch.tensor([[0.75, 1.0, 1.5]]))
    # log_probs: T log(sum_k w_k softmax(z_k / T)), centred; its softmax at T is the fused distribution
    T = 2.0
    v = fusion.fuse_logits(z, w, "log_probs", T)
    p = 0.25 * torch.softmax(z[0] / T, -1) + 0.75 * torch.softmax(z[1] / T, -1)
    ref = T * p.log()
    torch.testing.assert_close(v, ref - ref.mean(-1, keepdim=True))
    torch.testing.assert_close(v.sum(-1), torch.zeros(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.softmax(v / T, -1), fusion.fuse(z, w, T, False))
    with pytest.raises(ValueError, match="unknown fused logits 'x'"):
        fusion.fuse_logits(z, w, "x")


def test_fuse_logits_of_one_teacher_has_its_direction_and_zero_weight_is_ignored():
    z = _logits(k=2, b=4, c=5)
    w = torch.tensor([[1.0, 0.0]]).expand(4, -1)
    for how in ("normalized_mean", "mean"):
        v = fusion.fuse_logits(z, w, how)
        torch.testing.assert_close(v / v.norm(dim=-1, keepdim=True), z[0] / z[0].norm(dim=-1, keepdim=True))
    v = fusion.fuse_logits(z, w, "log_probs", 4.0)  # T log softmax(z/T), centred = z centred
    torch.testing.assert_close(v, z[0] - z[0].mean(-1, keepdim=True), atol=1e-5, rtol=0)


def test_nlmse_to_normalized_mean_has_the_gradient_of_the_weighted_per_teacher_losses():
    """grad_s nlmse(s, sum_k w_k z_k/||z_k||) = grad_s sum_k w_k nlmse(s, z_k) / ||v_b|| per sample."""
    from graftkd.losses import normalized_logit_mse

    z = _logits(k=3, b=4, c=6).double()
    w = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), -1).double()
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    v = fusion.fuse_logits(z, w, "normalized_mean").double()
    (g_fused,) = torch.autograd.grad(normalized_logit_mse(s, v).double(), s)
    s64 = s.detach().clone().requires_grad_(True)
    per_teacher = sum((w[:, k] * ((s64 / s64.norm(dim=1, keepdim=True)
                                   - z[k] / z[k].norm(dim=1, keepdim=True)) ** 2).sum(1)).sum() for k in range(3))
    (g_sum,) = torch.autograd.grad(per_teacher, s64)
    torch.testing.assert_close(g_fused.double() * v.norm(dim=1, keepdim=True), g_sum, rtol=1e-5, atol=1e-6)
