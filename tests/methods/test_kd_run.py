"""A KD run end to end on synthetic histology: cache, logs, metrics.json, student-only model file."""
import csv
import json

import torch

from graftkd.config import validate_config
from graftkd.experiment import execute


def test_multi_teacher_kd_run_with_cache(tmp_path):
    base = {"seed": 0, "trainer": {"epochs": 1, "progress": False, "device": "cpu"},
            "output": {"dir": str(tmp_path), "tensorboard": False},
            "data": {"source": "synthetic", "image_size": 32, "batch_size": 16,
                     "synthetic": {"patients": 8, "images_per_patient": 2, "size": [48, 48],
                                   "magnifications": [40, 100]}}}
    teacher = execute(validate_config({**base, "name": "teacher", "model": {"name": "resnet8"}}))
    cfg = validate_config({**base, "name": "kd", "model": {"name": "resnet8"}, "method": {"name": "kd"},
                           "teachers": [{"checkpoint": str(teacher / "model.pt")},
                                        {"checkpoint": str(teacher / "model.pt"), "mean": [0.5] * 3, "std": [0.2] * 3}],
                           "fusion": {"strategy": "accuracy", "tau": 0.05},
                           "teacher_cache": {"enabled": True, "views": 2}})
    run = execute(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [t["checkpoint"] for t in metrics["teachers"]] == [str(teacher / "model.pt")] * 2
    for t in metrics["teachers"]:
        assert {"val_accuracy_used_for_fusion", "weight", "val", "test", "params"} <= set(t)
        assert t["val_accuracy_used_for_fusion"] == t["val"]["accuracy"]
    assert metrics["teachers"][0]["test"]["accuracy"] == json.loads((teacher / "metrics.json").read_text())["test"]["accuracy"]
    assert sum(t["weight"] for t in metrics["teachers"]) == 1.0
    assert {"val", "test"} <= set(metrics["ensemble"]) and metrics["fusion"]["strategy"] == "accuracy"
    assert metrics["params"]["student"] == metrics["params"]["teachers"][0]
    with open(run / "log.csv") as f:
        row = next(csv.DictReader(f))
    assert 0.0 <= float(row["train_agreement"]) <= 1.0 and "train_kd" in row
    manifest = json.loads((run / "cache" / "soft_targets.json").read_text())
    assert manifest["views"] == 2 and manifest["classes"] == ["benign", "malignant"]
    model = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    assert not any("teacher" in k or k.startswith("targets") for k in model)
    assert set(model) == set(torch.load(teacher / "model.pt", weights_only=True)["state_dict"])


def test_every_method_starts_from_the_same_student_for_one_seed():
    from graftkd.experiment import build_student_factory

    cfg = validate_config({"seed": 3, "name": "s", "model": {"name": "resnet8"},
                           "data": {"source": "synthetic"}})
    first = build_student_factory(cfg, 2)()
    torch.manual_seed(123)
    torch.randn(1000)  # a method that builds teachers first draws from the global RNG
    state = torch.random.get_rng_state()
    again = build_student_factory(cfg, 2)
    a, b = again(), again()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is left alone
    for k, v in first.state_dict().items():
        assert torch.equal(v, a.state_dict()[k]), k
    assert not torch.equal(a.conv1.weight, b.conv1.weight)  # a second student (DML peer) is another draw
    other = build_student_factory(validate_config({**cfg.model_dump(mode="json"), "seed": 4}), 2)()
    assert not torch.equal(a.conv1.weight, other.conv1.weight)
