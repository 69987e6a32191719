"""Few-shot distillation on real images: scikit-learn's handwritten digits (issue 12 item 7).

    python benchmarks/fewshot_digits.py [--root runs/digits] [--jobs 2] [overrides of the study ...]

From scratch: writes the digits as 32 px PNGs with a fixed split (600 test, 300 val; ``digits_data.prepare``),
trains the two teachers (resnet20, resnet8x4) on the whole train split, then runs the study
``benchmarks/studies/fewshot_digits.yaml`` through ``graftkd compare`` (6 methods x 5 and 10 shots x
5 seeds, 300 optimiser steps each, 1 thread per run) and writes ``benchmarks/results/fewshot_digits.json``
(rows ``{method, shots, seeds, values, mean, sd, steps}``, accuracy as a fraction, with the code
revision and the command). Finished runs with the same resolved config and code revision are reused.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import TEACHERS, prepare, train_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "studies" / "fewshot_digits.yaml"
RESULTS = ROOT / "benchmarks" / "results"


def digits_overrides(root: Path) -> list[str]:
    """Study overrides that point the data and teachers at ``root``."""
    return [f"data.root={root / 'manifest.csv'}"] + [
        f"teachers.{k}.checkpoint={root / 'teachers' / f'teacher_{arch}' / 'model.pt'}" for k, arch in enumerate(TEACHERS)]


def prepare_all(root: Path, teacher_epochs: int = 30) -> None:
    manifest = prepare(root)
    torch.set_num_threads(1)
    for arch in TEACHERS:
        train_teacher(manifest, root / "teachers", arch, teacher_epochs)


def study_main(doc: str, script: str, study: Path, results: Path, root: Path, prepare, overrides,
               argv: list[str] | None) -> int:
    """The command line every few-shot benchmark shares: prepare data and teachers under ``--root``,
    then run the study through ``graftkd compare`` and write ``--results``."""
    from graftkd.study import compare

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--root", type=Path, default=root, help="data and teachers")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (1 thread each)")
    p.add_argument("--study", type=Path, default=study.relative_to(ROOT))
    p.add_argument("--results", type=Path, default=results)
    p.add_argument("--methods", nargs="+", help="only these methods of the study (the same runs)")
    p.add_argument("overrides", nargs="*", help="overrides of the study (e.g. seeds=[0,1])")
    args = p.parse_args(argv)
    prepare(args.root)
    command = shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])
    compare(args.study, overrides(args.root) + args.overrides, args.jobs, args.results, command, methods=args.methods)
    return 0


def main(argv: list[str] | None = None) -> int:
    return study_main(__doc__, "benchmarks/fewshot_digits.py", STUDY, RESULTS / "fewshot_digits.json",
                      Path("runs/digits"), prepare_all, digits_overrides, argv)


if __name__ == "__main__":
    sys.exit(main())
