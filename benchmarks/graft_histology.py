"""Grafting design check on synthetic histology (issue 12, item 3): the grafting variants of
``benchmarks/graft_digits.py`` on the binary few-shot study ``benchmarks/studies/fewshot_histology.yaml``
(its data, teachers resnet20 and resnet32, student resnet8, 300 optimiser steps, its ``graft_host`` /
``graft_fused`` / ``mt_kd`` fragments), scored on the VALIDATION split only (the value of a run is the
validation accuracy of its validation-selected checkpoint; test accuracy is never read here).

    python benchmarks/graft_histology.py [--root runs/histology] [--out runs/graft_histology]
        [--variants host fused_kl ...] [--seeds 3]

``--root`` holds ``data/`` and ``teachers/teacher_<arch>/model.pt`` as ``benchmarks/fewshot.py`` makes
them. Writes ``benchmarks/results/graft_histology.json`` (rows as graft_digits.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from graftkd.study import code_revision
from graftkd.experiment import execute, read_metrics
from graftkd.files import atomic_write_json
from graftkd.study import build_jobs, load_study

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "studies" / "fewshot_histology.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "graft_histology.json"
SHOTS = 5

#: variant -> (study method, overrides of its fragment)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "mt_kd": ("mt_kd", []),
    "host": ("graft_host", []),
    "fused_kl": ("graft_fused", ["fused_loss=kl"]),
    "fused_nlmse_nmean": ("graft_fused", ["fused_loss=nlmse", "fused_logits=normalized_mean"]),
    "fused_nlmse_logp": ("graft_fused", ["fused_loss=nlmse", "fused_logits=log_probs"]),
    "host_kd1": ("graft_fused", ["target=host", "kd_weight=1.0"]),
    "fused_nmean_kd1": ("graft_fused", ["fused_loss=nlmse", "fused_logits=normalized_mean", "kd_weight=1.0"]),
}
WHAT = {
    "mt_kd": "multi-teacher KD, mean fusion (the study's mt_kd)",
    "host": "graft, NetGraft loss to the host's logits (the study's graft_host)",
    "fused_kl": "graft, T^2 KL to the fused probabilities",
    "fused_nlmse_nmean": "graft, NLMSE to sum_k w_k z_k / norm(z_k)",
    "fused_nlmse_logp": "graft, NLMSE to T log p_fused (centred)",
    "host_kd1": "graft, host NLMSE + 1.0 fused KL",
    "fused_nmean_kd1": "graft, NLMSE to sum_k w_k z_k / norm(z_k) + 1.0 fused KL",
}


def revision() -> str:
    return code_revision()["commit"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "histology")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "graft_histology")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    command = "python benchmarks/graft_histology.py " + " ".join(sys.argv[1:] if argv is None else argv)
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    old_rev = {r["variant"]: r["revision"] for r in old["rows"]}
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    for variant in args.variants:
        method, extra = VARIANTS[variant]
        study = load_study(STUDY, [
            f"out={args.out / variant}", f"data.root={args.root / 'data'}", f"seeds={list(range(args.seeds))}",
            f"shots=[{SHOTS}]", f"teachers.0.checkpoint={args.root / 'teachers/teacher_resnet20/model.pt'}",
            f"teachers.1.checkpoint={args.root / 'teachers/teacher_resnet32/model.pt'}"]
            + [f"methods.{method}.method.{o}" for o in extra])
        values, steps, made = [], set(), False
        for job in build_jobs(study):
            if job.method != method:
                continue
            if not (job.cfg.run_dir / "metrics.json").is_file():
                execute(job.cfg, overwrite=True)
                made = True
            m = read_metrics(job.cfg.run_dir)
            values.append(float(m["val"]["accuracy"]))
            steps.add(int(m["steps"]))
            print(f"{variant:20s} seed {job.cfg.seed}: val {values[-1]:.4f} ({m['steps']} steps)", flush=True)
        mean, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        rows[variant] = {"variant": variant, "shots": SHOTS, "seeds": list(range(args.seeds)), "values": values,
                         "mean": mean, "sd": sd, "steps": sorted(steps), "what": WHAT[variant],
                         "order": list(VARIANTS).index(variant), "overrides": [method] + extra, "command": command,
                         "revision": revision() if made else old_rev.get(variant, revision())}
        print(f"== {variant:20s} val {100 * mean:.1f} +- {100 * sd:.1f}", flush=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}  # read late: parallel calls
    rows = {**{r["variant"]: r for r in old["rows"]}, **rows}
    atomic_write_json(RESULTS, {"benchmark": "graft_histology", "split": "val", "revision": revision(),
                                "command": command, "seconds": round(time.perf_counter() - t0, 1),
                                "rows": sorted(rows.values(), key=lambda r: r["order"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
