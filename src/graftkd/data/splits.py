"""Group-level (patient-level) splits: stratified fractions, k folds, official Folds.csv, predefined,
and the ``splits.csv`` file a run writes so the split can be re-used.

Every function assigns whole groups, so no group ever appears in two splits.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from graftkd.config import SplitConfig
from graftkd.data.types import Record
from graftkd.files import atomic_write_text
from graftkd.errors import UserError

SPLITS = ("train", "val", "test")


def group_strata(records: Sequence[Record]) -> dict[str, tuple[int, str]]:
    """Stratum of every group: (class, subtype) when records carry a subtype (BreakHis), else
    (class, ""); a group whose records disagree takes its most frequent pair."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        votes[r.group][(r.label, str(r.meta.get("subtype", "")))] += 1
    return {g: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, c in votes.items()}


def _shuffled_strata(groups: Sequence[str], strata: dict[str, tuple[int, str]],
                     rng: np.random.Generator) -> list[list[str]]:
    """Groups by stratum, shuffled within each stratum, strata in a seeded random order."""
    by: dict[tuple[int, str], list[str]] = defaultdict(list)
    for g in sorted(set(groups)):
        by[strata[g]].append(g)
    blocks = [[members[j] for j in rng.permutation(len(members))] for _, members in sorted(by.items())]
    return [blocks[j] for j in rng.permutation(len(blocks))]


def deal(n: int, fractions: Sequence[float]) -> list[int]:
    """Part index for positions 0..n-1 such that every prefix is as close as possible to the fractions
    (largest deficit first; position 0 always goes to part 0, train). Dealt over groups ordered by
    stratum, it gives exact proportions and per-stratum proportions within one group, even when
    strata hold only one or two groups; 4 groups or more give every part at least one (0.6/0.2/0.2)."""
    target = np.asarray(fractions, dtype=float) / float(sum(fractions))
    counts = np.zeros(len(target))
    out = []
    for t in range(n):
        j = int(np.argmax(target * (t + 1) - counts)) if t else 0
        counts[j] += 1
        out.append(j)
    return out


def split_fraction(groups: Sequence[str], strata: dict[str, tuple[int, str]], fractions: Sequence[float],
                   names: Sequence[str], seed: int) -> dict[str, str]:
    """Stratified, seeded group split by fractions -> {group: name}. Each class is dealt on its own
    (its subtypes in a seeded order), so every class gets its share of every part, not just the total;
    a class with at least as many groups as parts gets at least one group in each (taken from the
    largest part), so 3 patients give 1/1/1 rather than none in test."""
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    wanted = [j for j, f in enumerate(fractions) if f > 0]
    for label in sorted({strata[g][0] for g in groups}):
        members = [g for g in groups if strata[g][0] == label]
        ordered = [g for block in _shuffled_strata(members, strata, rng) for g in block]
        parts = deal(len(ordered), fractions)
        if len(ordered) >= len(wanted):  # every part gets one group of the class if it can (3 groups: 1/1/1)
            for j in wanted:
                if j not in parts:
                    donor = max(wanted, key=lambda k: (parts.count(k), -k))
                    parts[len(parts) - 1 - parts[::-1].index(donor)] = j
        out.update({g: names[j] for g, j in zip(ordered, parts)})
    return out


def split_kfold(groups: Sequence[str], strata: dict[str, tuple[int, str]], k: int, seed: int) -> dict[str, int]:
    """Stratified, seeded k-fold assignment of groups -> {group: fold}; fold sizes differ by at most one."""
    rng = np.random.default_rng(seed)
    out: dict[str, int] = {}
    counter = 0
    for members in _shuffled_strata(groups, strata, rng):
        for g in members:
            out[g] = counter % k
            counter += 1
    return out


def carve_val(assign: dict[str, str], strata: dict[str, tuple[int, str]], val_fraction: float, seed: int) -> dict[str, str]:
    """Move a stratified ``val_fraction`` of the train groups to val."""
    if val_fraction <= 0:
        return assign
    train = [g for g, s in assign.items() if s == "train"]
    moved = split_fraction(train, strata, [1 - val_fraction, val_fraction], ["train", "val"], seed + 1)
    return {**assign, **moved}


def read_folds_csv(path: Path, fold: int) -> tuple[dict[tuple[str, int], str], list[str]]:
    """Official BreakHis ``Folds.csv`` (fold,mag,grp,filename) -> {(file name, mag): train|test} for the
    ``fold``-th fold (0-based over the sorted fold numbers in the file) and the fold numbers found."""
    rows = _read_csv(path, ("fold", "mag", "grp", "filename"))
    folds = sorted({r["fold"] for r in rows}, key=lambda f: (len(f), f))
    if fold >= len(folds):
        raise UserError(f"split.fold={fold} but {path} has {len(folds)} folds ({', '.join(folds)}); use 0..{len(folds) - 1}")
    chosen = folds[fold]
    out: dict[tuple[str, int], str] = {}
    for i, r in enumerate(rows, start=2):
        if r["fold"] != chosen:
            continue
        grp = r["grp"].strip().lower()
        if grp not in ("train", "test"):
            raise UserError(f"{path}, line {i}: grp must be train or test, got {r['grp']!r}")
        try:
            mag = int(r["mag"])
        except ValueError:
            raise UserError(f"{path}, line {i}: mag must be an integer, got {r['mag']!r}") from None
        out[(Path(r["filename"].replace("\\", "/")).name, mag)] = grp
    return out, folds


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CSV file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a UTF-8 text CSV") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    for col in required:
        if col not in header:
            raise UserError(f"{path}: missing column '{col}' (header: {','.join(header) or 'empty'})")
    return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def record_key(r: Record, root: Path | None) -> str:
    """Stable key of a record in ``splits.csv``: path relative to the data root, or the array index."""
    if r.path is None:
        return str(r.meta["index"])
    return Path(os.path.relpath(r.path, root)).as_posix() if root is not None else Path(r.path).as_posix()


def write_splits(path: Path, records: Sequence[Record], assign: Sequence[str], root: Path | None) -> Path:
    """Write ``splits.csv``: path (or index), label, group, split[, magnification]."""
    key_col = "index" if records and records[0].path is None else "path"
    has_mag = bool(records) and "magnification" in records[0].meta
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([key_col, "label", "group", "split"] + (["magnification"] if has_mag else []))
    for r, s in zip(records, assign):
        w.writerow([record_key(r, root), r.label, r.group, s] + ([r.meta["magnification"]] if has_mag else []))
    return atomic_write_text(path, buf.getvalue())


def read_splits(path: Path, records: Sequence[Record], root: Path | None) -> list[str]:
    """Split of every record from a ``splits.csv`` written by an earlier run.

    Rows for records not present now are ignored (e.g. another magnification); a present record
    the file does not list, or a group split across two parts, is an error.
    """
    rows = _read_csv(path, ("split",))
    key_col = "index" if records and records[0].path is None else "path"
    if rows and key_col not in rows[0]:
        raise UserError(f"{path}: missing column '{key_col}'")
    table: dict[str, str] = {}
    for i, r in enumerate(rows, start=2):
        if r["split"] not in SPLITS:
            raise UserError(f"{path}, line {i}: split must be train, val or test, got {r['split']!r}")
        table[r[key_col]] = r["split"]
    out, missing = [], []
    for r in records:
        s = table.get(record_key(r, root))
        if s is None:
            missing.append(record_key(r, root))
        out.append(s or "")
    if missing:
        raise UserError(f"split.file {path} does not list {len(missing)} of the current records, e.g. {missing[0]}")
    check_groups(records, out, str(path))
    return out


def check_groups(records: Sequence[Record], assign: Sequence[str], source: str) -> None:
    """UserError when a group appears in two splits."""
    seen: dict[str, str] = {}
    for r, s in zip(records, assign):
        if seen.setdefault(r.group, s) != s:
            raise UserError(f"{source}: group {r.group!r} appears in both {seen[r.group]} and {s}")


def expected_parts(cfg: SplitConfig, records: Sequence[Record], assign: Sequence[str]) -> list[str]:
    """The parts the split is meant to fill: a fraction of 0 (or ``val_fraction=0`` with no given val)
    leaves a part empty on purpose; a split file fills the parts it names."""
    if cfg.file is not None:
        return [s for s in SPLITS if s in set(assign)]
    if cfg.kind == "fraction":
        return [s for s, f in zip(SPLITS, (cfg.train, cfg.val, cfg.test)) if f > 0]
    given = {r.meta.get("split") for r in records} if cfg.kind == "predefined" else {"train", "test"}
    return [s for s in SPLITS if s in given or (s == "val" and cfg.val_fraction > 0)]


def check_class_coverage(records: Sequence[Record], assign: Sequence[str], classes: Sequence[str],
                         cfg: SplitConfig) -> list[str]:
    """Problems of a split that leaves a class (one that has images) without images in a part it
    should fill (``expected_parts``). ``cfg.on_empty_class='error'``: UserError naming the classes;
    ``'warn'``: the problems are returned."""
    have: dict[str, set[int]] = {s: set() for s in SPLITS}
    for r, s in zip(records, assign):
        have[s].add(r.label)
    present = sorted({r.label for r in records})
    problems = []
    for s in expected_parts(cfg, records, assign):
        lacking = [f"'{classes[c]}'" for c in present if c not in have[s]]
        if lacking:
            problems.append(f"no {s} images of class {', '.join(lacking)}")
    if problems and cfg.on_empty_class == "error":
        raise UserError(f"the split leaves {'; '.join(problems)} (use more patients, other split fractions or "
                        f"another data.split.seed, or set data.split.on_empty_class=warn)")
    return problems


def split_centre(records: Sequence[Record], cfg: SplitConfig, strata: dict[str, tuple[int, str]],
                 seed: int) -> dict[str, str]:
    """Split by centre: the groups of ``cfg.test_centres`` are test, a stratified ``val_fraction`` of
    the other centres' groups val, the rest train (records carry ``meta['centre']``: the synthetic
    source's centres, a CSV manifest's ``centre`` column)."""
    centre_of: dict[str, str] = {}
    for r in records:
        c = r.meta.get("centre")
        if c is None:
            raise UserError(f"split.kind=centre, but image {r.path or r.meta.get('index')} has no centre (the "
                            f"synthetic source with synthetic.centres > 1, or a CSV manifest with a 'centre' column)")
        if centre_of.setdefault(r.group, str(c)) != str(c):
            raise UserError(f"split.kind=centre: group {r.group!r} has images of centres {centre_of[r.group]!r} "
                            f"and {str(c)!r}")
    centres = sorted(set(centre_of.values()))
    unknown = [c for c in cfg.test_centres if c not in centres]
    if unknown:
        raise UserError(f"split.test_centres: {', '.join(map(repr, unknown))} not among the data's centres "
                        f"({', '.join(centres)})")
    if set(cfg.test_centres) >= set(centres):
        raise UserError(f"split.test_centres = {cfg.test_centres} leaves no centre to train on")
    assign = {g: "test" if c in cfg.test_centres else "train" for g, c in centre_of.items()}
    return carve_val(assign, strata, cfg.val_fraction, seed)


def assign_splits(records: Sequence[Record], cfg: SplitConfig, seed: int, root: Path | None) -> tuple[list[str], dict]:
    """Split name (train/val/test) of every record, and a description for ``info``."""
    seed = cfg.seed if cfg.seed is not None else seed
    strata = group_strata(records)
    groups = [r.group for r in records]
    desc: dict = {"kind": cfg.kind, "seed": seed}
    if cfg.file is not None:
        return read_splits(cfg.file, records, root), {**desc, "kind": "file", "file": str(cfg.file)}
    if cfg.kind == "fraction":
        by_group = split_fraction(groups, strata, [cfg.train, cfg.val, cfg.test], SPLITS, seed)
        desc["fractions"] = [cfg.train, cfg.val, cfg.test]
    elif cfg.kind == "kfold":
        if cfg.fold >= cfg.k:
            raise UserError(f"split.fold={cfg.fold} must be < split.k={cfg.k}")
        if len(strata) < cfg.k:
            raise UserError(f"split.k={cfg.k} folds need at least {cfg.k} groups, found {len(strata)}")
        folds = split_kfold(groups, strata, cfg.k, seed)
        by_group = carve_val({g: "test" if f == cfg.fold else "train" for g, f in folds.items()}, strata,
                             cfg.val_fraction, seed)
        desc.update(k=cfg.k, fold=cfg.fold, val_fraction=cfg.val_fraction)
    elif cfg.kind == "official":
        if cfg.folds_csv is None:
            raise UserError("split.kind=official needs split.folds_csv (the BreakHis Folds.csv)")
        table, folds = read_folds_csv(cfg.folds_csv, cfg.fold)
        per_record, missing = [], []
        for r in records:
            s = table.get((Path(r.path or "").name, int(r.meta.get("magnification", -1))))
            if s is None:
                missing.append(r.path)
            per_record.append(s or "")
        if missing:
            raise UserError(f"{cfg.folds_csv} does not list {len(missing)} of the images, e.g. {missing[0]}")
        check_groups(records, per_record, str(cfg.folds_csv))
        by_group = carve_val({r.group: s for r, s in zip(records, per_record)}, strata, cfg.val_fraction, seed)
        desc.update(folds_csv=str(cfg.folds_csv), fold=cfg.fold, official_fold=folds[cfg.fold],
                    val_fraction=cfg.val_fraction)
    elif cfg.kind == "centre":
        by_group = split_centre(records, cfg, strata, seed)
        desc.update(test_centres=list(cfg.test_centres), val_fraction=cfg.val_fraction,
                    centres=sorted({str(r.meta["centre"]) for r in records}))
    else:  # predefined: the source says train/test (CIFAR, CSV split column, folder train/ test/)
        given = [r.meta.get("split") for r in records]
        if any(s is None for s in given):
            raise UserError("split.kind=predefined but this source has no predefined split "
                            "(CSV: add a 'split' column; folder: use train/ and test/ subfolders)")
        check_groups(records, given, "predefined split")
        by_group = {r.group: s for r, s in zip(records, given)}
        if not any(s == "val" for s in given):
            by_group = carve_val(by_group, strata, cfg.val_fraction, seed)
        desc["val_fraction"] = cfg.val_fraction
    return [by_group[r.group] for r in records], desc
