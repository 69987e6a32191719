"""Speed of the HED stain jitter at 224 px against the data pipeline's budget (issue 24 item 1).

    python benchmarks/stain_speed.py [--rounds 5] [--images 64]

One thread, in-process, on uint8 256 px base images (what the decoded cache holds at 224 px):
images/s of the ``histology`` and ``histology_stain`` augmentations (crop, flips, rotation, colour
jitter, [HED jitter], normalise), of ``HEDJitter`` alone and of ``hed_jitter`` on a batch of 32.
The budget is BENCHMARKS.md's data pipeline (``benchmarks/results/data_throughput.json``): the
resnet18 student trains at ``train_224_img_s`` on this CPU, one worker augments from the cache at
``cached_1w_img_s``. Medians over rounds. Writes benchmarks/results/stain_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from graftkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, HEDJitter, hed_jitter, train_transform
from graftkd.files import atomic_write_json
from graftkd.study import code_revision

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def rate(fn, images: list[torch.Tensor]) -> float:
    t = time.perf_counter()
    for im in images:
        fn(im)
    return len(images) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS / "stain_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 256, 340), dtype=torch.uint8, generator=g) for _ in range(args.images)]
    crops = [im[:, :224, :224].contiguous() for im in images]
    batch = torch.stack(crops[:32])
    alpha, beta = 1 + 0.05 * (2 * torch.rand(32, 3, generator=g) - 1), 0.05 * (2 * torch.rand(32, 3, generator=g) - 1)
    measures = {
        "histology_img_s": lambda: rate(train_transform("histology", 224, IMAGENET_MEAN, IMAGENET_STD), images),
        "histology_stain_img_s": lambda: rate(train_transform("histology_stain", 224, IMAGENET_MEAN, IMAGENET_STD),
                                              images),
        "hed_jitter_alone_img_s": lambda: rate(HEDJitter(0.05, 0.05), crops),
        "hed_jitter_batch32_img_s": lambda: 32 * args.images / 32 / max(1e-9, _timed(lambda: hed_jitter(batch, alpha, beta),
                                                                                   args.images // 32)),
    }
    rounds: dict[str, list[float]] = {k: [] for k in measures}
    for _ in range(args.rounds):
        for k, f in measures.items():
            rounds[k].append(round(f(), 1))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    budget = json.loads((RESULTS / "data_throughput.json").read_text())
    out = {
        **med, "per_round": rounds,
        "hed_jitter_ms_per_image": round(1000 / med["hed_jitter_alone_img_s"], 3),
        "stain_preset_cost_ratio": round(med["histology_img_s"] / med["histology_stain_img_s"], 3),
        "budget": {"train_224_img_s": budget["train_224_img_s"], "cached_1w_img_s": budget["cached_1w_img_s"],
                   "source": "benchmarks/results/data_throughput.json", "revision": budget["revision"]},
        "histology_stain_over_train": round(med["histology_stain_img_s"] / budget["train_224_img_s"], 1),
        "image": "uint8 3x256x340 base image (224 px training)", "threads": 1, "rounds": args.rounds,
        "images": args.images, "load_avg_1m": round(os.getloadavg()[0], 2),
        "revision": code_revision()["commit"],
        "command": " ".join(["python benchmarks/stain_speed.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    atomic_write_json(args.out, out)
    print(json.dumps({k: out[k] for k in (*med, "stain_preset_cost_ratio", "histology_stain_over_train")}, indent=1))
    return 0


def _timed(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
