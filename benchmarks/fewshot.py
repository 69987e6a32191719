"""Few-shot benchmark (issue 5's bar): N shots per class on synthetic histology (patient split,
binary task), three teachers, 3 seeds; TEST accuracy of the validation-selected checkpoint.

Rows: ``scratch`` (student on the N shots), ``kd`` (best teacher), ``mt_kd`` (accuracy-fused
teachers), ``graft_host`` (NetGraft loss to the host), ``graft_fused`` (grafting with the fused
target), ``teacher_best`` (best teacher on validation) and ``ensemble`` (fused teachers). The
teachers are trained once on the full training split (split seed 0 throughout, so no test
patient is ever trained on); seeds change initialisation, augmentation and sampling order.

    python benchmarks/fewshot.py [--out runs/bench_fewshot] [--seeds 3] [--shots 5 10]

Writes ``benchmarks/results/fewshot.json`` (rows ``{"method", "shots", "seeds", "mean", "sd"}``)
and prints a Markdown table whose caption is the command.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from graftkd.config import load_config
from graftkd.experiment import execute, read_metrics

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "synthetic" / "graft_fewshot.yaml"
TEACHERS = ("resnet20", "resnet32", "resnet56")
METHODS = ("scratch", "kd", "mt_kd", "graft_host", "graft_fused")
STUDENT_EPOCHS = 60


def run(overrides: list[str]) -> dict:
    cfg = load_config(PRESET, overrides + ["trainer.progress=false", "output.tensorboard=false"])
    if not (cfg.run_dir / "metrics.json").is_file():
        execute(cfg, overwrite=True)
    return read_metrics(cfg.run_dir)


def teacher_overrides(out: Path, name: str) -> list[str]:
    return ["method={name: supervised}", "teachers=[]", "data.shots=null", f"model.name={name}",
            "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.nesterov=true", "schedule.name=cosine",
            "trainer.epochs=15", "trainer.eval_every=1", f"output.dir={out}", f"output.name=teacher_{name}"]


def student_overrides(out: Path, method: str, shots: int, seed: int) -> list[str]:
    teachers = "[" + ", ".join(f"{{name: {n}, checkpoint: {out}/teacher_{n}/model.pt}}" for n in TEACHERS) + "]"
    common = [f"seed={seed}", f"data.shots={shots}", f"output.dir={out}", f"output.name={method}_{shots}shot_s{seed}",
              f"teachers={teachers}"]
    single = ["optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.nesterov=true", "schedule.name=cosine",
              f"trainer.epochs={STUDENT_EPOCHS}", f"data.batch_size={2 * shots}"]
    if method == "scratch":
        return common + single + ["method={name: supervised}", "teachers=[]"]
    if method in ("kd", "mt_kd"):
        strategy = "best" if method == "kd" else "accuracy"
        return common + single + ["method={name: kd, temperature: 4.0, ce_weight: 0.1, kd_weight: 0.9}",
                                  f"fusion.strategy={strategy}"]
    return common + [f"method.target={'host' if method == 'graft_host' else 'fused'}"]


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_fewshot")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    for name in TEACHERS:
        run(teacher_overrides(args.out, name))
    acc: dict[tuple[str, int], list[float]] = {}
    for shots in args.shots:
        for seed in range(args.seeds):
            for method in METHODS:
                m = run(student_overrides(args.out, method, shots, seed))
                acc.setdefault((method, shots), []).append(m["test"]["accuracy"])
                if method == "graft_fused":
                    best = max(m["teachers"], key=lambda t: t["val_accuracy_used_for_fusion"])
                    acc.setdefault(("teacher_best", shots), []).append(best["test"]["accuracy"])
                    acc.setdefault(("ensemble", shots), []).append(m["ensemble"]["test"]["accuracy"])
                print(f"[{time.perf_counter() - t0:6.0f}s] {method} {shots}-shot seed {seed}: "
                      f"test acc {m['test']['accuracy']:.4f}", file=sys.stderr, flush=True)
    rows = []
    for (method, shots), values in acc.items():
        mean, sd = summarise(values)
        rows.append({"method": method, "shots": shots, "seeds": len(values), "mean": round(mean, 4),
                     "sd": round(sd, 4)})
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "fewshot.json").write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(["python benchmarks/fewshot.py", *(sys.argv[1:] if argv is None else argv)])
    names = list(METHODS) + ["teacher_best", "ensemble"]
    print(f"Few-shot test accuracy (mean ± sd over {args.seeds} seeds), synthetic histology, binary, patient split; "
          f"`{command}` ({time.perf_counter() - t0:.0f} s)\n")
    print("| method | " + " | ".join(f"{n}-shot" for n in args.shots) + " |")
    print("|---|" + "---|" * len(args.shots))
    cell = {(r["method"], r["shots"]): f"{100 * r['mean']:.1f} ± {100 * r['sd']:.1f}" for r in rows}
    for n in names:
        print(f"| {n} | " + " | ".join(cell.get((n, s), "-") for s in args.shots) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
