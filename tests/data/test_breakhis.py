"""BreakHis reader: name parsing with the real quirks, folder cross-check, bad-name policy."""
from __future__ import annotations

from pathlib import Path

import pytest

from graftkd.data.breakhis import SUBTYPE_CLASSES, folder_conflict, parse_name, read_breakhis
from graftkd.errors import UserError


@pytest.mark.parametrize("name,patient,sub,mag,seq", [
    ("SOB_B_A-14-22549AB-40-001.png", "SOB_B_A-14-22549AB", "adenosis", 40, 1),
    ("SOB_M_DC-14-13412-100-012.png", "SOB_M_DC-14-13412", "ductal_carcinoma", 100, 12),
    ("SOB_B_TA-14-16184CD-400-005.png", "SOB_B_TA-14-16184CD", "tubular_adenoma", 400, 5),
    ("SOB_B_PT-14-21998AB-200-010.PNG", "SOB_B_PT-14-21998AB", "phyllodes_tumor", 200, 10),
    ("SOB_M_PC-15-190EF-40-002", "SOB_M_PC-15-190EF", "papillary_carcinoma", 40, 2),
])
def test_parse_real_quirks(name: str, patient: str, sub: str, mag: int, seq: int) -> None:
    p = parse_name(name)
    assert p is not None
    assert (p.patient, p.subtype, p.magnification, p.seq) == (patient, sub, mag, seq)


@pytest.mark.parametrize("name", [
    "SOB_B_A_14-22549AB-40-001.png",  # folder-style underscore before the year
    "SOB_B_A-14-22549AB-50-001.png",  # no such magnification
    "SOB_M_A-14-22549AB-40-001.png",  # adenosis is benign
    "SOB_B_XX-14-1-40-001.png", "thumbs.png", "SOB_B_A-14-22549AB-40.png",
])
def test_parse_rejects(name: str) -> None:
    assert parse_name(name) is None


def test_folder_cross_check() -> None:
    p = parse_name("SOB_B_A-14-22549AB-40-001.png")
    assert p is not None
    assert folder_conflict(p, ("benign", "SOB", "adenosis", "SOB_B_A_14-22549AB", "40X")) is None
    assert "patient folder 'SOB_B_A_14-22549" in folder_conflict(p, ("SOB_B_A_14-22549", "40X"))
    assert "magnification folder '100X'" in folder_conflict(p, ("SOB_B_A_14-22549AB", "100X"))
    assert "class folder 'malignant'" in folder_conflict(p, ("malignant",))
    assert "subtype folder 'fibroadenoma'" in folder_conflict(p, ("fibroadenoma",))


def test_read_tree_records(breakhis_tree: Path) -> None:
    records, report = read_breakhis(breakhis_tree, "binary", "all", "error")
    assert len(records) == 6 * 2 * 2 and report["skipped_names"] == 0
    assert report["classes"] == ["benign", "malignant"]
    groups = {r.group for r in records}
    assert groups == {"SOB_B_A-14-22549AB", "SOB_B_F-14-13412", "SOB_B_TA-14-16184CD", "SOB_M_DC-14-2523",
                      "SOB_M_LC-14-12204", "SOB_M_MC-14-13413"}
    r = next(r for r in records if r.group == "SOB_B_TA-14-16184CD" and r.meta["magnification"] == 40)
    assert r.label == 0 and r.meta == {"magnification": 40, "subtype": "tubular_adenoma", "tumor_class": "benign"}
    assert sum(r.label for r in records) == 12  # malignant half


def test_subtype_task_and_magnification_filter(breakhis_tree: Path) -> None:
    records, report = read_breakhis(breakhis_tree / "BreaKHis_v1" / "histology_slides", "subtype", "100", "error")
    assert len(records) == 12 and {r.meta["magnification"] for r in records} == {100}
    assert report["classes"] == SUBTYPE_CLASSES
    assert {SUBTYPE_CLASSES[r.label] for r in records} == {r.meta["subtype"] for r in records}


def test_name_contradicting_folder(tmp_path: Path, breakhis_factory, png) -> None:
    root = breakhis_factory(tmp_path / "bh", mags=(40,), per=1)
    bad = png(root / "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB/40X"
                    / "SOB_B_A-14-99999-40-001.png")
    with pytest.raises(UserError, match=r"SOB_B_A-14-99999-40-001\.png: patient folder 'SOB_B_A_14-22549AB'"):
        read_breakhis(root, "binary", "all", "error")
    records, report = read_breakhis(root, "binary", "all", "skip")
    assert len(records) == 6 and report["skipped_names"] == 1 and str(bad) in report["skipped_examples"][0]


def test_unparsable_name_error_and_skip(tmp_path: Path, breakhis_factory, png) -> None:
    root = breakhis_factory(tmp_path / "bh", mags=(40,), per=1)
    png(root / "BreaKHis_v1" / "notes-scan.png")
    png(root / "BreaKHis_v1" / "._SOB_B_A-14-22549AB-40-001.png")  # AppleDouble copy: ignored
    (root / "BreaKHis_v1" / "Folds.csv").write_text("fold,mag,grp,filename\n")
    with pytest.raises(UserError, match=r"notes-scan\.png: file name does not parse"):
        read_breakhis(root, "binary", "all", "error")
    records, report = read_breakhis(root, "binary", "all", "skip")
    assert len(records) == 6 and report["skipped_names"] == 1


def test_missing_root_and_empty(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a folder"):
        read_breakhis(tmp_path / "nope", "binary", "all", "error")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        read_breakhis(tmp_path / "empty", "binary", "all", "error")
