"""KD genuinely helps with scarce labels: a student that sees 4 labelled images per class learns
more from a teacher trained on 400 images than from the labels alone (3 seeds, validation-selected)."""
from pathlib import Path

import torch

from graftkd.config import ExperimentConfig, TeacherConfig
from graftkd.data.types import DataBundle
from graftkd.distributed import DistContext
from graftkd.engine.trainer import Trainer
from graftkd.methods.base import METHODS
from graftkd.models import create_model
from tests.teachers.toydata import MEAN, STD, ToyImages, save_teacher

CLASSES = ["c0", "c1", "c2"]
COMMON = {"optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0}, "schedule": {"name": "constant"},
          "output": {"tensorboard": False}}


def _bundle(n_train: int, seed: int) -> DataBundle:
    return DataBundle(train=ToyImages(n_train, seed), val=ToyImages(60, 1000, augment=False),
                      test=ToyImages(60, 2000, augment=False), classes=CLASSES, mean=MEAN, std=STD, image_size=16)


def _fit(tmp: Path, cfg: ExperimentConfig, data: DataBundle):
    method = METHODS.get(cfg.method.name)(cfg, data, build_student=lambda: create_model("resnet8", 3),
                                          run_dir=tmp / cfg.name, device=torch.device("cpu"), dist=DistContext())
    result = Trainer(cfg, tmp / cfg.name, torch.device("cpu")).fit(method, data.train, data.val)
    return method, result.best_metric


def test_kd_beats_the_same_student_without_teacher(tmp_path):
    teacher_cfg = ExperimentConfig(name="teacher", seed=0, data={"batch_size": 32},
                                   trainer={"epochs": 5, "progress": False}, **COMMON)
    teacher, teacher_acc = _fit(tmp_path, teacher_cfg, _bundle(400, 77))
    assert teacher_acc >= 0.9
    path = save_teacher(tmp_path / "teacher.pt", teacher.model, "resnet8", CLASSES)
    accs: dict[str, list[float]] = {"supervised": [], "kd": []}
    for seed in range(3):
        for name in accs:
            method = {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9} if name == "kd" else {}
            cfg = ExperimentConfig(name=f"{name}{seed}", seed=seed, data={"batch_size": 16},
                                   teachers=[TeacherConfig(checkpoint=path)] if name == "kd" else [],
                                   method=method or {"name": "supervised"},
                                   trainer={"epochs": 30, "progress": False}, **COMMON)
            accs[name].append(_fit(tmp_path, cfg, _bundle(12, 10 + seed))[1])
    kd, scratch = sum(accs["kd"]) / 3, sum(accs["supervised"]) / 3
    print(f"val acc over 3 seeds: kd {accs['kd']} mean {kd:.3f}; supervised {accs['supervised']} mean {scratch:.3f}")
    assert kd > scratch + 0.05, accs
