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
