"""``build_data``: source -> records -> group split (written as splits.csv) -> few-shot -> datasets."""
from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from graftkd.config import DataConfig
from graftkd.data.breakhis import read_breakhis
from graftkd.data.cifar import read_cifar
from graftkd.data.datasets import ArrayDataset, FileDataset, base_image, verify_images
from graftkd.data.pixels import IMAGE_SUFFIXES
from graftkd.data.sources import read_csv_manifest, read_folder
from graftkd.data.splits import SPLITS, _read_csv, assign_splits, check_class_coverage, record_key, write_splits
from graftkd.data.stain import fit_normalizer, reference_images
from graftkd.data.synthetic import ensure_tree, record_centres, tree_key
from graftkd.data.transforms import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN,
                                     IMAGENET_STD, base_side, eval_transform, mix_seed, train_transform)
from graftkd.data.types import DataBundle, Record
from graftkd.errors import UserError


def default_work_dir() -> Path:
    """Shared cache folder when no run folder is given: ``$GRAFTKD_CACHE`` or ``~/.cache/graftkd``."""
    env = os.environ.get("GRAFTKD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "graftkd"


def synthetic_root(cfg: DataConfig, work_dir: Path) -> Path:
    """Where the synthetic tree lives: ``data.root`` when given, else ``<work_dir>/.synthetic/<hash>``."""
    return Path(cfg.root) if cfg.root is not None else work_dir / ".synthetic" / tree_key(cfg.synthetic)


def few_shot(records: Sequence[Record], shots: int | None, max_per_group: int | None, seed: int) -> tuple[list[int], dict]:
    """Indices of a seeded few-shot subset: ``shots`` images per class, at most ``max_per_group`` per group.

    Classes with fewer eligible images keep all of them (reported in ``short``).
    """
    if shots is None and max_per_group is None:
        return list(range(len(records))), {}
    rng = np.random.default_rng([seed, 0x5407])
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_class[r.label].append(i)
    chosen: list[int] = []
    per_class: dict[int, int] = {}
    for label in sorted(by_class):
        idx = by_class[label]
        taken: Counter = Counter()
        got = 0
        for j in rng.permutation(len(idx)):
            r = records[idx[j]]
            if max_per_group is not None and taken[r.group] >= max_per_group:
                continue
            chosen.append(idx[j])
            taken[r.group] += 1
            got += 1
            if shots is not None and got == shots:
                break
        per_class[label] = got
    short = {lab: n for lab, n in per_class.items() if shots is not None and n < shots}
    return sorted(chosen), {"shots": shots, "max_per_group": max_per_group, "seed": seed,
                            "per_class": per_class, "short": short}


TRUE, FALSE = ("1", "true", "yes", "y"), ("0", "false", "no", "n", "")


def read_id_file(path: Path) -> list[str]:
    """Ids of a ``data.shots_file``: a CSV with a ``path`` or ``index`` column, else one id a line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.shots_file not found: {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    if lines and ("," in lines[0] or lines[0] in ("path", "index")):
        rows = _read_csv(path, ())
        col = next((c for c in ("path", "index") if rows and c in rows[0]), None)
        if col is None:
            raise UserError(f"{path}: a CSV shots_file needs a 'path' or 'index' column")
        return [r[col] for r in rows]
    return lines


def given_shots(records: Sequence[Record], assign: Sequence[str], cfg: DataConfig,
                root: Path | None) -> tuple[list[Record], str]:
    """The training records a user named (``shots_file`` ids or a truthy ``shots_column``), in
    record order, and where they came from. Every named image must exist and be in the train split."""
    split = {record_key(r, root): a for r, a in zip(records, assign)}
    if cfg.shots_file is not None:
        ids = [Path(i).as_posix() if not i.isdigit() else i for i in read_id_file(cfg.shots_file)]
        unknown = [i for i in ids if i not in split]
        if unknown:
            raise UserError(f"data.shots_file {cfg.shots_file}: {len(unknown)} id(s) are not images of this data "
                            f"set, e.g. {unknown[0]!r} (ids are paths relative to {root}, as in splits.csv)")
        wanted, source = set(ids), f"file {cfg.shots_file}"
    else:
        col = cfg.shots_column
        wanted = set()
        for r in records:
            value = r.meta.get("columns", {}).get(col)
            if value is None:
                raise UserError(f"data.shots_column = {col!r}: the manifest has no such column")
            if value.lower() not in TRUE + FALSE:
                raise UserError(f"data.shots_column {col!r}: value {value!r} of {record_key(r, root)} is not "
                                f"1/true/yes or 0/false/no/empty")
            if value.lower() in TRUE:
                wanted.add(record_key(r, root))
        source = f"manifest column {col!r}"
    outside = sorted(i for i in wanted if split[i] != "train")
    if outside:
        raise UserError(f"data.shots ({source}): {len(outside)} labelled image(s) are not in the train split, e.g. "
                        f"{outside[0]!r} in {split[outside[0]]}")
    chosen = [r for r, a in zip(records, assign) if a == "train" and record_key(r, root) in wanted]
    if not chosen:
        raise UserError(f"data.shots ({source}) names no image")
    return chosen, source


def check_labelled_classes(train: Sequence[Record], in_train: Sequence[int], classes: list[str], what: str) -> None:
    """A few-shot set that leaves a class of the training split without labelled images is an error
    naming the class (as a split that leaves a class out is)."""
    have = {r.label for r in train}
    left = [classes[c] for c in in_train if c not in have]
    if left:
        raise UserError(f"{what} has no labelled training image of class {left[0]!r}"
                        + (f" (nor of {', '.join(map(repr, left[1:]))})" if len(left) > 1 else "")
                        + "; every class needs at least one")


def shot_report(train: Sequence[Record], classes: list[str], root: Path | None, how: dict) -> dict:
    """``info["fewshot"]``: shots per class (and the common count, when every class has it) and the
    training images themselves, as splits.csv ids."""
    per_class = Counter(r.label for r in train)
    counts = {classes[k]: per_class.get(k, 0) for k in range(len(classes))}
    common = set(counts.values())
    return {**how, "shots": common.pop() if len(common) == 1 else None, "per_class": counts,
            "images": sorted(record_key(r, root) for r in train)}


def _preset_stats(cfg: DataConfig) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    mean, std = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}.get(
        cfg.source, (IMAGENET_MEAN, IMAGENET_STD))
    return tuple(cfg.mean or mean), tuple(cfg.std or std)  # type: ignore[return-value]


def _counts(records: Sequence[Record], classes: list[str]) -> dict:
    c = Counter(r.label for r in records)
    return {"images": len(records), "groups": len({r.group for r in records}),
            "per_class": {classes[k]: c.get(k, 0) for k in range(len(classes))}}


def build_data(cfg: DataConfig, seed: int, run_dir: Path | None = None, *, work_dir: Path | None = None) -> DataBundle:
    """Read ``cfg.source``, split on groups, few-shot the training split, build the three datasets.

    ``run_dir`` (when given) receives ``splits.csv``. Shared caches (the generated synthetic tree in
    ``.synthetic/<hash>``, memory-mapped decoded images in ``.cache/decoded``) go to ``work_dir``,
    by default the run folder's parent, else ``default_work_dir()``.
    """
    work = Path(work_dir) if work_dir is not None else (Path(run_dir).parent if run_dir is not None else default_work_dir())
    info: dict = {"source": cfg.source}
    array = None
    sizes: dict[str, tuple[int, int]] = {}
    content_keys: dict[str, str] = {}
    root: Path | None = Path(cfg.root) if cfg.root is not None else None
    if cfg.source in ("breakhis", "synthetic"):
        if cfg.source == "synthetic":
            root = ensure_tree(synthetic_root(cfg, work), cfg.synthetic)
            info["synthetic"] = {"root": str(root), "key": tree_key(cfg.synthetic)}
        if root is None:
            raise UserError("data.source=breakhis needs data.root (an unpacked BreaKHis_v1 or a folder below it)")
        records, report = read_breakhis(root, cfg.task, cfg.magnification, cfg.on_bad_file, cfg.patient_suffix)
        classes = report.pop("classes")
        if cfg.source == "synthetic":
            records = record_centres(root, records)
    elif cfg.source in ("cifar10", "cifar100"):
        array, records, classes = read_cifar(cfg.source, root)  # type: ignore[arg-type]
        report = {}
    elif cfg.source == "folder":
        records, classes, report = read_folder(root, cfg.on_bad_file)  # type: ignore[arg-type]
    else:
        records, classes, report = read_csv_manifest(root, cfg.on_bad_file)  # type: ignore[arg-type]
        root = root.parent if root is not None else None
    info.update(report)
    if array is None:  # every file fully decoded once in worker processes (remembered per content hash)
        memo = work / ".cache" / "verified" / f"{hashlib.sha1(str(Path(root or '.').resolve()).encode()).hexdigest()[:16]}.json"
        checked = verify_images([r.path for r in records], memo, max_pixels=cfg.max_pixels,  # type: ignore[misc]
                                digests_out=content_keys)
        bad = [f"{p}: {v}" for p, v in checked.items() if isinstance(v, str)]
        if bad and cfg.on_bad_file == "error":
            raise UserError(f"cannot decode image {bad[0]} (set data.on_bad_file=skip to leave such files out"
                            + (f"; {len(bad) - 1} more" if len(bad) > 1 else "") + ")")
        sizes = {p: v for p, v in checked.items() if not isinstance(v, str)}  # type: ignore[misc]
        records = [r for r in records if r.path in sizes]
        info["skipped_unreadable"] = len(bad)
        if bad:
            info["unreadable_examples"] = bad[:5]
        if not records:
            raise UserError(f"no readable images in {cfg.root}")
    assign, split_desc = assign_splits(records, cfg.split, seed, root)
    empty = check_class_coverage(records, assign, classes, cfg.split)
    if empty:
        split_desc["empty_classes"] = empty
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"graftkd: warning: the split leaves {'; '.join(empty)}", file=sys.stderr)
    def splits_writer(folder: Path, records: list[Record] = records, assign: list[str] = assign) -> Path:
        return write_splits(Path(folder) / "splits.csv", records, assign, root)

    if run_dir is not None:
        split_desc["written"] = str(splits_writer(Path(run_dir)))
    parts = {s: [r for r, a in zip(records, assign) if a == s] for s in SPLITS}
    if not parts["train"]:
        raise UserError(f"the split left no training images ({len(records)} images, {split_desc})")
    train_split = parts["train"]
    in_train = sorted({r.label for r in parts["train"]})
    if cfg.shots_file is not None or cfg.shots_column is not None:
        parts["train"], given = given_shots(records, assign, cfg, root)
        check_labelled_classes(parts["train"], in_train, classes, f"the given labelled set ({given})")
        shot_info = shot_report(parts["train"], classes, root, {"given": given})
        if cfg.shots is not None and any(n != cfg.shots for n in shot_info["per_class"].values()):
            raise UserError(f"data.shots = {cfg.shots}, but the given labelled set ({given}) has "
                            f"{shot_info['per_class']} images per class")
    else:
        # the split is fixed by data.split.seed; the shots drawn from it vary with the experiment seed
        keep, drawn = few_shot(parts["train"], cfg.shots, cfg.max_per_group, seed)
        parts["train"] = [parts["train"][i] for i in keep]
        check_labelled_classes(parts["train"], in_train, classes, "the drawn few-shot set")
        shot_info = {}
        if drawn:
            shot_info = shot_report(parts["train"], classes, root, {
                "drawn": {k: drawn[k] for k in ("shots", "max_per_group", "seed")},
                "short": {classes[k]: n for k, n in drawn["short"].items()}})
    mean, std = _preset_stats(cfg)
    aug = train_transform(cfg.augment, cfg.image_size, mean, std, cfg.stain_jitter.scale, cfg.stain_jitter.shift)
    ev = eval_transform(cfg.image_size, mean, std)
    side = base_side(cfg.image_size)
    stain = None
    if cfg.stain_norm.method != "none":
        if array is not None:
            raise UserError(f"data.stain_norm needs images read from files, not data.source={cfg.source}")
        sn = cfg.stain_norm
        refs, fitted_on = reference_images(sn.reference, [r.path for r in train_split], sn.sample, sn.seed,  # type: ignore[misc]
                                           lambda p: base_image(p, side, cfg.max_pixels))
        if root is not None:
            fitted_on["images"] = [record_key(Record(p, 0, ""), root) for p in fitted_on.get("images", [])]
        stain = fit_normalizer(sn.method, refs, fitted_on)
        info["stain_norm"] = stain.describe()

    def dataset(recs: list[Record], augment, data_seed: int):
        if array is not None:
            return ArrayDataset(recs, augment, ev, data_seed, array)
        return FileDataset(recs, augment, ev, data_seed, side, sizes=[sizes[r.path] for r in recs],  # type: ignore[index]
                           cache=cfg.decoded_cache, cache_dir=work / ".cache" / "decoded", stain=stain,
                           max_pixels=cfg.max_pixels, content_keys=content_keys)

    datasets = {name: dataset(recs, aug if name == "train" else None, seed) for name, recs in parts.items()}
    unlabeled = None
    if cfg.unlabeled is not None:
        pool, info["unlabeled"] = unlabeled_pool(cfg, train_split, parts, root, work, sizes)
        unlabeled = dataset(pool, aug, mix_seed(seed, 0x0B1))  # its own view seeds
        unlabeled.index_offset = len(datasets["train"])
    info.update({
        "root": str(cfg.root) if cfg.root is not None else info.get("synthetic", {}).get("root"),
        "classes": classes, "num_classes": len(classes),
        **({"task": cfg.task, "magnification": cfg.magnification} if cfg.source in ("breakhis", "synthetic") else {}),
        "split": split_desc, "split_seed": split_desc["seed"], "shots": shot_info.get("shots"), "fewshot": shot_info,
        "counts": {s: _counts(parts[s], classes) for s in SPLITS},
    })
    if len({r.group for r in records}) < len(records):  # real groups (patients): list them per split
        info["groups"] = {s: sorted({r.group for r in parts[s]}) for s in SPLITS}
    return DataBundle(datasets["train"], datasets["val"], datasets["test"], classes, mean, std, cfg.image_size, info,
                      splits_writer, unlabeled=unlabeled, stain=stain)


def unlabeled_pool(cfg: DataConfig, train_split: list[Record], parts: dict[str, list[Record]], root: Path | None,
                   work: Path, sizes: dict[str, tuple[int, int]]) -> tuple[list[Record], dict]:
    """The unlabelled transfer set (records labelled -1) and its report. ``train_rest``: the training
    split's images that are not labelled shots. A folder or CSV: its images, less every image of a
    validation or test patient (by group, and by file) and the labelled ones. ``sizes`` gets the
    sizes of newly verified files."""
    from dataclasses import replace

    from graftkd.data.breakhis import parse_name

    labelled = {r.path if r.path is not None else ("index", r.meta.get("index")) for r in parts["train"]}
    key = (lambda r: r.path if r.path is not None else ("index", r.meta.get("index")))
    if cfg.unlabeled == "train_rest":
        pool = [replace(r, label=-1) for r in train_split if key(r) not in labelled]
        if not pool:
            raise UserError("data.unlabeled = train_rest, but every training image is labelled (set data.shots, or "
                            "give a folder or CSV of unlabelled images)")
        return pool, {"source": "train_rest", "images": len(pool), "patients": len({r.group for r in pool})}
    src = Path(cfg.unlabeled)  # type: ignore[arg-type]
    if src.is_dir():
        files = sorted(str(p) for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.name.startswith("."))
        groups: list[str | None] = [None] * len(files)
    elif src.is_file():
        rows = _read_csv(src, ("path",))
        files = [str((src.parent / r["path"]).resolve()) if not Path(r["path"]).is_absolute() else r["path"]
                 for r in rows]
        groups = [r.get("group") or None for r in rows]
    else:
        raise UserError(f"data.unlabeled: {src} is neither 'train_rest', a folder nor a CSV file")
    held_out = [r for s in ("val", "test") for r in parts[s]]
    held_groups = {r.group for r in held_out}
    held_files = {str(Path(r.path).resolve()) for r in held_out if r.path is not None}
    labelled_files = {str(Path(p).resolve()) for p in labelled if isinstance(p, str)}
    pool, dropped_held, dropped_labelled = [], 0, 0
    for f, g in zip(files, groups):
        if g is None:  # a BreakHis file name names its patient (as the reader's group); else the file is its own
            parsed = parse_name(Path(f).name)
            g = parsed.patient_key(cfg.patient_suffix) if parsed is not None else str(Path(f).resolve())
        resolved = str(Path(f).resolve())
        if g in held_groups or resolved in held_files:
            dropped_held += 1
        elif resolved in labelled_files:
            dropped_labelled += 1
        else:
            pool.append(Record(f, -1, g, {}))
    memo = work / ".cache" / "verified" / f"{hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:16]}.json"
    checked = verify_images([r.path for r in pool if r.path not in sizes], memo,  # type: ignore[misc]
                            max_pixels=cfg.max_pixels)
    bad = [f"{p}: {v}" for p, v in checked.items() if isinstance(v, str)]
    if bad and cfg.on_bad_file == "error":
        raise UserError(f"data.unlabeled: cannot decode image {bad[0]} (set data.on_bad_file=skip to leave such files "
                        f"out" + (f"; {len(bad) - 1} more" if len(bad) > 1 else "") + ")")
    sizes.update({p: v for p, v in checked.items() if not isinstance(v, str)})  # type: ignore[misc]
    pool = [r for r in pool if r.path in sizes]
    if not pool:
        raise UserError(f"data.unlabeled: no usable image in {src} ({dropped_held} of validation/test patients, "
                        f"{dropped_labelled} labelled, {len(bad)} unreadable)")
    return pool, {"source": str(src), "images": len(pool), "patients": len({r.group for r in pool}),
                  "excluded_val_test": dropped_held, "excluded_labelled": dropped_labelled,
                  "skipped_unreadable": len(bad)}
