"""ATF in its own setting: full labels (issue 23 item 4), on real digits and on synthetic histology.

Every training image labelled; through ``graftkd compare``, one step budget per study, 5 seeds, paired
with kd on the same student initialisation: kd, kd with logit standardisation, dkd, ATF at its class
defaults (``method: {name: atf}``) and in modes offline, offline_joint and online.

- digits (``benchmarks/studies/atf_full_digits.yaml``): real digits, resnet20 teacher, resnet8 student,
  400 steps at batch 16 -> ``benchmarks/results/atf_full.json``
- histology (``benchmarks/studies/atf_full_histology.yaml``): the few-shot histology study's synthetic
  patients (binary, patient split), its resnet20 teacher, resnet8 student, 300 steps at batch 16 ->
  ``benchmarks/results/atf_full_histology.json`` (image accuracy and patient recognition rate)

    python benchmarks/atf_full.py [--study digits|histology] [--digits-root runs/digits]
                                  [--histology-root runs/histology] [--jobs 1]
    python benchmarks/atf_full.py --tuning     # the validation study that chose the defaults (digits)

Each file: ``{"revision", "command", "studies": {<name>: <compare JSON>}}``; the compare JSON holds
the per-seed values, the step budget and the revision the runs were measured with.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fewshot  # noqa: E402
from digits_data import prepare, train_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    import torch

    from graftkd.files import atomic_write_json
    from graftkd.study import code_revision, compare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", choices=("digits", "histology"), help="run only this study (default: both)")
    p.add_argument("--digits-root", type=Path, default=Path("runs/digits"))
    p.add_argument("--histology-root", type=Path, default=Path("runs/histology"))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--tuning", action="store_true", help="run the validation study of the defaults instead "
                                                          "(digits only)")
    p.add_argument("--methods", nargs="+", help="only these methods of the study")
    p.add_argument("--out", type=Path, help="results file (with one study; default benchmarks/results/"
                                            "atf_full.json, atf_full_histology.json, --tuning: atf_full_tuning.json)")
    p.add_argument("overrides", nargs="*", help="overrides of the study (e.g. seeds=[0,1])")
    args = p.parse_args(argv)
    if args.tuning and args.study == "histology":
        p.error("--tuning is a digits study; drop --study histology")
    studies = ["digits"] if args.tuning else [args.study] if args.study else ["digits", "histology"]
    if args.out and len(studies) > 1:
        p.error("--out needs one study: add --study digits or --study histology")
    command = shlex.join(["python", "benchmarks/atf_full.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(1)
    for name in studies:
        if name == "digits":
            manifest = prepare(args.digits_root)
            teacher = train_teacher(manifest, args.digits_root / "teachers", "resnet20")
            overrides = [f"data.root={manifest}", f"teachers.0.checkpoint={teacher}"]
            study = Path("benchmarks/studies/tuning/atf_full_digits.yaml" if args.tuning else
                         "benchmarks/studies/atf_full_digits.yaml")
            out = RESULTS / ("atf_full_tuning.json" if args.tuning else "atf_full.json")
        else:
            fewshot.train_teachers(args.histology_root, archs=("resnet20",))
            overrides = [f"data.root={args.histology_root / 'data'}", "teachers.0.checkpoint="
                         f"{args.histology_root / 'teachers' / 'teacher_resnet20' / 'model.pt'}"]
            study = Path("benchmarks/studies/atf_full_histology.yaml")
            out = RESULTS / "atf_full_histology.json"
        result = compare(study, overrides + args.overrides, args.jobs, None, command, methods=args.methods)
        # the revision the runs were measured with (the study records it when it starts)
        atomic_write_json(args.out or out, {"revision": result.get("revision") or code_revision()["commit"],
                                            "command": command, "studies": {name: result}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
