"""Few-shot distillation on synthetic histology, patient split (issue 12 item 7).

    python benchmarks/fewshot.py [--root runs/histology] [--jobs 2] [overrides of the study ...]

From scratch: generates the synthetic tree of ``benchmarks/studies/fewshot_histology.yaml`` (240
patients with 2..10 images each, so patient recognition rate and image accuracy differ; 48 test
patients), trains its teachers (resnet20, resnet32) on the whole train split, then runs the study
through ``graftkd compare`` (6 methods x 5 and 10 shots x 5 seeds, one optimiser-step budget) and
writes ``benchmarks/results/fewshot.json`` (rows ``{method, shots, seeds, values, mean, sd, steps,
patient_recognition_rate}``, with the code revision and the command).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "studies" / "fewshot_histology.yaml"
RESULTS = ROOT / "benchmarks" / "results"
TEACHERS = ("resnet20", "resnet32")


def histology_overrides(root: Path) -> list[str]:
    return [f"data.root={root / 'data'}"] + [
        f"teachers.{k}.checkpoint={root / 'teachers' / f'teacher_{arch}' / 'model.pt'}" for k, arch in enumerate(TEACHERS)]


def train_teachers(root: Path, study: Path = STUDY, epochs: int = 15) -> None:
    """Supervised teachers on the whole training split of the study's data, selected on validation."""
    from graftkd.config import deep_merge, validate_config
    from graftkd.experiment import execute

    data = {**yaml.safe_load(study.read_text())["data"], "root": str(root / "data"), "batch_size": 64}
    torch.set_num_threads(1)
    for arch in TEACHERS:
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
    from graftkd.study import compare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("runs/histology"), help="synthetic tree and teachers")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (1 thread each)")
    p.add_argument("--study", type=Path, default=STUDY.relative_to(ROOT))
    p.add_argument("--results", type=Path, default=RESULTS / "fewshot.json")
    p.add_argument("--methods", nargs="+", help="only these methods of the study (the same runs)")
    p.add_argument("overrides", nargs="*", help="overrides of the study (e.g. seeds=[0,1])")
    args = p.parse_args(argv)
    train_teachers(args.root, args.study)
    command = shlex.join(["python", "benchmarks/fewshot.py", *(sys.argv[1:] if argv is None else argv)])
    compare(args.study, histology_overrides(args.root) + args.overrides, args.jobs, args.results, command,
            methods=args.methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
