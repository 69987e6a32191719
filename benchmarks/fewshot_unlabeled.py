"""The unlabelled rest of the training split as a transfer set (issue 24 item 5), on real digits
and on synthetic histology.

    python benchmarks/fewshot_unlabeled.py --dataset digits|histology [--jobs 1] [overrides of the study ...]

``digits``: the digits of ``benchmarks/fewshot_digits.py`` (same folder, ``runs/digits``) with teachers
resnet20 and resnet8 trained on the whole train split, then ``benchmarks/studies/fewshot_unlabeled_digits.yaml``.
To fit the shared CPU, the runs score a fixed subset of the digits' held-out images
(``manifest_unlabeled_study.csv``: every 3rd validation and every 2nd test image, 100 and 300; the
training rows, and so the teachers and the unlabelled pool, are those of ``manifest.csv``).
``histology``: generates the synthetic tree of ``benchmarks/studies/fewshot_unlabeled_histology.yaml``
under ``runs/histology_unlabeled`` and trains its teachers (resnet20, resnet8), then runs that study.

Each study (kd, mt_kd and graft_fused, each with and without ``data.unlabeled: train_rest``, at 5
and 10 labels per class, 5 seeds, one optimiser-step budget) goes through ``graftkd compare``; its
result is stored under ``studies.<dataset>`` of ``benchmarks/results/fewshot_unlabeled.json`` (the
other data set's entry is kept).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import prepare as prepare_digits  # noqa: E402
from digits_data import train_teacher  # noqa: E402
from fewshot import train_teachers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fewshot_unlabeled.json"
STUDIES = {"digits": ROOT / "benchmarks" / "studies" / "fewshot_unlabeled_digits.yaml",
           "histology": ROOT / "benchmarks" / "studies" / "fewshot_unlabeled_histology.yaml"}
FOLDERS = {"digits": Path("runs/digits"), "histology": Path("runs/histology_unlabeled")}
TEACHERS = ("resnet20", "resnet8")
SMALL = "manifest_unlabeled_study.csv"


def prepare_digits_study(root: Path) -> list[str]:
    """Digits, their teachers and the study's manifest (all training rows, every 3rd validation row
    and every 2nd test row); returns the study's overrides for ``root``."""
    import csv

    import torch

    manifest = prepare_digits(root)
    torch.set_num_threads(1)
    for arch in TEACHERS:
        train_teacher(manifest, root / "teachers", arch, 30)
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    seen = {"val": 0, "test": 0}
    keep = []
    for r in rows:
        if r["split"] in seen:
            seen[r["split"]] += 1
            if (seen[r["split"]] - 1) % (3 if r["split"] == "val" else 2):
                continue
        keep.append(r)
    with (root / SMALL).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    return [f"data.root={root / SMALL}"] + [
        f"teachers.{k}.checkpoint={root / 'teachers' / f'teacher_{arch}' / 'model.pt'}" for k, arch in enumerate(TEACHERS)]


def prepare_histology_study(root: Path) -> list[str]:
    train_teachers(root, STUDIES["histology"], 15, TEACHERS)
    return [f"data.root={root / 'data'}"] + [
        f"teachers.{k}.checkpoint={root / 'teachers' / f'teacher_{arch}' / 'model.pt'}" for k, arch in enumerate(TEACHERS)]


def budget_curves(probe: Path, dataset: str) -> dict:
    """The validation curves (step, val_acc) of a finished budget probe's runs (a compare results JSON
    of the same study at a longer budget), with the probe's command, revision and steps."""
    import csv

    d = json.loads(probe.read_text())
    d = d["studies"][dataset] if "studies" in d else d  # this script's results file, or compare's
    curves = {}
    for row in d["rows"]:
        for seed, run in zip(row.get("seeds", []), row.get("runs", [])):
            with (Path(run) / "log.csv").open(newline="") as f:
                points = [[int(r["val_step"]), float(r["val_acc"])] for r in csv.DictReader(f) if r.get("val_acc")]
            curves[f"{row['method']}_{row['shots']}shot_s{seed}"] = points
    return {"command": d["command"], "revision": d["revision"], "steps": d["steps"], "val_curves": curves}


def main(argv: list[str] | None = None) -> int:
    from graftkd.files import atomic_write_json
    from graftkd.study import compare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(STUDIES), required=True)
    p.add_argument("--root", type=Path, help="data and teachers (default runs/digits or runs/histology_unlabeled)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (1 thread each)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--methods", nargs="+", help="only these methods of the study (the same runs)")
    p.add_argument("--budget-from", type=Path, help="a finished compare results JSON of this study at a longer "
                                                     "budget (the probe the step budget was chosen on): its "
                                                     "validation curves are stored with the results")
    p.add_argument("overrides", nargs="*", help="overrides of the study (e.g. seeds=[0,1])")
    args = p.parse_args(argv)
    root = args.root or FOLDERS[args.dataset]
    overrides = (prepare_digits_study if args.dataset == "digits" else prepare_histology_study)(root)
    command = shlex.join(["python", "benchmarks/fewshot_unlabeled.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "study.json"
        compare(STUDIES[args.dataset].relative_to(ROOT), overrides + args.overrides, args.jobs, part, command,
                methods=args.methods)
        result = json.loads(part.read_text())
    merged = json.loads(args.results.read_text()) if args.results.is_file() else {}
    studies = merged.get("studies", {}) if isinstance(merged.get("studies"), dict) else {}
    if args.budget_from is not None:
        result["budget_probe"] = budget_curves(args.budget_from, args.dataset)
    elif "budget_probe" in studies.get(args.dataset, {}):
        result["budget_probe"] = studies[args.dataset]["budget_probe"]
    studies[args.dataset] = result
    atomic_write_json(args.results, {"studies": dict(sorted(studies.items()))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
