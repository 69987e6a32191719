"""A tiny finished run folder built without training: model.pt, config.yaml, log.csv, metrics.json."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from graftkd.config import ExperimentConfig
from graftkd.distributed import DistContext
from graftkd.experiment import save_resolved_config
from graftkd.data.types import Record
from graftkd.eval.metrics import evaluate_predictions
from graftkd.models import create_model, save_model_file

CLASSES = ["benign", "malignant"]
IMAGE_SIZE = 16
MEAN, STD = (0.7, 0.6, 0.7), (0.15, 0.2, 0.15)


def fake_split(seed: int, n_patients: int = 6, per_patient: int = 8) -> dict:
    """Metrics of random logits on BreakHis-like records (patients, 2 magnifications)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([p % 2 for p in range(n_patients) for _ in range(per_patient)])
    logits = torch.randn(len(labels), 2, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, 2)
    recs = [Record(None, int(y), f"SOB_{'BM'[int(y)]}_A-14-{i // per_patient}", {"magnification": (40, 100)[i % 2]})
            for i, y in enumerate(labels)]
    return evaluate_predictions(logits, labels, recs, CLASSES, resamples=200)


def make_run(root: Path, name: str = "tiny", distill: bool = True) -> Path:
    run = root / name
    cfg = ExperimentConfig.model_validate({"name": name, "model": {"name": "resnet8"}, "data": {"image_size": IMAGE_SIZE},
                                           "output": {"dir": str(root)}})
    save_resolved_config(cfg, run, DistContext())
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=2)
    save_model_file(run / "model.pt", model, arch="resnet8", num_classes=2, classes=CLASSES, mean=MEAN, std=STD,
                    image_size=IMAGE_SIZE, extra={"method": "kd"})
    rows = [{"phase": ph, "epoch": e, "step": 4 * (i + 1), "lr": 0.05 / (i + 1), "train_loss": 1.0 / (i + 1),
             "train_ce": 0.6 / (i + 1), "train_kd": 0.4 / (i + 1), "epoch_time_s": 0.1, "img_s": 100.0,
             "val_acc": 0.5 + 0.05 * i, "val_loss": 0.7 - 0.02 * i, "global_epoch": i}
            for i, (ph, e) in enumerate([("stage1", 0), ("stage1", 1), ("stage2", 0), ("stage2", 1)])]
    with (run / "log.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    metrics = {"run": str(run), "method": "kd" if distill else "supervised", "student": "resnet8",
               "checkpoint": "model.pt (best on val)", "val": fake_split(1), "test": fake_split(2)}
    if distill:
        prof = {"params": 78000, "macs": 3_000_000, "size_bytes": 320_000, "ms_b1": 1.5, "ms_b64": 20.0}
        metrics["teachers"] = [{"name": "resnet32x4", "val": fake_split(3), "test": fake_split(4)},
                               {"name": "vgg13", "val": fake_split(5), "test": fake_split(6)}]
        metrics["ensemble"] = {"fusion": "accuracy", "val": fake_split(7), "test": fake_split(8)}
        metrics["latency"] = {"student": prof,
                              "teachers": [{**prof, "name": "resnet32x4", "ms_b1": 9.0}, {**prof, "name": "vgg13", "ms_b1": 5.0}],
                              "ensemble": {**prof, "ms_b1": 14.5}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    return make_run(tmp_path)
