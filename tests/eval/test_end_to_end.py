"""A real (tiny) distillation run on synthetic histology, then evaluate, report, export, predict."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from graftkd.cli import main
from graftkd.config import validate_config
from graftkd.experiment import execute


def test_run_evaluate_report_export_predict(tmp_path: Path) -> None:
    data = {"source": "synthetic", "image_size": 16, "batch_size": 8,
            "split": {"kind": "fraction", "train": 0.5, "val": 0.25, "test": 0.25, "seed": 0},
            "synthetic": {"patients": 8, "images_per_patient": 2, "size": [24, 24], "magnifications": [40, 100]}}
    common = {"data": data, "trainer": {"progress": False, "device": "cpu", "epochs": 1},
              "output": {"dir": str(tmp_path), "tensorboard": False}}
    execute(validate_config({**common, "name": "t", "model": {"name": "resnet8"}}))
    run = execute(validate_config({**common, "name": "kd", "model": {"name": "resnet8"}, "method": {"name": "kd"},
                                   "teachers": [{"name": "resnet8", "checkpoint": str(tmp_path / "t" / "model.pt")}]}))
    before = json.loads((run / "metrics.json").read_text())
    assert set(before["test"]["by_magnification"]) == {"40", "100"} and before["test"]["n_patients"] == 2

    assert main(["evaluate", str(run), "--split", "val", "test", "--latency", "--repeats", "1"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert metrics[split]["checkpoint"] == str(run / "model.pt") and metrics[split]["split"] == split
        assert metrics[split]["accuracy"] == before[split]["accuracy"]  # same data and weights, same numbers
    assert [t["name"] for t in metrics["latency"]["teachers"]] == ["resnet8"]
    assert metrics["latency"]["ensemble"]["params"] == metrics["latency"]["student"]["params"]
    assert metrics["teachers"][0]["test"]["n"] == metrics["test"]["n"]

    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "accuracy versus latency" in html

    assert main(["export", str(run), "--format", "safetensors", "onnx", "--onnx-exporter", "legacy"]) == 0
    images = next((tmp_path / ".synthetic").iterdir())
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run / "student.safetensors"), str(images), "--out", str(out)]) == 0
    with (tmp_path / "pred_patients.csv").open(newline="") as f:
        patients = list(csv.DictReader(f))
    assert len(patients) == 8 and {p["n_images"] for p in patients} == {"4"}  # 2 images x 2 magnifications
