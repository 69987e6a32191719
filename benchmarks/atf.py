"""ATF against offline KD, offline-joint and online peers, on real digits and synthetic histology.

    python benchmarks/atf.py [--digits-root runs/digits] [--histology-root runs/histology] [--jobs 2]

Prepares both data sets and their teachers exactly as ``fewshot_digits.py`` and ``fewshot.py`` do,
then runs ``benchmarks/studies/atf_digits.yaml`` and ``atf_histology.yaml`` through ``graftkd
compare`` (ATF's few-shot preset in modes atf, offline_joint and online, and offline KD = the ``kd``
method with the same frozen teacher and student loss; 5 shots per class on digits, 10 on the binary
histology; 5 seeds; one optimiser-step budget; Δ against kd). The studies share the few-shot studies'
folders, so their atf and kd runs are those of the few-shot studies. Writes ``benchmarks/results/atf.json``:
``{"revision", "command", "studies": {"digits": <compare JSON>, "histology": <compare JSON>}}``.

``--tuning`` runs the validation design studies instead (``benchmarks/studies/tuning/atf_*.yaml``:
variants of the few-shot preset in the same folders, so paired with the same kd runs) and writes
``benchmarks/results/atf_tuning_paired.json`` in the same layout; the preset is chosen on their
validation columns.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fewshot  # noqa: E402
import fewshot_digits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from graftkd.files import atomic_write_json
    from graftkd.study import code_revision, compare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits-root", type=Path, default=Path("runs/digits"))
    p.add_argument("--histology-root", type=Path, default=Path("runs/histology"))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", choices=("digits", "histology"), help="run one of the two studies (the other is "
                                                                   "kept from the existing atf.json)")
    p.add_argument("--methods", nargs="+", help="only these methods of the studies (the same runs)")
    p.add_argument("overrides", nargs="*", help="overrides of both studies (e.g. seeds=[0,1,2])")
    p.add_argument("--tuning", action="store_true",
                   help="run the validation design studies instead (benchmarks/studies/tuning/atf_*.yaml: "
                        "variants of the few-shot preset, paired with kd); default --out atf_tuning_paired.json")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.out = args.out or ROOT / "benchmarks" / "results" / ("atf_tuning_paired.json" if args.tuning else "atf.json")
    folder = Path("benchmarks/studies/tuning" if args.tuning else "benchmarks/studies")
    command = shlex.join(["python", "benchmarks/atf.py", *(sys.argv[1:] if argv is None else argv)])
    previous = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    studies = previous.get("studies", {}) if isinstance(previous, dict) else {}  # (older layout: a list)
    if args.only in (None, "digits"):
        fewshot_digits.prepare_all(args.digits_root)
        studies["digits"] = compare(folder / "atf_digits.yaml",
                                    fewshot_digits.digits_overrides(args.digits_root) + args.overrides, args.jobs, None,
                                    command, methods=args.methods)
    if args.only in (None, "histology"):
        fewshot.train_teachers(args.histology_root)
        studies["histology"] = compare(folder / "atf_histology.yaml",
                                       fewshot.histology_overrides(args.histology_root) + args.overrides, args.jobs,
                                       None, command, methods=args.methods)
    atomic_write_json(args.out, {"revision": code_revision()["commit"], "command": command, "studies": studies})
    return 0


if __name__ == "__main__":
    sys.exit(main())
