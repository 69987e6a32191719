"""Stain jitter and stain normalisation on an unseen centre (issue 24 item 3).

    python benchmarks/stain.py [--jobs 1] [overrides of the study ...]

Runs ``benchmarks/studies/stain_centres.yaml`` through ``graftkd compare`` in two passes: first the
four teachers (none, HED jitter, Macenko, both; 5 seeds each), then the whole study, whose KD
students distil from their variant's seed-0 teacher (the teachers' runs are reused). Writes
``benchmarks/results/stain.json``: per variant, test accuracy and patient recognition rate on the
unseen centre, per seed, with the command and the code revision.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = Path("benchmarks/studies/stain_centres.yaml")
RESULTS = ROOT / "benchmarks" / "results" / "stain.json"
VARIANTS = ("none", "jitter", "macenko", "both")


def merge_kd(results: Path, kd: Path) -> dict:
    """``results`` (the teachers' study) with the KD students' rows and paired differences of ``kd`` (a
    compare results JSON of the kd_* methods, run later at another revision): its rows and
    differences are added, and ``kd_rows`` records their command, revision, steps and seeds."""
    d, k = json.loads(results.read_text()), json.loads(kd.read_text())
    kd_rows = [r for r in k["rows"] if r["method"].startswith("kd_")]
    d["rows"] = [r for r in d["rows"] if not r["method"].startswith("kd_")] + kd_rows
    d["differences"] = [x for x in d["differences"] if not x["method"].startswith("kd_")] + k["differences"]
    d["kd_rows"] = {key: k[key] for key in ("command", "revision", "code", "steps", "seeds", "baseline")}
    d["kd_rows"]["teachers"] = "each variant's seed-0 teacher, retrained at the kd rows' revision"
    return d


def main(argv: list[str] | None = None) -> int:
    from graftkd.study import compare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=1, help="runs at once (1 thread each)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--merge-kd", type=Path, help="only merge this compare results JSON of the kd_* methods into "
                                                  "--results (whose teacher rows are kept)")
    p.add_argument("overrides", nargs="*", help="overrides of the study (e.g. seeds=[0,1])")
    args = p.parse_args(argv)
    if args.merge_kd is not None:
        from graftkd.files import atomic_write_json

        atomic_write_json(args.results, merge_kd(args.results, args.merge_kd))
        return 0
    command = shlex.join(["python", "benchmarks/stain.py", *(sys.argv[1:] if argv is None else argv)])
    compare(STUDY, args.overrides, args.jobs, None, command, methods=[f"teacher_{v}" for v in VARIANTS])
    compare(STUDY, args.overrides, args.jobs, args.results, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
