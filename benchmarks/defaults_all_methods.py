"""Every registered method at its defaults on real digits with full labels (issue 23, item 2).

Each method in ``METHODS`` runs as a new user would run it: ``method: {name: X}`` and nothing else
for the method (``REQUIRED`` lists the inputs a method cannot run without, with the reason), the
same student, data, optimiser and the same supervised teacher for all of them, one budget of
optimiser steps. After training, the exported student and every network saved beside it (the
method's ``extra_outputs``: ATF's adapted teachers, DML's peers) are scored on the training split
(their final weights: the run validates only once, at its last step, so the selected checkpoint is
the last step's) and on validation. ``tests/methods/test_defaults_all_methods.py`` runs this at
16 px for CI; this script runs the longer version (32 px, the digits benchmarks' augmentation,
several seeds) and writes ``benchmarks/results/defaults_all_methods.json``:

    python benchmarks/defaults_all_methods.py [--steps 300] [--seeds 0 1 2] [--size 32]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # (the tests put it at the end)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import data_overrides, prepare, train_teacher  # noqa: E402

#: the inputs a method has no default for, and why: without them its config does not validate
REQUIRED: dict[str, tuple[dict[str, Any], str]] = {
    "dml": ({"peers": [{"name": "resnet8"}]},
            "DML trains peers together and has no default peer (method.peers is required: 'dml needs at "
            "least two peers'); one peer of the student's architecture is the smallest valid config"),
}
#: methods left out, with the reason (none: every registered method runs)
SKIPPED: dict[str, str] = {}
STUDENT = "resnet8"
CHANCE = 0.1  # 10 classes


def run_overrides(manifest: Path, out: Path, *, size: int, augment: str, batch: int, steps: int,
                  seed: int) -> list[str]:
    """Everything but the method: the digits (full labels) at ``size`` px, the student, SGD with a
    cosine schedule, ``steps`` optimiser steps, one validation at the last step, CPU fp32."""
    return data_overrides(manifest) + [
        f"data.image_size={size}", f"data.augment={augment}", f"data.batch_size={batch}", "data.eval_batch_size=300",
        f"model.name={STUDENT}", f"seed={seed}", "optimizer.name=sgd", "optimizer.lr=0.05",
        "optimizer.nesterov=true", "optimizer.weight_decay=5e-4", "schedule.name=cosine", f"trainer.steps={steps}",
        f"trainer.eval_every_steps={steps}", "trainer.device=cpu", "trainer.precision=fp32", "trainer.threads=1",
        "trainer.progress=false", "output.tensorboard=false", f"output.dir={out}"]


def method_section(name: str) -> dict[str, Any]:
    """``{name: X}`` plus only what ``REQUIRED`` says the method cannot do without."""
    return {"name": name, **REQUIRED.get(name, ({}, ""))[0]}


def teacher(manifest: Path, out: Path, *, size: int, augment: str, steps: int) -> Path:
    """The supervised resnet8 teacher every method distils from (trained once, reused)."""
    return train_teacher(manifest, out, STUDENT, steps=steps, extra=[
        f"data.image_size={size}", f"data.augment={augment}", "data.batch_size=32", "data.eval_batch_size=300",
        f"trainer.eval_every_steps={steps}", "trainer.device=cpu", "trainer.precision=fp32", "trainer.threads=1"])


def accuracy(model_file: Path, dataset: Any, cfg: Any) -> float:
    """Accuracy of a saved model file's network on a whole split (eval mode, the run's eval view)."""
    import torch

    from graftkd.data.loaders import predict_split
    from graftkd.models import load_model_file

    model = load_model_file(model_file)[0].eval()
    out = predict_split(model, dataset, cfg, torch.device("cpu"))
    return float((out["logits"].argmax(1) == out["labels"]).float().mean())


def log_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def non_finite_losses(run: Path) -> list[str]:
    """``column@step`` of every non-finite loss value in the run's log (train_* and val_loss)."""
    bad = []
    for row in log_rows(run):
        for key, value in row.items():
            if value and (key.startswith("train_") or key == "val_loss") and not math.isfinite(float(value)):
                bad.append(f"{key}@{row['step']}")
    return bad


def run_method(name: str, manifest: Path, teacher_file: Path, out: Path, data_cache: dict[str, Any], *,
               size: int, augment: str, batch: int, steps: int, seed: int) -> dict[str, Any]:
    """One method at its defaults; the values the test and the benchmark check. ``data_cache``
    keeps the built data (the same for every method) between calls."""
    from graftkd.config import load_config
    from graftkd.data import build_data
    from graftkd.experiment import execute

    cfg = load_config(None, run_overrides(manifest, out, size=size, augment=augment, batch=batch, steps=steps,
                                          seed=seed) + [
        f"name={name}_s{seed}", f"method={json.dumps(method_section(name))}",
        f"teachers=[{{checkpoint: {teacher_file}}}]"])
    wall, cpu = time.perf_counter(), time.process_time()
    run = execute(cfg, overwrite=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if "data" not in data_cache:  # scored in the evaluation view: no augmentation of the training split
        data_cache["data"] = build_data(cfg.data.model_copy(update={"augment": "none"}), cfg.seed, None, work_dir=out)
    data = data_cache["data"]
    metrics = json.loads((run / "metrics.json").read_text())
    networks = {"student": run / "model.pt", **{p.stem: p for p in sorted(run.glob("*.pt")) if p.name != "model.pt"}}
    acc = {role: {"train_acc": accuracy(path, data.train, cfg), "val_acc": accuracy(path, data.val, cfg)}
           for role, path in networks.items()}
    last = log_rows(run)[-1]
    return {"method": name, "config": method_section(name), "seed": seed, "steps": metrics["steps"],
            "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "run": str(run),
            "non_finite_losses": non_finite_losses(run), "final_train_loss": float(last["train_loss"]),
            "student": acc.pop("student"), "adapted": acc,
            "stopped_teachers": [t["stop"] for t in metrics.get("atf", {}).get("teachers", [])
                                 if t.get("stop", {}).get("stopped")]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "defaults_all_methods")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--augment", default="cifar")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="*")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "defaults_all_methods.json")
    args = p.parse_args(argv)
    import torch

    import graftkd.methods  # noqa: F401  registers every method
    from graftkd.methods import METHODS
    from graftkd.runtime import code_revision
    from graftkd.files import atomic_write_json

    torch.set_num_threads(1)
    revision = code_revision()["commit"]  # the code measured (read before the runs, not after them)
    manifest = prepare(ROOT / "runs" / "digits")
    teacher_file = teacher(manifest, args.root / f"teachers_{args.size}", size=args.size, augment=args.augment,
                           steps=args.teacher_steps)
    names = args.methods or [n for n in METHODS.names() if n not in SKIPPED]
    rows, data_cache = [], {}
    for seed in args.seeds:
        for name in names:
            row = run_method(name, manifest, teacher_file, args.root / "runs", data_cache, size=args.size,
                             augment=args.augment, batch=args.batch, steps=args.steps, seed=seed)
            print(f"{name} seed {seed}: student train {row['student']['train_acc']:.3f} val "
                  f"{row['student']['val_acc']:.3f}; " + "; ".join(
                      f"{k} train {v['train_acc']:.3f} val {v['val_acc']:.3f}" for k, v in row["adapted"].items())
                  + f"; {row['cpu_seconds']} CPU s", flush=True)
            rows.append(row)
    teacher_metrics = json.loads((teacher_file.parent / "metrics.json").read_text())
    atomic_write_json(args.out, {
        "revision": revision,
        "command": "python benchmarks/defaults_all_methods.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "setting": {"data": "scikit-learn digits, full labels (897 train, 300 val, 600 test)", "size": args.size,
                    "augment": args.augment, "batch": args.batch, "steps": args.steps, "student": STUDENT,
                    "teacher": {"arch": STUDENT, "steps": args.teacher_steps,
                                "val_acc": teacher_metrics["val"]["accuracy"]},
                    "required": {k: {"config": v[0], "why": v[1]} for k, v in REQUIRED.items()},
                    "skipped": SKIPPED, "chance": CHANCE},
        "seeds": args.seeds, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
