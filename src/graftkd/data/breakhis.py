"""BreakHis (BreaKHis v1) reader: recursive scan, file-name parsing, folder cross-check.

File ``SOB_B_A-14-22549AB-40-001.png`` = procedure SOB, class B|M, subtype code, year, patient
(slide) id, magnification, sequence. The patient key is everything before the magnification
field (``SOB_B_A-14-22549AB``), shared across magnifications. Patient folders use ``_`` before
the year (``SOB_B_A_14-22549AB``) where file names use ``-``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from graftkd.data.types import Record
from graftkd.errors import UserError

#: subtype code -> (folder name, binary class)
SUBTYPES: dict[str, tuple[str, str]] = {
    "A": ("adenosis", "benign"),
    "F": ("fibroadenoma", "benign"),
    "PT": ("phyllodes_tumor", "benign"),
    "TA": ("tubular_adenoma", "benign"),
    "DC": ("ductal_carcinoma", "malignant"),
    "LC": ("lobular_carcinoma", "malignant"),
    "MC": ("mucinous_carcinoma", "malignant"),
    "PC": ("papillary_carcinoma", "malignant"),
}
BINARY_CLASSES = ["benign", "malignant"]
SUBTYPE_CLASSES = [name for name, _ in SUBTYPES.values()]
CLASS_CODE = {"B": "benign", "M": "malignant"}
MAGNIFICATIONS = (40, 100, 200, 400)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}

_CODES = "|".join(sorted(SUBTYPES, key=len, reverse=True))
FILE_RE = re.compile(
    rf"^SOB_(?P<cls>[BM])_(?P<sub>{_CODES})-(?P<year>\d{{2}})-(?P<pid>[0-9A-Za-z]+)-(?P<mag>40|100|200|400)-(?P<seq>\d+)$"
)
PATIENT_DIR_RE = re.compile(rf"^SOB_(?P<cls>[BM])_(?P<sub>{_CODES})_(?P<year>\d{{2}})-(?P<pid>[0-9A-Za-z]+)$")
MAG_DIR_RE = re.compile(r"^(?P<mag>\d+)X$", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedName:
    """The fields of one BreakHis file name."""

    tumor_class: str  # benign | malignant
    subtype: str  # folder name, e.g. adenosis
    code: str  # A, F, PT, TA, DC, LC, MC, PC
    patient: str  # SOB_B_A-14-22549AB
    magnification: int
    seq: int


def parse_name(name: str) -> ParsedName | None:
    """Parse a BreakHis file name (with or without extension); None when it does not match."""
    m = FILE_RE.match(Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name)
    if m is None:
        return None
    code = m["sub"]
    folder, tumor_class = SUBTYPES[code]
    if CLASS_CODE[m["cls"]] != tumor_class:
        return None  # e.g. SOB_M_A: adenosis is benign
    return ParsedName(tumor_class, folder, code, f"SOB_{m['cls']}_{code}-{m['year']}-{m['pid']}",
                      int(m["mag"]), int(m["seq"]))


def folder_conflict(parsed: ParsedName, rel_dirs: tuple[str, ...]) -> str | None:
    """Describe how the folders above a file contradict its name, or None when they agree.

    Only folders that look like BreakHis folders are checked (class, subtype, patient, ``<mag>X``),
    so the reader also works on flat copies of the files.
    """
    for d in rel_dirs:
        low = d.lower()
        if low in CLASS_CODE.values() and low != parsed.tumor_class:
            return f"class folder '{d}' but the name says {parsed.tumor_class}"
        if low in SUBTYPE_CLASSES and low != parsed.subtype:
            return f"subtype folder '{d}' but the name says {parsed.subtype}"
        pm = PATIENT_DIR_RE.match(d)
        if pm is not None:
            folder_patient = f"SOB_{pm['cls']}_{pm['sub']}-{pm['year']}-{pm['pid']}"
            if folder_patient != parsed.patient:
                return f"patient folder '{d}' but the name says {parsed.patient}"
        mm = MAG_DIR_RE.match(d)
        if mm is not None and int(mm["mag"]) != parsed.magnification:
            return f"magnification folder '{d}' but the name says {parsed.magnification}X"
    return None


def read_breakhis(root: Path, task: str, magnification: str, on_bad_file: str) -> tuple[list[Record], dict]:
    """Scan ``root`` recursively for BreakHis images; returns records and a report.

    Hidden files (``._SOB...`` AppleDouble copies) are ignored. A name that does not parse or that
    contradicts its folders raises UserError naming the path, or with ``on_bad_file='skip'`` is
    counted in the report (``skipped_names``) and left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.root {root} is not a folder (expected an unpacked BreaKHis_v1 or a folder below it)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".") and p.is_file())
    if not files:
        raise UserError(f"no images found under {root} (expected BreakHis files like SOB_B_A-14-22549AB-40-001.png)")
    classes = BINARY_CLASSES if task == "binary" else SUBTYPE_CLASSES
    records: list[Record] = []
    skipped: list[str] = []
    for p in files:
        parsed = parse_name(p.name)
        rel_dirs = p.relative_to(root).parts[:-1]
        problem = ("file name does not parse as SOB_<B|M>_<type>-<year>-<patient>-<mag>-<seq>"
                   if parsed is None else folder_conflict(parsed, rel_dirs))
        if problem is not None:
            if on_bad_file == "error":
                raise UserError(f"{p}: {problem} (set data.on_bad_file=skip to leave such files out)")
            skipped.append(f"{p}: {problem}")
            continue
        assert parsed is not None
        if magnification != "all" and parsed.magnification != int(magnification):
            continue
        label = classes.index(parsed.tumor_class if task == "binary" else parsed.subtype)
        records.append(Record(str(p), label, parsed.patient,
                              {"magnification": parsed.magnification, "subtype": parsed.subtype,
                               "tumor_class": parsed.tumor_class}))
    if not records:
        raise UserError(f"no BreakHis images under {root} match magnification={magnification}")
    return records, {"classes": list(classes), "skipped_names": len(skipped), "skipped_examples": skipped[:5]}
