"""BreakHis (BreaKHis v1) reader: recursive scan, file-name parsing, folder cross-check.

File ``SOB_B_A-14-22549AB-40-001.png`` = procedure SOB, class B|M, subtype code, year, slide id,
magnification, sequence. The *slide* is everything before the magnification field
(``SOB_B_A-14-22549AB``); patient folders use ``_`` before the year (``SOB_B_A_14-22549AB``).

The *patient* (the group every split is made on) is the year and slide number **without the
class and subtype**: one patient with ductal and lobular carcinoma has slides ``SOB_M_DC-14-13412``
and ``SOB_M_LC-14-13412`` and both belong to patient ``14-13412``. A slide id is a number with an
optional letter suffix (``22549AB``, ``22549G``); ``patient_suffix='merge'`` (the default, leak-free)
drops the suffix so ids that differ only by it are one patient (``14-22549``), ``'keep'`` keeps it.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from graftkd.data.pixels import IMAGE_SUFFIXES
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
    slide: str  # SOB_B_A-14-22549AB
    year: str  # 14
    pid: str  # 22549AB
    magnification: int
    seq: int

    def patient_key(self, suffix: str = "merge") -> str:
        """The patient: ``<year>-<slide number>`` (``14-22549``), with the id's letter suffix when
        ``suffix='keep'`` (``14-22549AB``). Class and subtype are never part of it."""
        number = re.match(r"\d*", self.pid).group(0) or self.pid  # type: ignore[union-attr]
        return f"{self.year}-{number if suffix == 'merge' else self.pid}"

    @property
    def patient(self) -> str:
        """The patient under the default (leak-free) rule."""
        return self.patient_key("merge")


def parse_name(name: str) -> ParsedName | None:
    """Parse a BreakHis file name (with or without extension); None when it does not match."""
    m = FILE_RE.match(Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name)
    if m is None:
        return None
    code = m["sub"]
    folder, tumor_class = SUBTYPES[code]
    if CLASS_CODE[m["cls"]] != tumor_class:
        return None  # e.g. SOB_M_A: adenosis is benign
    return ParsedName(tumor_class, folder, code, f"SOB_{m['cls']}_{code}-{m['year']}-{m['pid']}", m["year"], m["pid"],
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
            if folder_patient != parsed.slide:
                return f"patient folder '{d}' but the name says {parsed.slide}"
        mm = MAG_DIR_RE.match(d)
        if mm is not None and int(mm["mag"]) != parsed.magnification:
            return f"magnification folder '{d}' but the name says {parsed.magnification}X"
    return None


def read_breakhis(root: Path, task: str, magnification: str, on_bad_file: str,
                  patient_suffix: str = "merge") -> tuple[list[Record], dict]:
    """Scan ``root`` recursively for BreakHis images; returns records and a report.

    Hidden files (``._SOB...`` AppleDouble copies) are ignored. A name that does not parse or that
    contradicts its folders raises UserError naming the path, or with ``on_bad_file='skip'`` is
    counted in the report (``skipped_names``) and left out. Record groups are patients (see the
    module docstring); ``merged_patients`` in the report lists every patient made of several slides.
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
        records.append(Record(str(p), label, parsed.patient_key(patient_suffix),
                              {"magnification": parsed.magnification, "subtype": parsed.subtype,
                               "tumor_class": parsed.tumor_class, "slide": parsed.slide}))
    if not records:
        raise UserError(f"no BreakHis images under {root} match magnification={magnification}")
    return records, {"classes": list(classes), "skipped_names": len(skipped), "skipped_examples": skipped[:5],
                     "patient_suffix": patient_suffix, "merged_patients": merged_patients(records)}


def merged_patients(records: list[Record]) -> dict[str, list[str]]:
    """``{patient: [slides]}`` for every patient with more than one slide id (sorted)."""
    slides: dict[str, set[str]] = defaultdict(set)
    for r in records:
        slides[r.group].add(r.meta["slide"])
    return {g: sorted(s) for g, s in sorted(slides.items()) if len(s) > 1}
