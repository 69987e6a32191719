"""ATF on few labels: the design study behind the few-shot presets (issue 12, item 2).

Which ATF variant keeps the adapting teacher useful when labels are few? Every variant is scored on
VALIDATION only (the validation-selected student's validation accuracy); test accuracy is never read.

- ``digits``: scikit-learn's handwritten digits at 32 px (``benchmarks/digits_data.py``), 5 shots per
  class drawn with each seed, the resnet20 teacher trained on the whole train split, student resnet8,
  batch 25 (2 steps per epoch), 150 epochs = 300 SGD steps (lr 0.05, momentum 0.9, cosine),
  validation every 10 steps.
- ``synthetic``: the histology study's data and teacher (``benchmarks/studies/atf_histology.yaml``: 240
  synthetic patients with 2..10 images, patient split, resnet20 teacher of ``benchmarks/fewshot.py``),
  10 shots per class, batch 16, 300 SGD steps (nesterov), validation every 20 steps.

    python benchmarks/atf_tuning.py [--bench digits synthetic] [--variants ...] [--seeds 0 1 2]
                                    [--root /work/cache/digits] [--out runs/atf_tuning]

A run whose folder already holds ``metrics.json`` (and the same method section) is reused. Writes
``benchmarks/results/atf_tuning.json``: rows ``{bench, variant, what, overrides, seeds, values, mean,
sd, steps, teacher_val_after, diverged}`` (accuracy as a fraction; a diverged run has value null),
merged with the rows already there.
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
import yaml

from graftkd.study import code_revision
from graftkd.config import load_config
from graftkd.engine.trainer import TrainingDiverged
from graftkd.experiment import execute, read_metrics
from graftkd.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits_data import data_overrides  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "atf_tuning.json"
#: the `kd` method's student loss, used by every variant but the first two
KD = ["method.divergence.kind=kl", "method.temperature=4", "method.standardize=false", "method.kd_weight=0.9"]
#: the former preset: logit-standardisation student loss (T 2, CE 0.1, KD 9), alpha 0.5, whole teacher, lam 1
LS = ["method.divergence.kind=alpha", "method.divergence.alpha=0.5", "method.temperature=2",
      "method.standardize=true", "method.kd_weight=9", "method.adapt=all", "method.lam=1"]

#: variant -> (method, overrides of the method section, what it is)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "kd": ("kd", [], "the `kd` method (KL, T 4, CE 0.1, KD 0.9)"),
    "ls_offline": ("atf", LS + ["method.mode=offline"], "ATF's former defaults, mode offline (frozen teacher)"),
    "ls_atf": ("atf", LS, "ATF's former defaults (LS student loss, whole teacher adapts, lam 1)"),
    "kd_offline": ("atf", KD + ["method.mode=offline"], "mode offline with the `kd` student loss"),
    "all_lam1": ("atf", KD + ["method.adapt=all"], "whole teacher adapts, lam 1"),
    "all_ce0": ("atf", KD + ["method.adapt=all", "method.teacher_ce_weight=0"],
                "whole teacher, driven by the student only (no label CE)"),
    "all_mu0.1": ("atf", KD + ["method.adapt=all", "method.mu=0.1"], "whole teacher, anchor mu 0.1"),
    "all_guard": ("atf", KD + ["method.adapt=all", "method.guard=0.0"],
                  "whole teacher, guard 0 (stop + roll back on any validation drop)"),
    "last_lam1": ("atf", KD + ["method.adapt=last_stage"], "last stage + head adapt, lam 1"),
    "last_lam1_guard": ("atf", KD + ["method.adapt=last_stage", "method.guard=0.01"],
                        "last stage + head, lam 1, guard 0.01"),
    "head_lam1": ("atf", KD + ["method.adapt=head"], "head adapts, lam 1"),
    "head_lam0": ("atf", KD + ["method.adapt=head", "method.lam=0"], "head adapts, labels only (lam 0)"),
    "head_lam0.01": ("atf", KD + ["method.adapt=head", "method.lam=0.01"], "head adapts, lam 0.01"),
    "head_lam0.1": ("atf", KD + ["method.adapt=head", "method.lam=0.1"],
                    "head adapts, lam 0.1"),
    "head_lam0.1_guard": ("atf", KD + ["method.adapt=head", "method.lam=0.1", "method.guard=0.01"],
                          "head adapts, lam 0.1, guard 0.01 (the few-shot presets)"),
    "head_lam0.1_lr1": ("atf", KD + ["method.adapt=head", "method.lam=0.1", "method.lr_ratio=1"],
                        "head adapts, lam 0.1, teacher lr = student lr"),
}


def revision() -> str:
    return code_revision()["commit"]


def quiet(out: Path, name: str, seed: int) -> list[str]:
    return [f"seed={seed}", "trainer.threads=1", "trainer.progress=false", "output.tensorboard=false",
            f"output.dir={out}", f"output.name={name}"]


def config(bench: str, variant: str, seed: int, root: Path, out: Path, histology: Path):
    method, extra, _ = VARIANTS[variant]
    name = f"{bench}_{variant}_resnet20_s{seed}"
    if bench == "digits":
        base = data_overrides(root / "manifest.csv") + [
            "data.shots=5", "data.batch_size=25", "model.name=resnet8",
            f"teachers=[{{name: resnet20, checkpoint: {root}/teachers/teacher_resnet20/model.pt}}]",
            "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9", "optimizer.weight_decay=5e-4",
            "schedule.name=cosine", "trainer.epochs=150", "trainer.eval_every=5", f"method={{name: {method}}}"]
        return load_config(None, base + quiet(out, name, seed) + extra)
    hist = histology
    base = [
        "data.source=synthetic", f"data.root={hist}/data", "data.task=binary", "data.magnification=all",
        "data.image_size=32", "data.augment=histology", "data.batch_size=16", "data.shots=10",
        "data.split={kind: fraction, train: 0.6, val: 0.2, test: 0.2, seed: 0}",
        "data.synthetic={patients: 240, images_per_patient: 2, images_per_patient_max: 10, size: [48, 48], "
        "magnifications: [40], seed: 0}", "model.name=resnet8",
        f"teachers=[{{name: resnet20, checkpoint: {hist}/teachers/teacher_resnet20/model.pt}}]",
        "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9", "optimizer.nesterov=true",
        "optimizer.weight_decay=5e-4", "schedule.name=cosine", "trainer.steps=300", "trainer.eval_every_steps=20",
        "trainer.precision=fp32", f"method={{name: {method}}}"]
    return load_config(None, base + quiet(out, name, seed) + extra)


def run(cfg) -> dict:
    """{val, steps, teacher_val_after, diverged}; reuses a finished run with the same method section."""
    saved = cfg.run_dir / "config.yaml"
    done = (cfg.run_dir / "metrics.json").is_file() and saved.is_file()
    if done:
        text = saved.read_text()
        old = yaml.safe_load(text[text.index("\nname:"):] if text.startswith("#") else text)
        now = cfg.model_dump(mode="json")["method"]
        defaults = type(cfg.method)().model_dump(mode="json")
        # a key added to the method after the run was made counts as its default
        done = all(old["method"].get(k, defaults.get(k)) == v for k, v in now.items())
    if not done:
        try:
            execute(cfg, overwrite=True)
        except TrainingDiverged:
            return {"val": None, "steps": None, "teacher_val_after": None, "diverged": True}
    m = read_metrics(cfg.run_dir)
    with (cfg.run_dir / "log.csv").open() as f:
        steps = int([r for r in csv.DictReader(f) if r.get("phase")][-1]["step"])
    teacher = m["atf"]["teachers"][0]["val_acc_after"] if "atf" in m else None
    return {"val": m["val"]["accuracy"], "steps": steps, "teacher_val_after": teacher, "diverged": False}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", nargs="+", default=["digits", "synthetic"], choices=["digits", "synthetic"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", type=Path, default=Path("/work/cache/digits"), help="digits data + teachers")
    p.add_argument("--histology", type=Path, default=ROOT / "runs" / "histology",
                   help="synthetic histology data + teachers of benchmarks/fewshot.py")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "atf_tuning")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    command = "python benchmarks/atf_tuning.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0, rows = time.perf_counter(), {}
    for bench in args.bench:
        for variant in args.variants:
            got = [run(config(bench, variant, s, args.root, args.out, args.histology)) for s in args.seeds]
            values = [g["val"] for g in got]
            ok = [v for v in values if v is not None]
            rows[(bench, variant)] = {
                "bench": bench, "variant": variant, "what": VARIANTS[variant][2], "overrides": VARIANTS[variant][1],
                "order": list(VARIANTS).index(variant), "seeds": args.seeds, "values": values,
                "mean": statistics.fmean(ok) if ok else None,
                "sd": statistics.stdev(ok) if len(ok) > 1 else None,
                "steps": sorted({g["steps"] for g in got if g["steps"] is not None}),
                "teacher_val_after": [g["teacher_val_after"] for g in got],
                "diverged": sum(g["diverged"] for g in got), "command": command}
            print(f"{bench} {variant}: {values}", flush=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    rows = {**{(r["bench"], r["variant"]): r for r in old["rows"]}, **rows}
    atomic_write_json(RESULTS, {"benchmark": "atf_tuning", "split": "val", "revision": revision(), "command": command,
                                "seconds": round(time.perf_counter() - t0, 1),
                                "rows": sorted(rows.values(), key=lambda r: (r["bench"], r["order"]))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
