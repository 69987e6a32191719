"""Demo-sized latency comparison: three CIFAR-family teachers run together (the ensemble) versus
one student, at 64 px with 2 classes (random weights: latency does not depend on them).

    python benchmarks/latency.py [--threads 2] [--repeats 20] [--warmup 2] [--out benchmarks/results/latency.json]

Writes the JSON (student_ms_b1, ensemble_ms_b1, student_ms_b64, ensemble_ms_b64, speedup_b64 plus
per-network profiles and context) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from graftkd.files import atomic_write_json
from graftkd.eval.latency import profile_model
from graftkd.models import create_model

TEACHERS = ("resnet32x4", "wrn_40_2", "vgg13")
STUDENT = "resnet8x4"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teachers = [create_model(n, num_classes=2) for n in TEACHERS]
    student = create_model(STUDENT, num_classes=2)
    prof = {n: profile_model(m, args.image_size, repeats=args.repeats, warmup=args.warmup) for n, m in zip(TEACHERS, teachers)}
    prof["ensemble"] = profile_model(teachers, args.image_size, repeats=args.repeats, warmup=args.warmup)
    prof[STUDENT] = profile_model(student, args.image_size, repeats=args.repeats, warmup=args.warmup)
    s, e = prof[STUDENT], prof["ensemble"]
    result = {
        "student_ms_b1": s["ms_b1"], "ensemble_ms_b1": e["ms_b1"],
        "student_ms_b64": s["ms_b64"], "ensemble_ms_b64": e["ms_b64"],
        "speedup_b1": round(e["ms_b1"] / s["ms_b1"], 2), "speedup_b64": round(e["ms_b64"] / s["ms_b64"], 2),
        "student": STUDENT, "teachers": list(TEACHERS), "num_classes": 2, "image_size": args.image_size,
        "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "command": "python benchmarks/latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "profiles": prof,
    }
    atomic_write_json(args.out, result)
    print("| network | params | MMACs | size MB | ms @ b1 | ms @ b64 |\n|---|---:|---:|---:|---:|---:|")
    for name, r in prof.items():
        label = f"ensemble ({' + '.join(TEACHERS)})" if name == "ensemble" else name
        print(f"| {label} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f} | {r['size_bytes'] / 1e6:.2f} "
              f"| {r['ms_b1']:.2f} | {r['ms_b64']:.1f} |")
    print(f"\nspeed-up of the student over the ensemble: {result['speedup_b1']}x at batch 1, "
          f"{result['speedup_b64']}x at batch 64 ({args.threads} threads, {args.image_size} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
