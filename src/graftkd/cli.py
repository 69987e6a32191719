"""The ``graftkd`` command line. Each subcommand lives beside the code it drives and is imported lazily."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

from graftkd.errors import UserError

# name -> ("module:function that adds arguments", "module:function that runs", help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("graftkd.commands:add_train_args", "graftkd.commands:run_train", "supervised training of a teacher or a from-scratch student"),
    "distill": ("graftkd.commands:add_train_args", "graftkd.commands:run_distill", "distil a student (kd, dkd, dml, atf, graft)"),
    "evaluate": ("graftkd.eval.commands:add_evaluate_args", "graftkd.eval.commands:run_evaluate", "score a run or checkpoint on a split"),
    "report": ("graftkd.eval.commands:add_report_args", "graftkd.eval.commands:run_report", "write report.html for one run, or compare several"),
    "export": ("graftkd.eval.commands:add_export_args", "graftkd.eval.commands:run_export", "export a run's student as safetensors and/or ONNX"),
    "predict": ("graftkd.eval.commands:add_predict_args", "graftkd.eval.commands:run_predict", "predict classes of new images with an exported model"),
    "compare": ("graftkd.commands:add_compare_args", "graftkd.commands:run_compare", "run a study: methods x shots x seeds on one step budget, with paired statistics"),
    "models": ("graftkd.commands:add_models_args", "graftkd.commands:run_models", "list available model names"),
    "demo": ("graftkd.commands:add_demo_args", "graftkd.commands:run_demo", "the end-to-end demo on synthetic histology"),
    "synth": ("graftkd.data.commands:add_synth_args", "graftkd.data.synthetic:run_synth", "write a synthetic histology tree in the BreakHis layout"),
    "data": ("graftkd.data.commands:add_data_args", "graftkd.data.commands:run_data", "data tools: `data summary -c cfg.yaml`"),
}


def _load(ref: str) -> Callable:
    mod, fn = ref.split(":")
    return getattr(importlib.import_module(mod), fn)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), without the usage block argparse prints first."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="graftkd", description="Knowledge distillation with scarce labels.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_ref, _, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        try:
            _load(add_ref)(sp)
        except (ImportError, AttributeError):  # subcommand whose module is not there yet
            sp.set_defaults(_missing=add_ref)
    return p


def one_line(message: str) -> str:
    """A user error as one line (YAML parser messages, for one, span several). A user error raised in
    a DataLoader worker arrives with the worker's traceback in its message: only its last line counts."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        lines = [lines[-1].split("UserError: ", 1)[-1]]
    return " | ".join(lines) or "unknown error"


def _rank_tag() -> str:
    """`` [rank r]`` under torchrun with several processes, else empty."""
    return f" [rank {os.environ.get('RANK', '?')}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may stand before, between and after flags
    (``train -c x.yaml a=1 --overwrite b=2``) and keep their order."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes = hasattr(args, "overrides")
    unknown = [a for a in extra if not (takes and "=" in a and not a.startswith("-"))]
    if unknown:
        Parser(prog=f"graftkd {args.command}").error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    debug = args.debug or os.environ.get("GRAFTKD_DEBUG") == "1"
    if getattr(args, "_missing", None):
        print(f"graftkd {args.command}: not available in this build ({args._missing})", file=sys.stderr)
        return 2
    try:
        rc = _load(COMMANDS[args.command][1])(args)
        return int(rc or 0)
    except UserError as e:
        if debug:
            raise
        from graftkd.engine.launch import report_rank_error

        if not report_rank_error(one_line(str(e))):  # under --nproc the launcher prints it, once
            print(f"graftkd {args.command}: error{_rank_tag()}: {one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"graftkd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m graftkd.cli
    sys.exit(main())
