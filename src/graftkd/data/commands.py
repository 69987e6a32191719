"""``graftkd data summary -c cfg.yaml [a.b=c ...]``: images and patients per class, subtype,
magnification and split, as Markdown tables; and the argument parser of ``graftkd synth``.

Argument parsers import neither torch nor numpy (``graftkd --help`` builds them all)."""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable


if TYPE_CHECKING:
    from graftkd.data.types import DataBundle, Record


def _table(title: str, rows: list[list[object]]) -> str:
    from graftkd.data.splits import SPLITS

    header = [title, "images", "patients", *SPLITS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _rows(parts: dict[str, list[Record]], key: Callable[[Record], object]) -> list[list[object]]:
    from graftkd.data.splits import SPLITS

    images: dict[object, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
    groups: dict[object, set[str]] = defaultdict(set)
    for split, recs in parts.items():
        for r in recs:
            images[key(r)][split] += 1
            groups[key(r)].add(r.group)
    return [[k, sum(images[k].values()), len(groups[k]), *(images[k][s] for s in SPLITS)]
            for k in sorted(images, key=str)]


def summary_table(bundle: DataBundle) -> str:
    """Markdown tables of a bundle: per class, per subtype and per magnification (when the records
    carry them), and per split. Patients are the records' groups."""
    from graftkd.data.splits import SPLITS

    parts = {"train": bundle.train.records, "val": bundle.val.records, "test": bundle.test.records}
    info = bundle.info
    task = f"  task: {info['task']}" if "task" in info else ""
    out = [f"source: {info['source']}  root: {info.get('root')}{task}  "
           f"classes: {len(bundle.classes)}  split: {info['split']['kind']} (seed {info['split_seed']})"]
    shot = info.get("fewshot")
    if shot:
        how = (f"given by {shot['given']}" if "given" in shot else
               f"drawn with seed {shot['drawn']['seed']}, max {shot['drawn']['max_per_group']} per patient")
        out.append(f"few-shot: {shot['shots'] if shot['shots'] is not None else shot['per_class']} per class, {how}")
    for key in ("skipped_names", "skipped_unreadable", "missing_files"):
        if info.get(key):
            out.append(f"{key.replace('_', ' ')}: {info[key]}")
    merged = info.get("merged_patients") or {}
    if merged:
        out.append(f"merged patient ids ({len(merged)}, data.patient_suffix={info.get('patient_suffix')}): "
                   + "; ".join(f"{g} = {' + '.join(slides)}" for g, slides in merged.items()))
    for problem in info["split"].get("empty_classes", []):
        out.append(f"warning: {problem}")
    out += ["", _table("class", _rows(parts, lambda r: bundle.classes[r.label]))]
    first = next((r for recs in parts.values() for r in recs), None)
    if first is not None and "subtype" in first.meta:
        out += ["", _table("subtype", _rows(parts, lambda r: r.meta["subtype"]))]
    if first is not None and "magnification" in first.meta:
        rows = _rows(parts, lambda r: r.meta["magnification"])
        rows.sort(key=lambda row: int(row[0]))  # type: ignore[call-overload]
        out += ["", _table("magnification", [[f"{row[0]}X", *row[1:]] for row in rows])]
    split_rows = [[s, len(parts[s]), len({r.group for r in parts[s]}), *(len(parts[s]) if t == s else 0 for t in SPLITS)]
                  for s in SPLITS]
    out += ["", _table("split", split_rows)]
    return "\n".join(out)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``graftkd data``."""
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = sub.add_parser("summary", help="images and patients per class, subtype, magnification and split")
    s.add_argument("-c", "--config", default=None, help="experiment YAML (default: built-in defaults)")
    s.add_argument("overrides", nargs="*", default=[], help="config overrides like data.magnification=40")


def run_data(args: argparse.Namespace) -> int:
    """Run ``graftkd data <action>``."""
    import graftkd.methods  # noqa: F401  registers every method and its config section
    from graftkd.config import load_config
    from graftkd.data.build import build_data

    cfg = load_config(args.config, args.overrides)
    bundle = build_data(cfg.data, cfg.seed, None, work_dir=cfg.output.dir)
    print(summary_table(bundle))
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, e.g. 128x128, got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return w, h


def add_synth_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``graftkd synth``; an option left out takes its ``data.synthetic`` default
    (``SyntheticConfig``, read by ``run_synth``: building the schema here would slow ``--help``)."""
    p.add_argument("out", type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--patients", type=int, help="patients, >= 8 (default: data.synthetic.patients, 24)")
    p.add_argument("--size", type=_size, help="image size WxH (default: data.synthetic.size, 128x128)")
    p.add_argument("--images-per-patient", type=int,
                   help="images per patient and magnification (default: data.synthetic.images_per_patient, 8)")
    p.add_argument("--images-per-patient-max", type=int,
                   help="draw each patient's image count from images-per-patient..this (default: all equal)")
    p.add_argument("--magnifications", type=int, nargs="+", help="subset of 40 100 200 400 (default: all)")
    p.add_argument("--seed", type=int, help="generator seed (default: data.synthetic.seed, 0)")
    p.add_argument("--centres", type=int, help="centres with their own stain (default: data.synthetic.centres, 1)")
