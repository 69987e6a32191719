"""Image- and patient-level classification metrics, calibration and patient bootstrap intervals.

Everything is computed from float logits, int labels and the records (for groups = patients and
magnifications) with vectorised torch code; the result is a JSON-able dict (plain floats, lists).

Definitions (BreakHis, Spanhol et al. 2016): image accuracy = correct images / images; patient
recognition rate = mean over patients of each patient's image accuracy. A patient's label is the
most frequent label of its images; its majority-vote prediction is the most frequent predicted
class (ties broken by the mean-probability vote); its mean-probability prediction is the argmax
of the mean softmax over its images.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from graftkd.errors import UserError
from graftkd.config import ExperimentConfig
from graftkd.data.loaders import predict_split
from graftkd.data.types import Record

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def score_split(fn: Callable[[torch.Tensor], torch.Tensor], dataset: Any, cfg: ExperimentConfig,
                device: torch.device, class_names: list[str], rows: list[list[Any]] | None = None,
                split: str = "") -> dict[str, Any]:
    """Every metric of ``evaluate_predictions`` for ``fn`` on one split (image, patient, per magnification).
    With ``rows``, appends ``[split, image, group, label, pred]`` per image (``predictions.csv``)."""
    out = predict_split(fn, dataset, cfg, device)
    records = [dataset.records[i] for i in out["index"].tolist()]
    if rows is not None:
        pred = out["logits"].argmax(1).tolist()
        rows += [[split, r.path if r.path is not None else r.meta["index"], r.group, r.label, p]
                 for r, p in zip(records, pred)]
    return evaluate_predictions(out["logits"], out["labels"], records, class_names)


def evaluate_predictions(logits: torch.Tensor, labels: torch.Tensor, records: Sequence[Record],
                         class_names: Sequence[str], *, resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Every metric for one split; ``by_magnification`` is added when records carry magnifications."""
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0] or len(records) != labels.shape[0]:
        raise ValueError(f"shapes disagree: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                         f"{len(records)} records")
    if logits.shape[1] != len(class_names):
        raise ValueError(f"logits have {logits.shape[1]} columns but there are {len(class_names)} classes")
    logits = logits.detach().double().cpu()
    labels = labels.detach().long().cpu()
    bad = ~torch.isfinite(logits).all(1)
    if bad.any():  # no metric from NaN/inf outputs (a NaN logit sorts anywhere: AUC 1.5, confidence nan)
        first = records[int(bad.nonzero()[0])]
        raise UserError(f"the model gives non-finite outputs (NaN or inf) on {int(bad.sum())} of {len(records)} images, "
                        f"e.g. {first.path if first.path is not None else first.meta.get('index')}; no metric is "
                        f"computed from them")
    groups = [r.group for r in records]
    out = _split_metrics(logits, labels, groups, list(class_names), resamples, seed)
    mags = [r.meta.get("magnification") for r in records]
    if any(m is not None for m in mags):
        by_mag: dict[str, Any] = {}
        for mag in sorted({int(m) for m in mags if m is not None}):
            idx = torch.tensor([i for i, m in enumerate(mags) if m is not None and int(m) == mag])
            by_mag[str(mag)] = _split_metrics(logits[idx], labels[idx], [groups[i] for i in idx.tolist()],
                                              list(class_names), resamples, seed)
        out["by_magnification"] = by_mag
    return out


def _split_metrics(logits: torch.Tensor, labels: torch.Tensor, groups: list[str], classes: list[str],
                   resamples: int, seed: int) -> dict[str, Any]:
    n, c = logits.shape
    probs = torch.softmax(logits, dim=1)
    pred = probs.argmax(1)
    correct = (pred == labels).double()
    cm = confusion_matrix(labels, pred, c)
    prf = precision_recall_f1(cm)
    present = (cm.sum(0) + cm.sum(1)) > 0  # classes in labels or predictions (sklearn's label set)
    support = cm.sum(1)
    gid, n_groups = _group_index(groups)
    out: dict[str, Any] = {
        "n": n,
        "accuracy": float(correct.mean()) if n else None,
        "balanced_accuracy": float(prf["recall"][support > 0].mean()) if n else None,
        "macro_f1": float(prf["f1"][present].mean()) if n else None,
        "roc_auc": roc_auc(probs, labels),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)) if n else None,
        "per_class": {name: {"precision": float(prf["precision"][k]), "recall": float(prf["recall"][k]),
                             "f1": float(prf["f1"][k]), "support": int(support[k])}
                      for k, name in enumerate(classes)},
        "classes": classes,
        "confusion_matrix": cm.tolist(),
        **calibration(probs, labels, ECE_BINS),
    }
    grouped = n_groups < n
    boot = bootstrap_groups(correct, gid, n_groups, resamples, seed)
    out["accuracy_ci95"] = _ci(boot["accuracy"])
    if grouped:
        out.update(patient_metrics(probs, labels, gid, n_groups))
        out["patient_recognition_rate_ci95"] = _ci(boot["recognition_rate"])
    out["bootstrap"] = {"resamples": resamples, "seed": seed, "unit": "patient" if grouped else "image",
                        "level": 0.95}
    return out


def _group_index(groups: list[str]) -> tuple[torch.Tensor, int]:
    """Dense group ids in order of first appearance."""
    ids: dict[str, int] = {}
    gid = torch.tensor([ids.setdefault(g, len(ids)) for g in groups], dtype=torch.long)
    return gid, len(ids)


def confusion_matrix(labels: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[i, j]`` = images of true class i predicted as j."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def precision_recall_f1(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class precision, recall, F1 from a confusion matrix; 0 where undefined (0/0)."""
    cm = cm.double()
    tp = cm.diagonal()
    pred_pos, true_pos = cm.sum(0), cm.sum(1)
    precision = torch.where(pred_pos > 0, tp / pred_pos.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(true_pos > 0, tp / true_pos.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1}


def midranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dim with ties given their average rank (vectorised)."""
    scores = scores.contiguous()
    s = scores.sort(dim=-1).values.contiguous()
    left = torch.searchsorted(s, scores, side="left")
    right = torch.searchsorted(s, scores, side="right")
    return (left + right + 1).double() / 2


def binary_auc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """ROC AUC of each row of ``scores`` [K, N] against boolean ``positive`` [K, N] (Mann-Whitney U);
    NaN for rows without both positives and negatives."""
    ranks = midranks(scores)
    pos = positive.double()
    n_pos = pos.sum(-1)
    n_neg = positive.shape[-1] - n_pos
    u = (ranks * pos).sum(-1) - n_pos * (n_pos + 1) / 2
    return torch.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg).clamp(min=1), torch.full_like(u, float("nan")))


def roc_auc(probs: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Binary: AUC of P(class 1). C > 2: macro mean of one-vs-rest AUCs over classes with both
    positives and negatives. None when undefined."""
    c = probs.shape[1]
    if c == 2:
        auc = binary_auc(probs[:, 1][None], (labels == 1)[None])
    else:
        onehot = labels[None, :] == torch.arange(c)[:, None]
        auc = binary_auc(probs.T, onehot)
    auc = auc[~auc.isnan()]
    return float(auc.mean()) if auc.numel() else None


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error over ``bins`` equal-width confidence bins (lo, hi], and the
    reliability-diagram bins (count, mean confidence, accuracy; None for empty bins)."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    b = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(b, minlength=bins).double()
    conf_sum = torch.bincount(b, weights=conf, minlength=bins)
    acc_sum = torch.bincount(b, weights=correct, minlength=bins)
    nz = count > 0
    mean_conf = torch.where(nz, conf_sum / count.clamp(min=1), torch.zeros_like(count))
    mean_acc = torch.where(nz, acc_sum / count.clamp(min=1), torch.zeros_like(count))
    n = max(len(labels), 1)
    ece = float(((mean_conf - mean_acc).abs() * count).sum() / n) if len(labels) else None
    return {"ece": ece, "reliability": {
        "edges": torch.linspace(0, 1, bins + 1).tolist(),
        "count": count.long().tolist(),
        "confidence": [float(v) if k else None for v, k in zip(mean_conf, nz)],
        "accuracy": [float(v) if k else None for v, k in zip(mean_acc, nz)],
    }}


def patient_metrics(probs: torch.Tensor, labels: torch.Tensor, gid: torch.Tensor, n_groups: int) -> dict[str, Any]:
    """Patient recognition rate and patient accuracy by majority and by mean-probability vote."""
    c = probs.shape[1]
    pred = probs.argmax(1)
    size = torch.bincount(gid, minlength=n_groups).double()
    correct = torch.bincount(gid, weights=(pred == labels).double(), minlength=n_groups)
    label_counts = torch.zeros(n_groups, c, dtype=torch.double).index_put_((gid, labels), torch.ones(len(gid),
                                                                          dtype=torch.double), accumulate=True)
    vote_counts = torch.zeros(n_groups, c, dtype=torch.double).index_put_((gid, pred), torch.ones(len(gid),
                                                                         dtype=torch.double), accumulate=True)
    mean_prob = torch.zeros(n_groups, c, dtype=torch.double).index_add_(0, gid, probs) / size[:, None]
    patient_label = label_counts.argmax(1)
    by_mean = mean_prob.argmax(1)
    top = vote_counts == vote_counts.max(1, keepdim=True).values  # tied leading classes
    by_vote = torch.where(top, mean_prob, torch.full_like(mean_prob, -1.0)).argmax(1)
    return {
        "n_patients": n_groups,
        "patient_recognition_rate": float((correct / size).mean()),
        "patient_accuracy_majority": float((by_vote == patient_label).double().mean()),
        "patient_accuracy_mean_prob": float((by_mean == patient_label).double().mean()),
    }


def bootstrap_groups(correct: torch.Tensor, gid: torch.Tensor, n_groups: int, resamples: int,
                     seed: int) -> dict[str, torch.Tensor]:
    """Bootstrap over groups (patients): each resample draws ``n_groups`` groups with replacement
    and takes all their images. Returns ``resamples`` values of image accuracy and of recognition rate."""
    size = torch.bincount(gid, minlength=n_groups).double()
    hits = torch.bincount(gid, weights=correct, minlength=n_groups)
    if n_groups == 0:
        empty = torch.empty(0, dtype=torch.double)
        return {"accuracy": empty, "recognition_rate": empty, "draws": torch.empty(0, 0, dtype=torch.long)}
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_groups, (resamples, n_groups), generator=g)
    return {"accuracy": hits[draws].sum(1) / size[draws].sum(1),
            "recognition_rate": (hits / size)[draws].mean(1),
            "draws": draws}


def _ci(values: torch.Tensor) -> list[float] | None:
    """Percentile 95% interval (linear interpolation, as numpy's default)."""
    if values.numel() == 0:
        return None
    q = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype))
    return [float(q[0]), float(q[1])]
