"""ATF versus offline KD, offline-joint and online DML on synthetic histology (patient split).

    python benchmarks/atf.py [--seeds 0 1 2] [--epochs 12] [--teacher-epochs 15] [--work runs/bench_atf]
                             [--out benchmarks/results/atf.json]

Per seed: a resnet20 teacher is trained once with ``method: supervised`` (configs/synthetic/
atf_teacher.yaml) on that seed's patient split; then the same resnet8 student, for the same number
of epochs, is trained by every variant of configs/synthetic/atf.yaml. Each run keeps its
best-validation checkpoint and reports TEST accuracy; the table gives mean +- sample sd over seeds.
A finished run whose resolved config is unchanged is reused. Writes a list of rows
``{"method", "seeds", "mean", "sd", "values"}`` and prints a Markdown table captioned with the command.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from graftkd.config import ExperimentConfig, config_to_yaml, load_config
from graftkd.files import atomic_write_json
from graftkd.experiment import execute, read_metrics

ROOT = Path(__file__).resolve().parent.parent
TEACHER_CFG = ROOT / "configs" / "synthetic" / "atf_teacher.yaml"
ATF_CFG = ROOT / "configs" / "synthetic" / "atf.yaml"
#: row name -> overrides of configs/synthetic/atf.yaml
VARIANTS: dict[str, list[str]] = {
    "offline": ["method.mode=offline"],
    "offline_joint": ["method.mode=offline_joint"],
    "online": ["method.mode=online"],
    "atf": [],
    "atf_no_standardize": ["method.standardize=false"],
    "atf_alpha1_kl": ["method.divergence.kind=kl"],
    "atf_adaptive_alpha": ["method.divergence.adaptive=true"],
}


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    """metrics.json of ``cfg``'s run, training it unless a finished run has the same config."""
    done = cfg.run_dir / "metrics.json"
    saved = cfg.run_dir / "config.yaml"
    if not (done.is_file() and saved.is_file() and saved.read_text() == config_to_yaml(cfg)):
        execute(cfg, overwrite=True)
    return read_metrics(cfg.run_dir)


def common(work: Path, seed: int, name: str, epochs: int) -> list[str]:
    return [f"seed={seed}", f"output.dir={work}", f"output.name={name}", f"trainer.epochs={epochs}",
            "trainer.progress=false", "output.tensorboard=false"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12, help="student epochs (every variant)")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_atf")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "atf.json")
    args = p.parse_args(argv)
    acc: dict[str, list[float]] = {"teacher (resnet20, supervised)": []}
    acc.update({name: [] for name in VARIANTS})
    adapted: dict[str, list[float]] = {}
    for seed in args.seeds:
        teacher = run(load_config(TEACHER_CFG, common(args.work, seed, f"teacher_s{seed}", args.teacher_epochs)))
        acc["teacher (resnet20, supervised)"].append(teacher["test"]["accuracy"])
        for name, overrides in VARIANTS.items():
            cfg = load_config(ATF_CFG, common(args.work, seed, f"{name}_s{seed}", args.epochs) + [
                f"teachers.0.checkpoint={args.work / f'teacher_s{seed}' / 'model.pt'}", *overrides])
            m = run(cfg)
            acc[name].append(m["test"]["accuracy"])
            if name != "offline":
                adapted.setdefault(f"{name} (its teacher)", []).append(m["atf"]["teachers"][0]["test"]["accuracy"])
            print(f"seed {seed} {name}: test acc {acc[name][-1]:.4f}", file=sys.stderr, flush=True)
    rows = [{"method": name, "seeds": args.seeds, "mean": statistics.mean(v),
             "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
            for name, v in list(acc.items()) + list(adapted.items())]
    atomic_write_json(args.out, rows)
    command = "python benchmarks/atf.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"Test accuracy (mean +- sample sd over seeds {args.seeds}; student resnet8, {args.epochs} epochs, "
          f"best on validation). Command: `{command.strip()}`\n")
    print("| method | test accuracy | per seed |\n|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {100 * r['mean']:.1f} +- {100 * r['sd']:.1f} | "
              f"{', '.join(f'{100 * v:.1f}' for v in r['values'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
