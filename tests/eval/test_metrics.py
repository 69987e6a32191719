"""Every metric against a hand-computed case (values worked out on paper in the comments)."""
from __future__ import annotations

import math

import pytest
import torch

from graftkd.data.types import Record
from graftkd.eval.metrics import binary_auc, bootstrap_groups, evaluate_predictions, roc_auc

CLASSES = ["benign", "malignant"]
# patient A (benign): P(malignant) 0.1 0.25 0.35 0.85 -> predictions 0 0 0 1 (3/4 right)
# patient B (malignant): 0.45 -> 0 (0/1 right)
# patient C (malignant): 0.57 0.62 0.05 -> 1 1 0 (2/3 right)
P1 = [0.1, 0.25, 0.35, 0.85, 0.45, 0.57, 0.62, 0.05]
LABELS = [0, 0, 0, 0, 1, 1, 1, 1]
GROUPS = ["A"] * 4 + ["B"] + ["C"] * 3
MAGS = [40, 40, 100, 100, 40, 40, 100, 100]


def _case(mags: bool = True) -> dict:
    p = torch.tensor(P1, dtype=torch.float64)
    logits = torch.stack([1 - p, p], 1).log().float()
    recs = [Record(None, y, g, {"magnification": m} if mags else {}) for y, g, m in zip(LABELS, GROUPS, MAGS)]
    return evaluate_predictions(logits, torch.tensor(LABELS), recs, CLASSES)


def test_image_level_metrics() -> None:
    m = _case()
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["confusion_matrix"] == [[3, 1], [2, 2]]
    assert m["per_class"]["benign"] == pytest.approx({"precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "support": 4})
    assert m["per_class"]["malignant"] == pytest.approx({"precision": 2 / 3, "recall": 1 / 2, "f1": 4 / 7, "support": 4})
    assert m["macro_f1"] == pytest.approx(13 / 21)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    # positives 0.45, 0.57, 0.62 beat 3 of the 4 negatives each, 0.05 beats none: 9 / 16
    assert m["roc_auc"] == pytest.approx(9 / 16)
    nll = -sum(math.log(1 - p if y == 0 else p) for p, y in zip(P1, LABELS)) / 8
    assert m["loss"] == pytest.approx(nll, rel=1e-6)


def test_calibration_bins_and_ece() -> None:
    m = _case()
    # confidences 0.9 .75 .65 .85 | .55 | .57 .62 .95 with correctness T T T F | F | T T F
    # bins (width 1/15): 8 {.55 F, .57 T}, 9 {.65 T, .62 T}, 11 {.75 T}, 12 {.85 F}, 13 {.9 T}, 14 {.95 F}
    # ECE = (2*.06 + 2*.365 + .25 + .85 + .1 + .95) / 8 = 3 / 8
    assert m["ece"] == pytest.approx(0.375, abs=1e-6)
    rel = m["reliability"]
    assert rel["count"] == [0] * 8 + [2, 2, 0, 1, 1, 1, 1]
    assert rel["accuracy"][8:] == pytest.approx([0.5, 1.0, None, 1.0, 0.0, 1.0, 0.0])
    assert rel["confidence"][9] == pytest.approx(0.635)
    assert len(rel["edges"]) == 16 and rel["accuracy"][0] is None


def test_patient_metrics_differ_from_image_accuracy() -> None:
    m = _case()
    assert m["n_patients"] == 3
    # image accuracy 5/8 = 0.625, recognition rate (3/4 + 0 + 2/3) / 3 = 17/36
    assert m["patient_recognition_rate"] == pytest.approx(17 / 36)
    assert m["accuracy"] != pytest.approx(m["patient_recognition_rate"])
    # majority: A->0 right, B->0 wrong, C->1 right; mean prob: A .3875 right, B .45 wrong, C .4133 wrong
    assert m["patient_accuracy_majority"] == pytest.approx(2 / 3)
    assert m["patient_accuracy_mean_prob"] == pytest.approx(1 / 3)
    assert m["bootstrap"]["unit"] == "patient"
    lo, hi = m["patient_recognition_rate_ci95"]
    assert lo <= 17 / 36 <= hi


def test_by_magnification() -> None:
    m = _case()
    assert sorted(m["by_magnification"]) == ["100", "40"]
    m40, m100 = m["by_magnification"]["40"], m["by_magnification"]["100"]
    # 40X: A .1 .25 right, B wrong, C .57 right -> 3/4; patients A 1, B 0, C 1 -> 2/3
    assert (m40["n"], m40["accuracy"], m40["patient_recognition_rate"]) == (4, pytest.approx(0.75), pytest.approx(2 / 3))
    # 100X: A .35 right .85 wrong, C .62 right .05 wrong -> 1/2; patients 1/2, 1/2 -> 1/2
    assert (m100["n"], m100["accuracy"], m100["patient_recognition_rate"]) == (4, 0.5, 0.5)
    assert m40["n_patients"] == 3 and m100["n_patients"] == 2
    assert "by_magnification" not in _case(mags=False)


def test_ungrouped_data_has_no_patient_metrics() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    recs = [Record(None, y, f"img{i}") for i, y in enumerate([0, 1, 1])]
    m = evaluate_predictions(logits, torch.tensor([0, 1, 1]), recs, CLASSES)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert "patient_recognition_rate" not in m and m["bootstrap"]["unit"] == "image"


def test_majority_tie_broken_by_mean_probability() -> None:
    # one malignant patient, predictions 0 (p=.4) and 1 (p=.9): tied vote, mean .65 -> malignant
    p = torch.tensor([0.4, 0.9], dtype=torch.float64)
    logits = torch.stack([1 - p, p], 1).log().float()
    m = evaluate_predictions(logits, torch.tensor([1, 1]), [Record(None, 1, "P"), Record(None, 1, "P")], CLASSES)
    assert m["patient_accuracy_majority"] == 1.0 and m["patient_recognition_rate"] == 0.5


def test_auc_ties_and_one_vs_rest() -> None:
    # negatives .2 .5, positives .5 .9: wins 1 + 0.5 (tie) + 2 = 3.5 of 4 pairs
    scores = torch.tensor([[0.2, 0.5, 0.5, 0.9]], dtype=torch.float64)
    assert binary_auc(scores, torch.tensor([[False, False, True, True]])).item() == pytest.approx(0.875)
    assert torch.isnan(binary_auc(scores, torch.ones(1, 4, dtype=torch.bool))).all()
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]], dtype=torch.float64)
    # class 0: 1.0, class 1: 1.0, class 2: (2 + 1 + 0.5) / 4 = 0.875
    assert roc_auc(probs, torch.tensor([0, 1, 2, 2])) == pytest.approx((1 + 1 + 0.875) / 3)
    assert roc_auc(probs, torch.tensor([2, 2, 2, 2])) is None


def test_bootstrap_resamples_patients_not_images() -> None:
    # patient 0: 10 right images, patient 1: 1 wrong image. Resampling 2 patients can only give
    # accuracy 1 (0,0), 10/11 (0,1) or 0 (1,1); resampling images would give k/11 for any k.
    correct = torch.tensor([1.0] * 10 + [0.0], dtype=torch.float64)
    gid = torch.tensor([0] * 10 + [1])
    boot = bootstrap_groups(correct, gid, 2, 1000, seed=0)
    values = set(boot["accuracy"].tolist())
    assert values == {1.0, 10 / 11, 0.0}
    assert set(boot["recognition_rate"].tolist()) == {1.0, 0.5, 0.0}
    assert torch.equal(boot["draws"], bootstrap_groups(correct, gid, 2, 1000, seed=0)["draws"])


def test_bootstrap_interval_collapses_with_one_patient() -> None:
    p = torch.tensor([0.9, 0.8, 0.3, 0.2], dtype=torch.float64)
    logits = torch.stack([1 - p, p], 1).log().float()
    recs = [Record(None, 1, "only") for _ in range(4)]
    m = evaluate_predictions(logits, torch.ones(4, dtype=torch.long), recs, CLASSES)
    assert m["accuracy_ci95"] == [0.5, 0.5] and m["patient_recognition_rate_ci95"] == [0.5, 0.5]
    assert m["roc_auc"] is None  # one class only


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="3 classes"):
        evaluate_predictions(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), [Record(None, 0, "a")] * 2,
                             ["a", "b", "c"])
