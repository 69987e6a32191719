"""Few-shot distillation across network families (issue 22 item 6): digits at 64 px, timm teachers.

    python benchmarks/fewshot_families.py [--root runs/digits] [--jobs 1] [overrides of the study ...]

Prepares the digits (``digits_data.prepare``, 32 px PNGs read at 64 px), trains the teachers resnet10t and
efficientnet_b0 (timm, random init) on the whole train split at 64 px, then runs
``benchmarks/studies/fewshot_families.yaml`` through ``graftkd compare`` (8 methods x 5 and 10 shots x 5
seeds, one optimiser-step budget, 1 thread per run) and writes ``benchmarks/results/fewshot_families.json``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import data_overrides, prepare  # noqa: E402
from fewshot_digits import RESULTS, ROOT, study_main  # noqa: E402

STUDY = ROOT / "benchmarks" / "studies" / "fewshot_families.yaml"
TEACHERS = ("resnet10t", "efficientnet_b0")
TEACHER_DIR = "teachers64"


def train_teacher64(manifest: Path, out: Path, arch: str, epochs: int) -> Path:
    """A timm teacher from random init on the full train split at 64 px, selected on validation."""
    from graftkd.config import load_config
    from graftkd.experiment import execute

    model = out / f"teacher_{arch}" / "model.pt"
    if model.is_file():
        return model
    cfg = load_config(None, data_overrides(manifest) + [
        "data.image_size=64", "name=digits_teacher64", "method={name: supervised}", f"model.name={arch}",
        "data.batch_size=64", "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.nesterov=true",
        "optimizer.weight_decay=5e-4", "schedule.name=cosine", f"trainer.epochs={epochs}", "trainer.eval_every=1",
        "trainer.threads=1", "trainer.progress=false", "output.tensorboard=false", f"output.dir={out}",
        f"output.name=teacher_{arch}"])
    execute(cfg, overwrite=True)
    return model


def prepare_all(root: Path, teacher_epochs: int = 15) -> None:
    manifest = prepare(root)
    torch.set_num_threads(1)
    for arch in TEACHERS:
        train_teacher64(manifest, root / TEACHER_DIR, arch, teacher_epochs)


def overrides(root: Path) -> list[str]:
    ckpt = {arch: root / TEACHER_DIR / f"teacher_{arch}" / "model.pt" for arch in TEACHERS}
    return [f"data.root={root / 'manifest.csv'}"] + [
        f"teachers.{k}.checkpoint={ckpt[arch]}" for k, arch in enumerate(TEACHERS)] + [
        f"methods.kd.teachers.0.checkpoint={ckpt['resnet10t']}"]


def main(argv: list[str] | None = None) -> int:
    return study_main(__doc__, "benchmarks/fewshot_families.py", STUDY, RESULTS / "fewshot_families.json",
                      Path("runs/digits"), prepare_all, overrides, argv)


if __name__ == "__main__":
    sys.exit(main())
