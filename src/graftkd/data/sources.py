"""Generic sources: an ImageFolder tree and a CSV manifest (``path,label[,group][,split]``)."""
from __future__ import annotations

from pathlib import Path

from graftkd.data.breakhis import IMAGE_SUFFIXES
from graftkd.data.splits import SPLITS, _read_csv
from graftkd.data.types import Record
from graftkd.errors import UserError


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith(".") and p.is_file())


def read_folder(root: Path, on_bad_file: str) -> tuple[list[Record], list[str], dict]:
    """``root/<class>/**/image`` or ``root/{train,val,test}/<class>/**/image`` (predefined split).

    Classes are the sorted class folder names (the union over split folders). An empty class folder
    is an error, or with ``on_bad_file='skip'`` the class is kept (stable indices) and reported.
    Groups are the images themselves.
    """
    if root is None or not Path(root).is_dir():
        raise UserError(f"data.root {root} is not a folder (expected <root>/<class>/<images>)")
    root = Path(root)
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    parts = [s for s in subdirs if s in SPLITS]
    if "train" in parts and set(subdirs) <= set(SPLITS):
        tops = {s: root / s for s in parts}
    else:
        tops = {None: root}
    class_dirs: dict[str, list[Path]] = {}
    for top in tops.values():
        for d in sorted(top.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                class_dirs.setdefault(d.name, []).append(d)
    if not class_dirs:
        raise UserError(f"{root} has no class folders (expected <root>/<class>/<images>)")
    classes = sorted(class_dirs)
    check_label_spellings(classes, f"{root} (class folders)")
    records: list[Record] = []
    empty: list[str] = []
    for split, top in tops.items():
        for label, name in enumerate(classes):
            d = top / name
            files = _images_under(d) if d.is_dir() else []
            if not files and d.is_dir():
                empty.append(str(d))
            for p in files:
                meta = {"split": split} if split is not None else {}
                records.append(Record(str(p), label, str(p), meta))
    counts = {c: sum(r.label == i for r in records) for i, c in enumerate(classes)}
    missing = [c for c, n in counts.items() if n == 0]
    if empty and (on_bad_file == "error" or not records):
        raise UserError(f"class folder {empty[0]} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        "remove it or set data.on_bad_file=skip to keep an empty class")
    return records, classes, {"empty_classes": missing, "predefined_split": tops.keys() != {None}}


def check_label_spellings(labels: list[str], where: str) -> None:
    """Two labels that differ only in case or surrounding spaces are one class spelt twice: an
    error naming both spellings (not two classes)."""
    spelt: dict[str, str] = {}
    for lab in dict.fromkeys(labels):
        key = lab.strip().casefold()
        if key in spelt and spelt[key] != lab:
            raise UserError(f"{where}: labels {spelt[key]!r} and {lab!r} differ only in case or spaces; "
                            f"spell each class one way")
        spelt.setdefault(key, lab)


CSV_COLUMNS = ("path", "label", "group", "split")


def read_csv_manifest(path: Path, on_bad_file: str) -> tuple[list[Record], list[str], dict]:
    """CSV with columns ``path,label`` and optional ``group`` and ``split``; paths relative to the CSV.
    Other columns are kept as text in ``meta["columns"]`` (e.g. a ``data.shots_column``).

    Labels are all integers (classes ``"0".."max"``) or names (classes sorted). A missing file is an
    error naming the row, or skipped and counted with ``on_bad_file='skip'``.
    """
    if path is None:
        raise UserError("data.source=csv needs data.root pointing at the CSV manifest")
    path = Path(path)
    rows = _read_csv(path, ("path", "label"))
    if not rows:
        raise UserError(f"{path}: the manifest has no rows")
    labels = [r["label"] for r in rows]
    for i, lab in enumerate(labels, start=2):
        if not lab:
            raise UserError(f"{path}, line {i}: empty label")
    check_label_spellings(labels, str(path))
    numeric = all(lab.lstrip("-").isdigit() for lab in labels)
    if numeric:
        ints = [int(lab) for lab in labels]
        if min(ints) < 0:
            raise UserError(f"{path}: integer labels must be >= 0, got {min(ints)}")
        classes = [str(i) for i in range(max(ints) + 1)]
        index = {str(i): i for i in range(len(classes))}
        index.update({lab: int(lab) for lab in labels})
    else:
        classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
    records: list[Record] = []
    missing: list[str] = []
    seen: dict[str, tuple[int, str]] = {}
    for i, r in enumerate(rows, start=2):
        if not r["path"]:
            raise UserError(f"{path}, line {i}: empty path")
        file = (path.parent / r["path"]).resolve() if not Path(r["path"]).is_absolute() else Path(r["path"])
        if not file.is_file():
            if on_bad_file == "error":
                raise UserError(f"{path}, line {i}: image {file} not found (set data.on_bad_file=skip to leave it out)")
            missing.append(str(file))
            continue
        meta: dict = {"columns": {k: v for k, v in r.items() if k not in CSV_COLUMNS}}
        if "split" in r:
            if r["split"] not in SPLITS:
                raise UserError(f"{path}, line {i}: split must be train, val or test, got {r['split']!r}")
            meta["split"] = r["split"]
        if r.get("centre"):
            meta["centre"] = r["centre"]  # split.kind = centre
        group = r.get("group") or str(file)
        if str(file) in seen and seen[str(file)][1] != r["label"]:
            first, label = seen[str(file)]
            raise UserError(f"{path}, lines {first} and {i}: image {file} is listed under two labels "
                            f"({label!r} and {r['label']!r}); give each image one label")
        if str(file) in seen:
            raise UserError(f"{path}, lines {seen[str(file)][0]} and {i}: image {file} is listed twice")
        seen[str(file)] = (i, r["label"])
        records.append(Record(str(file), index[r["label"]], group, meta))
    if not records:
        raise UserError(f"{path}: none of the listed images exist")
    return records, classes, {"missing_files": len(missing), "missing_examples": missing[:5]}
