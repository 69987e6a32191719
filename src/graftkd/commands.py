"""Handlers of the run-level subcommands: train, distill, models, demo."""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from graftkd.errors import UserError

if TYPE_CHECKING:  # the schema is imported when a command runs: building it costs ~0.5 s of `--help`
    from graftkd.config import ExperimentConfig


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-c", "--config", required=required, help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run folder from checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--nproc", type=int, default=1, help="launch this many processes with torchrun (DDP)")


def _config_for(args: argparse.Namespace) -> ExperimentConfig:
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

        return relaunch_with_torchrun(args.nproc)
    from graftkd.engine.run import execute, read_metrics

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


def run_models(args: argparse.Namespace) -> int:
    from graftkd.models.factory import format_model_table

    print(format_model_table(args.pattern))
    return 0


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    p.add_argument("--data", default=None, help="run the same pipeline on a real BreaKHis_v1 folder")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs")


def run_demo(args: argparse.Namespace) -> int:
    from graftkd.demo import run_demo as demo

    return demo(quick=args.quick, data_root=args.data, out=args.out)

