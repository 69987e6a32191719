"""Cost of multi-teacher KD per epoch: live teachers versus the soft-target cache.

    python benchmarks/multi_teacher.py [--repeats 3] [--image-size 64] [--views 4] [--threads 1]
                                       [--work runs/bench_multi_teacher]
                                       [--out benchmarks/results/multi_teacher.json]

Seconds per training epoch (the trainer's ``epoch_time_s``: data, forward, backward, step; no
validation) of the same student on the same synthetic-histology training set, for: the student
alone (``supervised``), KD with 1, 2 and 4 live teachers, and KD with 4 teachers through the
soft-target cache (its one-off build time reported separately). Teachers are saved model files
with random weights (cost does not depend on the weights). Variants are measured interleaved, in a
rotating order, after one untimed warm-up round, so a shared CPU slows them alike; each ratio is the
median over repeats of (variant epoch time / student epoch time of the same round).
Writes ``--out`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from graftkd.config import ExperimentConfig, validate_config
from graftkd.distributed import DistContext
from graftkd.files import atomic_write_json
from graftkd.experiment import build_student_factory
from graftkd.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TEACHERS = ["resnet32x4", "wrn_40_2", "vgg13", "resnet56"]
VARIANTS = {"student": (0, False), "live_k1": (1, False), "live_k2": (2, False), "live_k4": (4, False),
            "cached_k4": (4, True)}


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seed": 0,
        "data": {"source": "synthetic", "image_size": args.image_size, "augment": "histology",
                 "batch_size": args.batch_size, "eval_batch_size": 64,
                 "synthetic": {"patients": args.patients, "images_per_patient": args.images_per_patient,
                               "size": [96, 96]}},
        "model": {"name": args.student},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "constant"},
        "trainer": {"epochs": 1, "device": "cpu", "progress": False, "threads": args.threads},
        "output": {"dir": str(args.work), "tensorboard": False},
    }


def variant_config(args: argparse.Namespace, name: str, teacher_files: list[Path]) -> ExperimentConfig:
    k, cached = VARIANTS[name]
    raw = base_config(args)
    raw["name"] = name
    if k:
        raw["method"] = {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
        raw["teachers"] = [{"checkpoint": str(f)} for f in teacher_files[:k]]
        raw["fusion"] = {"strategy": "accuracy", "tau": 0.05}
        raw["teacher_cache"] = {"enabled": cached, "views": args.views}
    return validate_config(raw, f"benchmark variant {name}")


def save_random_teachers(data: Any, folder: Path) -> list[Path]:
    from graftkd.models import create_model, save_model_file

    paths = []
    for arch in TEACHERS:
        path = folder / f"{arch}.pt"
        save_model_file(path, create_model(arch, data.num_classes), arch=arch, num_classes=data.num_classes,
                        classes=data.classes, mean=data.mean, std=data.std, image_size=data.image_size)
        paths.append(path)
    return paths


def epoch_seconds(cfg: ExperimentConfig, data: Any) -> tuple[float, float | None]:
    """(training epoch seconds, cache build seconds if the cache was built in this call)."""
    import graftkd.methods  # noqa: F401  registers the methods
    from graftkd.methods.base import METHODS

    data.train.views = None  # the cached variant's factory sets its own number of views
    device = torch.device("cpu")
    run_dir = cfg.run_dir
    method = METHODS.get(cfg.method.name)(cfg, data, build_student=build_student_factory(cfg, data.num_classes),
                                          run_dir=run_dir, device=device, dist=DistContext())
    cache = getattr(getattr(method, "targets", None), "cache", None)
    result = Trainer(cfg, run_dir, device).fit(method, data.train, data.val)
    return float(result.history[-1]["epoch_time_s"]), (cache.build_seconds if cache is not None and cache.built else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--images-per-patient", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--views", type=int, default=4, help="cached views per training image")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_multi_teacher")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multi_teacher.json")
    args = p.parse_args(argv)
    from graftkd.data import build_data

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    probe = variant_config(args, "student", [])
    data = build_data(probe.data, probe.seed, args.work)
    teacher_files = save_random_teachers(data, args.work / "teachers")
    configs = {name: variant_config(args, name, teacher_files) for name in VARIANTS}
    cache_dir = configs["cached_k4"].run_dir / "cache"
    for f in ("soft_targets.pt", "soft_targets.json"):  # measure a fresh build
        (cache_dir / f).unlink(missing_ok=True)

    names = list(VARIANTS)
    times: dict[str, list[float]] = {n: [] for n in names}
    build_s: float | None = None
    for r in range(args.repeats + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds, built = epoch_seconds(configs[name], data)
            build_s = built if built is not None else build_s
            if r:
                times[name].append(seconds)
            print(f"round {r}{' (warm-up)' if not r else ''} {name}: {seconds:.2f} s/epoch", file=sys.stderr, flush=True)

    ratios = {n: statistics.median(t / s for t, s in zip(times[n], times["student"])) for n in names}
    from graftkd.study import code_revision

    command = "python benchmarks/multi_teacher.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = {
        "student_s_per_epoch": statistics.median(times["student"]),
        "ratio_live_k1": ratios["live_k1"],
        "ratio_live_k2": ratios["live_k2"],
        "ratio_live_k4": ratios["live_k4"],
        "ratio_cached_k4": ratios["cached_k4"],
        "cache_build_s": build_s,
        "context": {
            "command": command.strip(), "revision": code_revision()["commit"],
            "student": args.student, "teachers": TEACHERS, "image_size": args.image_size,
            "train_images": len(data.train), "batch_size": args.batch_size, "views": args.views,
            "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "seconds_per_epoch": times,
            "note": "epoch_time_s of the trainer (no validation); ratios are medians of per-round ratios",
        },
    }
    atomic_write_json(args.out, result)
    rows = [("student alone", times["student"], 1.0)] + [
        (label, times[n], ratios[n]) for label, n in (("KD, 1 teacher live", "live_k1"), ("KD, 2 teachers live", "live_k2"),
                                                     ("KD, 4 teachers live", "live_k4"),
                                                     ("KD, 4 teachers cached", "cached_k4"))]
    print(f"\n`{result['context']['command']}` ({args.student} student, teachers {', '.join(TEACHERS)}, "
          f"{len(data.train)} training images at {args.image_size} px, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved rounds)\n")
    print("| variant | s/epoch | x student |\n|---|---:|---:|")
    for label, t, ratio in rows:
        print(f"| {label} | {statistics.median(t):.2f} | {ratio:.2f} |")
    print(f"| cache build (4 teachers, {args.views} views, once) | {build_s:.2f} | - |" if build_s is not None else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
