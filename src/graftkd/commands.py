"""Handlers of the run-level subcommands: train, distill, compare, models, demo."""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from graftkd.errors import UserError, positive_int

if TYPE_CHECKING:  # the schema is imported when a command runs: building it costs ~0.5 s of `--help`
    from graftkd.config import ExperimentConfig


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-c", "--config", required=required, help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run folder from checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder; the old one is kept (as .<name>.replaced) until "
                                                         "the new run has written its first checkpoint")
    p.add_argument("--nproc", type=positive_int, default=1, help="launch this many processes with torchrun (DDP)")


def _config_for(args: argparse.Namespace) -> ExperimentConfig:
    import graftkd.methods  # noqa: F401  registers every method and its config section
    from graftkd.config import load_config

    return load_config(args.config, args.overrides)


def _run(args: argparse.Namespace, supervised: bool) -> int:
    cfg = _config_for(args)
    is_sup = cfg.method.name == "supervised"
    if supervised and not is_sup:
        raise UserError(f"method.name = '{cfg.method.name}' is a distillation method: use `graftkd distill`")
    if not supervised and is_sup:
        raise UserError("method.name = 'supervised': use `graftkd train`, or set method.name to kd, dkd, dml, atf or graft")
    if args.nproc > 1:
        from graftkd.engine.launch import relaunch_with_torchrun
        from graftkd.experiment import preflight
        from graftkd.files import LOCK_ENV, FolderLock

        with FolderLock(cfg.run_dir) as lock:  # the launcher holds the run folder; its ranks inherit the lock
            preflight(cfg, args.resume, args.overwrite)  # user errors before any rank starts (no run folder yet)
            os.environ[LOCK_ENV] = lock.child_env()[LOCK_ENV]
            return relaunch_with_torchrun(args.nproc)
    from graftkd.experiment import execute, read_metrics

    run_dir = execute(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        m = read_metrics(run_dir)
        line = f"run folder: {run_dir}  val acc {m['val']['accuracy']:.4f}  test acc {m['test']['accuracy']:.4f}"
        if "patient_recognition_rate" in m["test"]:
            line += f"  test patient RR {m['test']['patient_recognition_rate']:.4f}"
        print(line)
    return 0


def run_train(args: argparse.Namespace) -> int:
    return _run(args, supervised=True)


def run_distill(args: argparse.Namespace) -> int:
    return _run(args, supervised=False)


def add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="glob over model names, e.g. 'resnet*'")
    p.add_argument("--params", action="store_true", help="also count the parameters of ours (builds them: slower)")


def _stored_model_index() -> dict | None:
    """``models/index.json`` when it was written for the installed timm, else None."""
    import json
    from importlib import resources
    from importlib.metadata import PackageNotFoundError, version

    try:
        index = json.loads(resources.files("graftkd").joinpath("models/index.json").read_text())
        return index if index.get("timm") == version("timm") else None
    except (OSError, ValueError, PackageNotFoundError):
        return None


def run_models(args: argparse.Namespace) -> int:
    index = None if args.params else _stored_model_index()
    if index is None:  # counting parameters, or a timm the index was not written for: the live registries
        from graftkd.models.factory import format_model_table

        print(format_model_table(args.pattern, params=args.params))
        return 0
    from fnmatch import fnmatchcase

    ours = [n for n in index["ours"] if fnmatchcase(n, args.pattern)]
    theirs = [n for n in index["timm_models"] if fnmatchcase(n.removeprefix("timm:"), args.pattern)]
    # the table code without its module (which imports torch): the same columns as format_model_table
    rows = [("name", "source")] + [(n, "ours") for n in ours] + [(n, "timm") for n in theirs]
    if len(rows) == 1:
        print(f"no model matches '{args.pattern}'")
        return 0
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    return 0


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    p.add_argument("--data", default=None, help="run the same pipeline on a real BreaKHis_v1 folder")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs")


def run_demo(args: argparse.Namespace) -> int:
    from graftkd.demo import run_demo as demo

    return demo(quick=args.quick, data_root=args.data, out=args.out)


EXECUTORS = ("pool", "local", "slurm", "debug")


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Compare methods on one step budget: every method x shots x seed of a study YAML is run (a finished "
        "run is reused only when its resolved config, teacher files and code revision match), then a table "
        "of mean ± sd per method, paired differences to a baseline with bootstrap 95% intervals over seeds "
        "and test images, a plot and the rows as JSON are written to the study folder.")
    p.add_argument("study", type=Path, metavar="STUDY.yaml",
                   help="keys: name, data, teachers, student, common, shots, seeds, steps, methods "
                        "(name -> config fragment), baseline; see docs/compare.md")
    p.add_argument("overrides", nargs="*", metavar="a.b=c", help="overrides of the study YAML (e.g. seeds=[0,1])")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs at once (each in its own process forked from a warm "
                                                       "worker when > 1; with --executor local|debug: jobs in flight)")
    p.add_argument("--executor", choices=EXECUTORS, default="pool",
                   help="pool: this machine (default); slurm: each run a Slurm job through submitit, with the "
                        "study's `resources` (gpus, cpus, time_min, partition); local / debug: submitit's "
                        "local (a process per job) and in-process executors, to try a study's jobs here")
    p.add_argument("--results", type=Path, help="also write the JSON here")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each would be reused")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods of the study (same runs)")


def run_compare(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise UserError("--jobs must be >= 1")
    extra = ([f"--jobs {args.jobs}"] if args.jobs != 1 else []) + (
        [f"--executor {args.executor}"] if args.executor != "pool" else [])
    extra += ([f"--results {args.results}"] if args.results else [])
    extra += ["--methods " + " ".join(args.methods)] if args.methods else []
    command = " ".join(["graftkd compare", shlex.join([str(args.study), *args.overrides]), *extra])
    from graftkd.study import compare

    compare(args.study, args.overrides, args.jobs, args.results, command, args.dry_run, args.methods, args.executor)
    return 0
