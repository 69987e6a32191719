"""Real-image benchmark data: scikit-learn's bundled handwritten digits as a 32 px CSV manifest.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-level scans (values 0..16) inside the
scikit-learn wheel, so nothing is downloaded. They are upsampled to 32 px (bilinear), written as
RGB PNGs under ``<root>/images/<class>/`` and listed in ``<root>/manifest.csv`` with a fixed,
class-stratified split column: 600 test, 300 validation, the rest (897) train. Teachers are trained
on the whole train split; few-shot students draw their N shots per class from it.

    python benchmarks/digits_data.py [--root runs/digits] [--teachers resnet20 resnet8x4]

prepares the data (idempotent) and trains the teachers into ``<root>/teachers/teacher_<arch>``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TEST, VAL = 600, 300
SPLIT_SEED = 0
TEACHERS = ("resnet20", "resnet8x4")


def prepare(root: Path) -> Path:
    """Write the images and ``manifest.csv`` (path,label,split) once; return the manifest path."""
    from sklearn.datasets import load_digits

    manifest = root / "manifest.csv"
    if manifest.is_file():
        return manifest
    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(SPLIT_SEED)
    split = np.full(len(labels), "train", dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(TEST * len(idx) / len(labels))
        n_val = round(VAL * len(idx) / len(labels))
        split[idx[:n_test]] = "test"
        split[idx[n_test:n_test + n_val]] = "val"
    rows = []
    for i, (img, label) in enumerate(zip(images, labels)):
        grey = Image.fromarray(np.uint8(np.round(img * (255 / 16)))).resize((32, 32), Image.BILINEAR)
        rel = Path("images") / str(label) / f"{i:04d}.png"
        (root / rel.parent).mkdir(parents=True, exist_ok=True)
        grey.convert("RGB").save(root / rel)
        rows.append({"path": rel.as_posix(), "label": int(label), "split": split[i]})
    tmp = manifest.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(manifest)
    return manifest


def data_overrides(manifest: Path) -> list[str]:
    """The ``data.*`` overrides every digits run shares (CSV source, predefined split, 32 px)."""
    return ["data.source=csv", f"data.root={manifest}", "data.split.kind=predefined", "data.image_size=32",
            "data.augment=cifar", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]


def train_teacher(manifest: Path, out: Path, arch: str, epochs: int = 30, steps: int | None = None,
                  extra: list[str] | tuple[str, ...] = ()) -> Path:
    """Supervised teacher on the full train split, selected on validation; returns its model.pt.
    ``steps``: the run's length in optimiser steps instead of ``epochs``; ``extra``: further
    overrides, applied last (e.g. a smaller ``data.image_size`` for the tests)."""
    from graftkd.config import load_config
    from graftkd.experiment import execute

    model = out / f"teacher_{arch}" / "model.pt"
    if model.is_file():
        return model
    length = f"trainer.steps={steps}" if steps is not None else f"trainer.epochs={epochs}"
    cfg = load_config(None, data_overrides(manifest) + [
        "name=digits_teacher", "method={name: supervised}", f"model.name={arch}", "data.batch_size=64",
        "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.nesterov=true", "optimizer.weight_decay=5e-4",
        "schedule.name=cosine", length, "trainer.eval_every=1", "trainer.progress=false",
        "output.tensorboard=false", f"output.dir={out}", f"output.name=teacher_{arch}", *extra])
    execute(cfg, overwrite=True)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "digits")
    p.add_argument("--teachers", nargs="*", default=list(TEACHERS))
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args(argv)
    manifest = prepare(args.root)
    for arch in args.teachers:
        train_teacher(manifest, args.root / "teachers", arch, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
