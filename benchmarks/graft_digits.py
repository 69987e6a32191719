"""Grafting design study on real images (issue 12, item 3): which target and loss make grafting onto
the fused multi-teacher target at least as good as grafting onto the single host?

scikit-learn's handwritten digits at 32 px (``benchmarks/digits_data.py``), N shots per class from the
train split, teachers resnet20 and resnet8x4 trained on the full train split, student resnet8, the same
number of optimizer steps for every run. Everything is scored and chosen on the VALIDATION split
(300 images): the value of a run is the validation accuracy of its validation-selected checkpoint.
Test accuracy is never read here.

    python benchmarks/graft_digits.py [--root /work/cache/digits] [--out runs/graft_digits]
        [--variants host fused_kl ...] [--shots 5 10] [--seeds 3]

Writes ``benchmarks/results/graft_digits.json``: rows ``{variant, shots, seeds, values, mean, sd, steps,
overrides}`` plus the code revision and the command (merged with the rows already there, so variants can
be run in several calls).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from graftkd.study import code_revision
from graftkd.config import load_config
from graftkd.files import atomic_write_json
from graftkd.experiment import execute, read_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits_data import data_overrides  # noqa: E402

PRESET = ROOT / "configs" / "digits" / "graft_fewshot.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "graft_digits.json"
TEACHERS = ("resnet20", "resnet8x4")
STEPS = 300
# resnet8 in a resnet20 host: 4 units (3 stages + head) -> 4 stage-1 phases and 3 stage-2 phases. With the
# NetGraft batch rule (int(64 N / 10)) the N-shot set of 10 N images gives one step per epoch, so epochs = steps.
GRAFT_STEPS = ["method.stage1.epochs=[35]", "method.stage2.epochs=[50,50,60]", "trainer.eval_every=10"]
KD = ["optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.nesterov=true", "schedule.name=cosine",
      "optimizer.weight_decay=5e-4", "trainer.eval_every=2"]

#: variant -> overrides of the preset (graft variants) or a whole method (references)
VARIANTS: dict[str, list[str]] = {
    # references under the same budget
    "scratch": ["method={name: supervised}", "teachers=[]"],
    "kd": ["method={name: kd, temperature: 4.0, ce_weight: 0.1, kd_weight: 0.9}", "fusion.strategy=best"],
    "mt_kd_mean": ["method={name: kd, temperature: 4.0, ce_weight: 0.1, kd_weight: 0.9}", "fusion.strategy=mean"],
    "mt_kd_acc": ["method={name: kd, temperature: 4.0, ce_weight: 0.1, kd_weight: 0.9}",
                  "fusion.strategy=accuracy"],
    # grafting: the two designs of the issue
    "host": ["method.target=host"],
    "fused_kl": ["method.target=fused", "method.fused_loss=kl"],
    # fused logits in the host's normalised-logit loss
    "fused_nlmse_nmean": ["method.target=fused", "method.fused_loss=nlmse", "method.fused_logits=normalized_mean"],
    "fused_nlmse_mean": ["method.target=fused", "method.fused_loss=nlmse", "method.fused_logits=mean"],
    "fused_nlmse_logp": ["method.target=fused", "method.fused_loss=nlmse", "method.fused_logits=log_probs"],
    # per-stage targets: host in stage 1 (block-wise), fused in stage 2 (progressive)
    "s1host_s2fused_kl": ["method.target=fused", "method.fused_loss=kl", "method.stage1.target=host"],
    "s1host_s2fused_nmean": ["method.target=fused", "method.fused_loss=nlmse", "method.fused_logits=normalized_mean",
                             "method.stage1.target=host"],
    # host loss plus fused KD
    "host_kd0.1": ["method.target=host", "method.kd_weight=0.1"],
    # fused logits in NetGraft's loss plus fused KD
    "fused_nmean_kd1": ["method.target=fused", "method.fused_loss=nlmse", "method.fused_logits=normalized_mean",
                        "method.kd_weight=1.0"],
    "host_kd1": ["method.target=host", "method.kd_weight=1.0"],
}


WHAT = {
    "scratch": "resnet8 on the shots alone (CE)",
    "kd": "Hinton KD from the best teacher (0.9 KD + 0.1 CE, T 4)",
    "mt_kd_mean": "multi-teacher KD, mean fusion (as the issue's mt_kd)",
    "mt_kd_acc": "multi-teacher KD, accuracy fusion (tau 0.05)",
    "host": "graft, NetGraft loss (normalised-logit MSE) to the host's logits",
    "fused_kl": "graft, T^2 KL to the fused probabilities (the old `fused`)",
    "fused_nlmse_nmean": "graft, normalised-logit MSE to sum_k w_k z_k / norm(z_k)",
    "fused_nlmse_mean": "graft, normalised-logit MSE to sum_k w_k z_k",
    "fused_nlmse_logp": "graft, normalised-logit MSE to T log p_fused (centred)",
    "s1host_s2fused_kl": "graft, stage 1 host NLMSE, stage 2 fused KL",
    "s1host_s2fused_nmean": "graft, stage 1 host NLMSE, stage 2 NLMSE to sum_k w_k z_k/||z_k||",
    "host_kd0.1": "graft, host NLMSE + 0.1 fused KL",
    "host_kd1": "graft, host NLMSE + 1.0 fused KL",
    "fused_nmean_kd1": "graft, NLMSE to sum_k w_k z_k / norm(z_k) + 1.0 fused KL",
}


def revision() -> str:
    return code_revision()["commit"]


def overrides(variant: str, shots: int, seed: int, root: Path, out: Path) -> list[str]:
    manifest = root / "manifest.csv"
    teachers = "[" + ", ".join(f"{{name: {n}, checkpoint: {root}/teachers/teacher_{n}/model.pt}}"
                               for n in TEACHERS) + "]"
    common = data_overrides(manifest) + [
        f"seed={seed}", f"data.shots={shots}", f"teachers={teachers}", "trainer.threads=1", "trainer.progress=false",
        "output.tensorboard=false", f"output.dir={out}", f"output.name={variant}_{shots}shot_s{seed}"]
    extra = VARIANTS[variant]
    if extra[0].startswith("method={"):  # single-network references: batch 2N, 60 epochs of 5 steps
        epochs = STEPS // 5
        return common + KD + [f"data.batch_size={2 * shots}", f"trainer.epochs={epochs}"] + extra
    return common + GRAFT_STEPS + extra


def steps_taken(run_dir: Path) -> int:
    with (run_dir / "log.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("phase")]
    return int(rows[-1]["step"])


def run(ovr: list[str]) -> tuple[float, int, bool]:
    """(validation accuracy, optimizer steps, whether the run was made now rather than reused)."""
    cfg = load_config(PRESET, ovr)
    fresh = not (cfg.run_dir / "metrics.json").is_file()
    if fresh:
        execute(cfg, overwrite=True)
    return float(read_metrics(cfg.run_dir)["val"]["accuracy"]), steps_taken(cfg.run_dir), fresh


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/work/cache/digits"))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "graft_digits")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: dict[tuple[str, int], dict] = {}
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    old_rev = {(r["variant"], r["shots"]): r["revision"] for r in old["rows"]}
    command = "python benchmarks/graft_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    for shots in args.shots:
        for variant in args.variants:
            values, steps, made = [], set(), False
            for seed in range(args.seeds):
                ovr = overrides(variant, shots, seed, args.root, args.out)
                acc, n, fresh = run(ovr)
                made |= fresh
                values.append(acc)
                steps.add(n)
                print(f"{variant:24s} {shots:2d} shots seed {seed}: val {acc:.4f} ({n} steps)", flush=True)
            mean, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            rows[(variant, shots)] = {"variant": variant, "shots": shots, "seeds": list(range(args.seeds)),
                                      "values": values, "mean": mean, "sd": sd, "steps": sorted(steps),
                                      "what": WHAT[variant], "order": list(VARIANTS).index(variant),
                                      "overrides": VARIANTS[variant], "command": command,
                                      # the code that made the runs (reused runs keep the revision recorded then)
                                      "revision": revision() if made else old_rev.get((variant, shots), revision())}
            print(f"== {variant:24s} {shots:2d} shots: val {100 * mean:.1f} +- {100 * sd:.1f}", flush=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}  # read late: parallel calls
    rows = {**{(r["variant"], r["shots"]): r for r in old["rows"]}, **rows}
    atomic_write_json(RESULTS, {"benchmark": "graft_digits", "split": "val", "revision": revision(),
                                "command": command, "seconds": round(time.perf_counter() - t0, 1),
                                "rows": sorted(rows.values(), key=lambda r: (r["shots"], r["variant"]))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
