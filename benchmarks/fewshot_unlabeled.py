"""The unlabelled rest of the training split as a transfer set (issue 24 item 5), on real digits.

    python benchmarks/fewshot_unlabeled.py [--root runs/digits] [--jobs 1] [overrides of the study ...]

Prepares the digits and their teachers as ``benchmarks/fewshot_digits.py`` does (the same folder is
reused), then runs ``benchmarks/studies/fewshot_unlabeled_digits.yaml`` through ``graftkd compare``
(kd, mt_kd and graft_fused, each with and without ``data.unlabeled: train_rest``, at 5 and 10 labels
per class, 5 seeds, one optimiser-step budget) and writes ``benchmarks/results/fewshot_unlabeled.json``.
To fit the shared CPU, the runs score a fixed subset of the digits' held-out images
(``manifest_unlabeled_study.csv``: every 3rd validation and every 2nd test image, 100 and 300; the
training rows, and so the teachers and the unlabelled pool, are those of ``manifest.csv``).
Synthetic histology is not part of it (the CPU budget of the session covered one data set fully).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fewshot_digits import RESULTS, ROOT, digits_overrides, prepare_all, study_main  # noqa: E402

STUDY = ROOT / "benchmarks" / "studies" / "fewshot_unlabeled_digits.yaml"


SMALL = "manifest_unlabeled_study.csv"


def prepare(root: Path) -> None:
    """Data and teachers as fewshot_digits.py, then the study's manifest: all training rows, every
    3rd validation row and every 2nd test row."""
    import csv

    prepare_all(root)
    with (root / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    seen = {"val": 0, "test": 0}
    keep = []
    for r in rows:
        if r["split"] in seen:
            seen[r["split"]] += 1
            if (seen[r["split"]] - 1) % (3 if r["split"] == "val" else 2):
                continue
        keep.append(r)
    with (root / SMALL).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)


def overrides(root: Path) -> list[str]:
    return [f"data.root={root / SMALL}", *digits_overrides(root)[1:]]


def main(argv: list[str] | None = None) -> int:
    return study_main(__doc__, "benchmarks/fewshot_unlabeled.py", STUDY, RESULTS / "fewshot_unlabeled.json",
                      Path("runs/digits"), prepare, overrides, argv)


if __name__ == "__main__":
    sys.exit(main())
