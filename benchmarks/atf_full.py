"""ATF in its own setting: full labels (issue 23 item 4). Real digits, every training image labelled,
resnet20 teacher, resnet8 student, one 200-step budget at batch 16, 5 seeds, through ``graftkd compare``: kd, kd
with logit standardisation, dkd, ATF at its class defaults (``method: {name: atf}``) and in modes
offline, offline_joint and online (``benchmarks/studies/atf_full_digits.yaml``).

    python benchmarks/atf_full.py [--digits-root runs/digits] [--jobs 1]
    python benchmarks/atf_full.py --tuning     # the validation study that chose the defaults

Writes ``benchmarks/results/atf_full.json`` (``--tuning``: ``atf_full_tuning.json``):
``{"revision", "command", "studies": {"digits": <compare JSON>}}``; the compare JSON holds the
per-seed values and the step budget.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import prepare, train_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    import torch

    from graftkd.files import atomic_write_json
    from graftkd.study import code_revision, compare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits-root", type=Path, default=Path("runs/digits"))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--tuning", action="store_true", help="run the validation study of the defaults instead")
    p.add_argument("--methods", nargs="+", help="only these methods of the study")
    p.add_argument("--out", type=Path, help="results file (default benchmarks/results/atf_full.json, "
                                            "--tuning: atf_full_tuning.json)")
    p.add_argument("overrides", nargs="*", help="overrides of the study (e.g. seeds=[0,1])")
    args = p.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / ("atf_full_tuning.json" if args.tuning else "atf_full.json")
    study = Path("benchmarks/studies/tuning/atf_full_digits.yaml" if args.tuning else
                 "benchmarks/studies/atf_full_digits.yaml")
    command = shlex.join(["python", "benchmarks/atf_full.py", *(sys.argv[1:] if argv is None else argv)])
    manifest = prepare(args.digits_root)
    torch.set_num_threads(1)
    teacher = train_teacher(manifest, args.digits_root / "teachers", "resnet20")
    overrides = [f"data.root={manifest}", f"teachers.0.checkpoint={teacher}"] + args.overrides
    result = compare(study, overrides, args.jobs, None, command, methods=args.methods)
    # the revision the runs were measured with (the study records it when it starts)
    atomic_write_json(out, {"revision": result.get("revision") or code_revision()["commit"], "command": command,
                            "studies": {"digits": result}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
