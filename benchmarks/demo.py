"""The demo as a benchmark: run ``graftkd demo`` and keep its summary with the code revision.

    python benchmarks/demo.py [--out runs/bench_demo] [--results benchmarks/results/demo.json]

Runs the full demo (``graftkd.demo.run_demo``, the same pipeline ``make demo`` runs) into ``--out``
and writes ``--results``: the demo's ``summary.json`` (rows, ranking by test accuracy, steps, wall
seconds) plus ``command`` (this script's), ``revision`` (the commit the demo ran from) and the
1-minute load average sampled while it ran (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
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
    loads: list[float] = [os.getloadavg()[0]]
    done = threading.Event()

    def sample() -> None:  # the machine is shared: what else ran is part of the wall time
        while not done.wait(5.0):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample, daemon=True).start()
    rc = run_demo(out=args.out)
    done.set()
    if rc != 0:
        return rc
    summary = json.loads((args.out / "summary.json").read_text())
    atomic_write_json(args.results, {**summary, "demo_command": summary["command"], "command": command,
                                     "revision": revision, "cpu_count": os.cpu_count(),
                                     "load_average_1min": {"min": min(loads), "max": max(loads),
                                                           "median": sorted(loads)[len(loads) // 2]}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
