"""Data throughput: decode + augment of 700x460 PNGs without and with the decoded cache, and the
training throughput of the demo student, on this machine's CPU.

    python benchmarks/data_throughput.py [--patients 8 --images-per-patient 5] [--data-threads 1]

Writes benchmarks/results/data_throughput.json (decode_img_s, cached_img_s, train_img_s + context)
and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from graftkd.config import SyntheticConfig
from graftkd.data.breakhis import read_breakhis
from graftkd.data.datasets import FileDataset, ViewDatasetBase
from graftkd.data.synthetic import generate_tree
from graftkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, base_side, eval_transform, train_transform
from graftkd.files import atomic_write_json
from graftkd.models import create_model

RESULTS = Path(__file__).resolve().parent / "results" / "data_throughput.json"


def epoch_rate(ds: ViewDatasetBase, epoch: int) -> float:
    """Images per second for one pass over ``ds`` (decode + augment, main process)."""
    ds.set_epoch(epoch)
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - t)


def train_rate(size: int, batch: int, steps: int) -> float:
    """Images per second of resnet8 training steps (forward + backward + SGD) on CPU."""
    model = create_model("resnet8", num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.arange(batch) % 2

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--images-per-patient", type=int, default=5, help="per magnification (4 magnifications)")
    p.add_argument("--image-size", type=int, default=224, help="augmentation output size")
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data-threads", type=int, default=1, help="torch threads for decode+augment (1: as in a DataLoader worker)")
    p.add_argument("--train-threads", type=int, default=os.cpu_count(), help="torch threads for the training step")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.data_threads)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    with tempfile.TemporaryDirectory(prefix="graftkd-bench-") as tmp:
        tree = Path(tmp) / "tree"
        t = time.perf_counter()
        generate_tree(tree, SyntheticConfig(patients=args.patients, images_per_patient=args.images_per_patient,
                                            size=(700, 460), seed=0))
        gen_s = time.perf_counter() - t
        records, _ = read_breakhis(tree, "binary", "all", "error")
        aug = train_transform("histology", args.image_size, mean, std)
        ev = eval_transform(args.image_size, mean, std)
        side = base_side(args.image_size)
        plain = FileDataset(records, aug, ev, seed=0, side=side, cache="none")
        decode = epoch_rate(plain, 0)
        cached_ds = FileDataset(records, aug, ev, seed=0, side=side, cache="memory")
        first = epoch_rate(cached_ds, 0)
        cached = epoch_rate(cached_ds, 1)
    torch.set_num_threads(args.train_threads)
    train = train_rate(args.train_size, args.batch, args.steps)
    result = {
        "decode_img_s": round(decode, 1),
        "cached_img_s": round(cached, 1),
        "train_img_s": round(train, 1),
        "cache_fill_img_s": round(first, 1),
        "images": len(records), "source_size": "700x460", "augment": f"histology@{args.image_size}",
        "decode_base_side": side, "train_model": "resnet8 (graftkd.models.create_model)",
        "train_input": f"{args.batch}x3x{args.train_size}x{args.train_size}", "train_steps": args.steps,
        "synth_generate_s": round(gen_s, 1), "data_threads": args.data_threads, "train_threads": args.train_threads,
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
        "torch": torch.__version__, "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/data_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    atomic_write_json(args.out, result)
    print("| measure | images/s |\n|---|---:|")
    print(f"| decode + augment, no cache ({len(records)} PNGs 700x460 -> histology {args.image_size}) | {decode:.1f} |")
    print(f"| decode + augment, first epoch filling the memory cache | {first:.1f} |")
    print(f"| augment from the decoded cache (second epoch) | {cached:.1f} |")
    print(f"| train resnet8 at {args.train_size} px, batch {args.batch} (fwd+bwd+SGD) | {train:.1f} |")
    print(f"\ndata threads {args.data_threads}, train threads {args.train_threads}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
