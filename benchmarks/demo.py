"""The demo as a benchmark: run ``graftkd demo`` and keep its summary with the code revision.

    python benchmarks/demo.py [--out runs/bench_demo] [--results benchmarks/results/demo.json]

Runs the full demo (``graftkd.demo.run_demo``, the same pipeline ``make demo`` runs) into ``--out``
and writes ``--results``: the demo's ``summary.json`` (rows, ranking by test accuracy, steps, wall
seconds) plus ``command`` (this script's) and ``revision`` (the commit the demo ran from).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from graftkd.demo import run_demo
    from graftkd.files import atomic_write_json
    from graftkd.study import code_revision

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench_demo"), help="folder for the demo's runs")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "demo.json")
    args = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/demo.py", *(sys.argv[1:] if argv is None else argv)])
    revision = code_revision()["commit"]
    rc = run_demo(out=args.out)
    if rc != 0:
        return rc
    summary = json.loads((args.out / "summary.json").read_text())
    atomic_write_json(args.results, {**summary, "demo_command": summary["command"], "command": command,
                                     "revision": revision})
    return 0


if __name__ == "__main__":
    sys.exit(main())
