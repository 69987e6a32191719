"""bf16 autocast against fp32 on real images (issue 14): scikit-learn's handwritten digits at 32 px
(benchmarks/digits_data.py: 897 train, 300 val, 600 test), scratch training and KD from the digits
resnet20 teacher, the same student (resnet8), optimiser and step budget in both precisions, several
seeds; TEST accuracy of the validation-selected checkpoint, and the training time of each run.

Runs are interleaved (seed by seed, fp32 and bf16 back to back), so the time ratio is measured
under the same load.

    python benchmarks/precision.py [--root /work/cache/digits] [--out runs/bench_precision] [--seeds 5]

Finished runs (a metrics.json in their folder) are re-used, so adding seeds runs only the new ones.
Writes ``benchmarks/results/precision.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import data_overrides  # noqa: E402

from graftkd.study import code_revision
from graftkd.config import load_config  # noqa: E402
from graftkd.experiment import execute, read_metrics  # noqa: E402
from graftkd.files import atomic_write_json  # noqa: E402
from graftkd.runtime import cpu_native_bf16  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("scratch", "kd")
PRECISIONS = ("fp32", "bf16")


def overrides(args: argparse.Namespace, method: str, precision: str, seed: int) -> list[str]:
    common = data_overrides(args.root / "manifest.csv") + [
        f"seed={seed}", f"model.name={args.student}", f"data.batch_size={args.batch_size}",
        "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.nesterov=true", "optimizer.weight_decay=5e-4",
        "schedule.name=cosine", f"trainer.epochs={args.epochs}", f"trainer.precision={precision}",
        f"trainer.threads={args.threads}", "trainer.progress=false", "output.tensorboard=false",
        f"output.dir={args.out}", f"output.name={method}_{precision}_s{seed}"]
    if method == "scratch":
        return common + ["method={name: supervised}", "teachers=[]"]
    teacher = args.root / "teachers" / f"teacher_{args.teacher}" / "model.pt"
    return common + ["method={name: kd, temperature: 4.0, ce_weight: 0.1, kd_weight: 0.9}",
                     f"teachers=[{{name: {args.teacher}, checkpoint: {teacher}}}]"]


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 5),
            "sd": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0}


def paired_ci95(diff: list[float]) -> list[float] | None:
    """Student-t 95% interval of the mean of the per-seed paired differences (None with < 2 seeds)."""
    if len(diff) < 2:
        return None
    from scipy.stats import t

    half = t.ppf(0.975, len(diff) - 1) * statistics.stdev(diff) / len(diff) ** 0.5
    mean = statistics.fmean(diff)
    return [round(mean - half, 3), round(mean + half, 3)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/work/cache/digits"))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_precision")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--student", default="resnet8")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/precision.py", *(sys.argv[1:] if argv is None else argv)])
    revision = code_revision()["commit"]
    load = [os.getloadavg()[0]]
    runs: dict[tuple[str, str], list[dict]] = {}
    t0 = time.perf_counter()
    reused = 0
    for seed in range(args.seeds):
        for method in METHODS:
            for precision in PRECISIONS:
                cfg = load_config(None, overrides(args, method, precision, seed))
                if (cfg.run_dir / "metrics.json").is_file():  # a finished run is re-used
                    reused += 1
                else:
                    execute(cfg, overwrite=True)
                m = read_metrics(cfg.run_dir)
                assert m["precision"]["ran"] == precision, m["precision"]
                with (cfg.run_dir / "log.csv").open() as f:
                    log = list(csv.DictReader(f))
                runs.setdefault((method, precision), []).append({
                    "seed": seed, "test_acc": m["test"]["accuracy"], "val_acc": m["val"]["accuracy"],
                    "train_seconds": m["train_seconds"], "epochs": len(log), "steps": int(log[-1]["step"])})
                load.append(os.getloadavg()[0])
                print(f"[{time.perf_counter() - t0:5.0f}s] {method} {precision} seed {seed}: test "
                      f"{m['test']['accuracy']:.4f} ({m['train_seconds']:.1f} s)", file=sys.stderr, flush=True)
    rows, verdict = [], {}
    for method in METHODS:
        fp, bf = runs[(method, "fp32")], runs[(method, "bf16")]
        for precision, rs in (("fp32", fp), ("bf16", bf)):
            rows.append({"method": method, "precision": precision, "seeds": len(rs),
                         "test_acc": summarise([r["test_acc"] for r in rs]),
                         "val_acc": summarise([r["val_acc"] for r in rs]),
                         "train_seconds": summarise([r["train_seconds"] for r in rs]), "per_seed": rs})
        diff = [100 * (b["test_acc"] - f["test_acc"]) for f, b in zip(fp, bf)]
        gap = 100 * (statistics.fmean(r["test_acc"] for r in bf) - statistics.fmean(r["test_acc"] for r in fp))
        verdict[method] = {"bf16_minus_fp32_test_pts": round(gap, 3), "paired_diff_pts": [round(d, 3) for d in diff],
                           "paired_diff_sd_pts": round(statistics.stdev(diff), 3) if len(diff) > 1 else 0.0,
                           "paired_diff_ci95_pts": paired_ci95(diff),
                           "within_0_5_pts": abs(gap) <= 0.5,
                           "time_ratio_fp32_over_bf16": round(
                               sum(r["train_seconds"] for r in fp) / sum(r["train_seconds"] for r in bf), 3)}
    test_images = m["data"]["counts"]["test"]["images"]
    out = {"command": command, "revision": revision, "benchmark": "digits (sklearn) 32 px",
           "student": args.student, "teacher": args.teacher, "test_images": test_images, "epochs": args.epochs, "batch_size": args.batch_size,
           "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_native_bf16": cpu_native_bf16(), "load_avg_1m": [round(x, 2) for x in load],
           "wall_seconds": round(time.perf_counter() - t0, 1),
           "reused_runs": reused, "rows": rows, "bf16_vs_fp32": verdict}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results / "precision.json", out)
    print(json.dumps(verdict, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
