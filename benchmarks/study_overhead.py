"""What a ``graftkd compare`` study costs beyond its training (issue 25): wall x jobs against the sum
of its runs' ``train_seconds``.

    python benchmarks/study_overhead.py [--root runs/digits] [--jobs 2] [--label after] [overrides ...]

Prepares the digits and their two teachers (``digits_data``), runs the study
``benchmarks/studies/study_overhead.yaml`` (4 methods x 5 seeds = 20 runs of 100 steps, 1 thread
each) from scratch (its folder is emptied first: nothing reused) and writes
``benchmarks/results/study_overhead.json``: ``runs``, ``train_seconds`` (the sum of every run's
``metrics.json`` ``train_seconds``), ``wall_seconds`` (the whole ``compare`` call: runs, statistics,
table, plot), ``jobs``, ``ratio = wall x jobs / train_seconds``, per-run seconds, the load average,
the command and the revision. ``--label before`` records the same measurement of an older revision
(run it with that revision's ``src`` on PYTHONPATH) under ``before`` in the same file.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import prepare, train_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "studies" / "study_overhead.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "study_overhead.json"
TEACHERS = ("resnet20", "resnet8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("runs/digits"), help="data and teachers")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/studies/study_overhead"), help="the study folder (emptied)")
    p.add_argument("--label", choices=["after", "before"], default="after")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("overrides", nargs="*", help="overrides of the study")
    args = p.parse_args(argv)
    from graftkd.files import atomic_write_json
    from graftkd.study import code_revision, compare

    manifest = prepare(args.root)
    import torch

    torch.set_num_threads(1)
    for arch in TEACHERS:
        train_teacher(manifest, args.root / "teachers", arch, args.teacher_epochs)
    overrides = [f"data.root={manifest}"] + [
        f"teachers.{k}.checkpoint={args.root / 'teachers' / f'teacher_{arch}' / 'model.pt'}" for k, arch in enumerate(TEACHERS)]
    if args.out.exists():
        shutil.rmtree(args.out)
    command = shlex.join(["python", "benchmarks/study_overhead.py", *(sys.argv[1:] if argv is None else argv)])
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(5.0):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    out = compare(STUDY, overrides + [f"out={args.out}"] + args.overrides, args.jobs,
                  command=command)
    wall = time.perf_counter() - t0
    done.set()
    per_run = [s for r in out["rows"] if not r.get("reference") and r["mean"] is not None for s in r["train_seconds"]]
    train = sum(per_run)
    entry = {"runs": len(per_run), "train_seconds": round(train, 1), "wall_seconds": round(wall, 1),
             "jobs": args.jobs, "ratio": round(wall * args.jobs / train, 3),
             "per_run_train_seconds": per_run, "failures": out["failures"], "steps": out["steps"],
             "load_average_1min": {"min": min(loads, default=None), "max": max(loads, default=None),
                                   "median": sorted(loads)[len(loads) // 2] if loads else None},
             "command": command, "revision": code_revision()["commit"], "cpu_count": os.cpu_count()}
    old = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if args.label == "before":
        result = {**old, "before": entry}
    else:
        result = {**entry, "before": old.get("before")}
    result["note"] = ("ratio = wall_seconds x jobs / train_seconds (train_seconds: the sum of the runs' "
                      "metrics.json train_seconds); the study folder starts empty, nothing is reused")
    atomic_write_json(args.results, result)
    print(json.dumps({k: v for k, v in entry.items() if k != "per_run_train_seconds"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
