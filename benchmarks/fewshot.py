"""Few-shot distillation on synthetic histology, patient split (issue 12 item 7).

    python benchmarks/fewshot.py [--root runs/histology] [--jobs 2] [overrides of the study ...]

From scratch: generates the synthetic tree of ``benchmarks/studies/fewshot_histology.yaml`` (800
patients with 2..10 images each, so patient recognition rate and image accuracy differ; 160 test
patients, about 950 test images), trains its teachers (resnet20, resnet32) on the whole train split, then runs the study
through ``graftkd compare`` (6 methods x 25 shots x 10 seeds, one optimiser-step budget) and
writes ``benchmarks/results/fewshot.json`` (rows ``{method, shots, seeds, values, mean, sd, steps,
patient_recognition_rate}``, with the code revision and the command). The 10-shot table:

    python benchmarks/fewshot.py --results benchmarks/results/fewshot_10shot.json 'shots=[10]'
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "studies" / "fewshot_histology.yaml"
RESULTS = ROOT / "benchmarks" / "results"
TEACHERS = ("resnet20", "resnet32")


def histology_overrides(root: Path) -> list[str]:
    return [f"data.root={root / 'data'}"] + [
        f"teachers.{k}.checkpoint={root / 'teachers' / f'teacher_{arch}' / 'model.pt'}" for k, arch in enumerate(TEACHERS)]


def train_teachers(root: Path, study: Path = STUDY, epochs: int = 15, archs: tuple[str, ...] = TEACHERS) -> None:
    """Supervised teachers ``archs`` on the whole training split of the study's data, selected on validation."""
    from graftkd.config import deep_merge, validate_config
    from graftkd.experiment import execute

    data = {**yaml.safe_load(study.read_text())["data"], "root": str(root / "data"), "batch_size": 64}
    torch.set_num_threads(1)
    for arch in archs:
        out = root / "teachers"
        if (out / f"teacher_{arch}" / "model.pt").is_file():
            continue
        cfg = validate_config(deep_merge({"data": data}, {
            "name": f"histology_teacher_{arch}", "method": {"name": "supervised"}, "model": {"name": arch},
            "optimizer": {"name": "sgd", "lr": 0.05, "nesterov": True, "weight_decay": 5e-4},
            "schedule": {"name": "cosine"},
            "trainer": {"epochs": epochs, "eval_every": 1, "progress": False, "threads": 1, "device": "cpu"},
            "output": {"dir": str(out), "name": f"teacher_{arch}", "tensorboard": False}}), "histology teacher")
        execute(cfg, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    from fewshot_digits import study_main

    return study_main(__doc__, "benchmarks/fewshot.py", STUDY, RESULTS / "fewshot.json", Path("runs/histology"),
                      train_teachers, histology_overrides, argv)


if __name__ == "__main__":
    sys.exit(main())
