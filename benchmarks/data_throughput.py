"""Data pipeline against training at BreakHis resolution (issue 14): 700x460 PNGs, ``histology``
augmentation at 224 px, resnet18 student (timm) trained under bf16 autocast, channels_last, on CPU.

Measured in interleaved rounds (one of each per round, medians and per-round ratios reported):

- ``train_224_img_s``: resnet18 forward + backward + SGD on ready 224 px tensors, every core;
- ``pipeline_224_img_s``: decode PNG -> uint8 -> base image -> augment, through the trainer's
  DataLoader (``make_loader``, ``EpochSampler``) with one worker per core, no cache;
- ``cached_224_img_s``: the same from the uint8 memory-mapped decoded cache (``decoded_cache: mmap``);
- ``pipeline_1w_img_s`` / ``cached_1w_img_s``: one worker's rate (in-process, one thread): what a
  GPU's data feed scales from;
- ``fed_train_224_img_s``: training fed by the no-cache pipeline (workers and training share the
  cores, as in a real run); ``fed_over_train`` near 1 means the trainer does not wait for data.

    python benchmarks/data_throughput.py [--patients 8 --images-per-patient 4] [--rounds 3]

The tree is generated once under ``--work`` (runs/.synthetic by default). Writes
benchmarks/results/data_throughput.json.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from graftkd.study import code_revision
from graftkd.config import SyntheticConfig
from graftkd.data.breakhis import read_breakhis
from graftkd.data.datasets import FileDataset
from graftkd.data.loaders import EpochSampler, make_loader
from graftkd.data.synthetic import ensure_tree, tree_key
from graftkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, base_side, eval_transform, train_transform
from graftkd.files import atomic_write_json
from graftkd.models import create_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_throughput.json"


class Student:
    """resnet18 training step under bf16 autocast, channels_last (what the trainer runs on this CPU)."""

    def __init__(self, arch: str, dtype: torch.dtype | None) -> None:
        self.model = create_model(arch, num_classes=2).to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.dtype = dtype

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            loss = nn.functional.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def train_rate(student: Student, size: int, batch: int, steps: int) -> float:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.arange(batch) % 2
    t = time.perf_counter()
    for _ in range(steps):
        student.step(x, y)
    return batch * steps / (time.perf_counter() - t)


def loader_rate(ds: FileDataset, epoch: int, batch: int, workers: int, student: Student | None = None) -> float:
    """Images/s of one epoch through the trainer's loader (worker start-up included, as in training);
    with ``student``, each batch is also trained on."""
    ds.set_epoch(epoch)
    sampler = EpochSampler(len(ds), seed=0, shuffle=True)
    sampler.set_epoch(0, epoch)
    n = 0
    t = time.perf_counter()
    for b in make_loader(ds, batch, sampler, workers, drop_last=False):
        if student is not None:
            student.step(b["image"], b["label"])
        n += len(b["label"])
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--images-per-patient", type=int, default=4, help="per magnification (4 magnifications)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers (default: one per core)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the training step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / ".synthetic")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/data_throughput.py", *(argv if argv is not None else sys.argv[1:])])
    revision = code_revision()["commit"]
    syn = SyntheticConfig(patients=args.patients, images_per_patient=args.images_per_patient, size=(700, 460), seed=0)
    t = time.perf_counter()
    tree = ensure_tree(args.work / tree_key(syn), syn)
    gen_s = time.perf_counter() - t
    records, _ = read_breakhis(tree, "binary", "all", "error")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    aug, ev = train_transform("histology", args.image_size, mean, std), eval_transform(args.image_size, mean, std)
    side = base_side(args.image_size)
    student = Student(args.arch, torch.bfloat16 if args.precision == "bf16" else None)
    torch.set_num_threads(args.threads)
    train_rate(student, args.image_size, args.batch, 1)  # warm-up (oneDNN primitives)
    keys = ("train_224_img_s", "pipeline_224_img_s", "cached_224_img_s", "pipeline_1w_img_s", "cached_1w_img_s",
            "fed_train_224_img_s")
    rounds: dict[str, list[float]] = {k: [] for k in keys}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="graftkd-bench-") as tmp:
        plain = FileDataset(records, aug, ev, seed=0, side=side, cache="none")
        cached = FileDataset(records, aug, ev, seed=0, side=side, cache="mmap", cache_dir=Path(tmp))
        t = time.perf_counter()
        for i in range(len(cached)):
            cached.base(i)  # fill the cache (what the first epoch of a run does)
        fill = len(cached) / (time.perf_counter() - t)
        for r in range(args.rounds):
            epoch = 1 + r
            torch.set_num_threads(args.threads)
            rounds["train_224_img_s"].append(train_rate(student, args.image_size, args.batch, args.train_steps))
            rounds["pipeline_224_img_s"].append(loader_rate(plain, epoch, args.batch, args.workers))
            rounds["cached_224_img_s"].append(loader_rate(cached, epoch, args.batch, args.workers))
            torch.set_num_threads(1)  # one worker = one thread
            rounds["pipeline_1w_img_s"].append(loader_rate(plain, epoch, args.batch, 0))
            rounds["cached_1w_img_s"].append(loader_rate(cached, epoch, args.batch, 0))
            torch.set_num_threads(args.threads)
            rounds["fed_train_224_img_s"].append(loader_rate(plain, epoch, args.batch, args.workers, student))
            load.append(os.getloadavg()[0])
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rounds.items()), file=sys.stderr, flush=True)
    train = rounds["train_224_img_s"]
    ratio = {name: [a / b for a, b in zip(rounds[key], train)] for name, key in (
        ("pipeline_over_train", "pipeline_224_img_s"), ("cached_over_train", "cached_224_img_s"),
        ("fed_over_train", "fed_train_224_img_s"))}
    med = {k: round(statistics.median(v), 1) for k, v in rounds.items()}
    cached_1w = med["cached_1w_img_s"]
    result = {
        **med, **{k: round(statistics.median(v), 2) for k, v in ratio.items()},
        "per_round": {k: [round(x, 1) for x in v] for k, v in rounds.items()},
        "per_round_ratios": {k: [round(x, 2) for x in v] for k, v in ratio.items()},
        "gpu_2000_img_s_workers_from_cache": math.ceil(2000 / cached_1w),
        "gpu_2000_img_s_workers_from_png": math.ceil(2000 / med["pipeline_1w_img_s"]),
        "cache_fill_img_s": round(fill, 1), "images": len(records), "source_size": "700x460",
        "augment": f"histology@{args.image_size}", "decode_base_side": side,
        "train_model": f"{args.arch} ({args.precision} autocast, channels_last)", "batch": args.batch,
        "train_steps_per_round": args.train_steps, "workers": args.workers, "train_threads": args.threads,
        "rounds": args.rounds, "synth_generate_s": round(gen_s, 1), "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg_1m": [round(x, 2) for x in load],
        "torch": torch.__version__, "python": platform.python_version(), "revision": revision, "command": command,
    }
    atomic_write_json(args.out, result)
    print("| measure | images/s | / training |\n|---|---:|---:|")
    for k in keys:
        rel = {"pipeline_224_img_s": "pipeline_over_train", "cached_224_img_s": "cached_over_train",
               "fed_train_224_img_s": "fed_over_train"}.get(k)
        print(f"| {k} | {med[k]} | {result[rel] if rel else ''} |")
    print(f"\nload average {load}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
