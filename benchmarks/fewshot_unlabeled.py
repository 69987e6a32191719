"""The unlabelled rest of the training split as a transfer set (issue 24 item 5), on real digits.

    python benchmarks/fewshot_unlabeled.py [--root runs/digits] [--jobs 1] [overrides of the study ...]

Prepares the digits and their teachers as ``benchmarks/fewshot_digits.py`` does (the same folder is
reused), then runs ``benchmarks/studies/fewshot_unlabeled_digits.yaml`` through ``graftkd compare``
(kd, mt_kd and graft_fused, each with and without ``data.unlabeled: train_rest``, at 5 and 10 labels
per class, 5 seeds, one optimiser-step budget) and writes ``benchmarks/results/fewshot_unlabeled.json``.
Synthetic histology is not part of it (the CPU budget of the session covered one data set fully).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fewshot_digits import RESULTS, ROOT, digits_overrides, prepare_all, study_main  # noqa: E402

STUDY = ROOT / "benchmarks" / "studies" / "fewshot_unlabeled_digits.yaml"


def main(argv: list[str] | None = None) -> int:
    return study_main(__doc__, "benchmarks/fewshot_unlabeled.py", STUDY, RESULTS / "fewshot_unlabeled.json",
                      Path("runs/digits"), prepare_all, digits_overrides, argv)


if __name__ == "__main__":
    sys.exit(main())
