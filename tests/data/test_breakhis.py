"""BreakHis reader: name parsing with the real quirks, folder cross-check, bad-name policy."""
from __future__ import annotations

from pathlib import Path

import pytest

from graftkd.data.breakhis import SUBTYPE_CLASSES, folder_conflict, parse_name, read_breakhis
from graftkd.errors import UserError


@pytest.mark.parametrize("name,slide,patient,kept,sub,mag,seq", [
    ("SOB_B_A-14-22549AB-40-001.png", "SOB_B_A-14-22549AB", "14-22549", "14-22549AB", "adenosis", 40, 1),
    ("SOB_M_DC-14-13412-100-012.png", "SOB_M_DC-14-13412", "14-13412", "14-13412", "ductal_carcinoma", 100, 12),
    ("SOB_B_TA-14-16184CD-400-005.png", "SOB_B_TA-14-16184CD", "14-16184", "14-16184CD", "tubular_adenoma", 400, 5),
    ("SOB_B_PT-14-21998AB-200-010.PNG", "SOB_B_PT-14-21998AB", "14-21998", "14-21998AB", "phyllodes_tumor", 200, 10),
    ("SOB_M_PC-15-190EF-40-002", "SOB_M_PC-15-190EF", "15-190", "15-190EF", "papillary_carcinoma", 40, 2),
])
def test_parse_real_quirks(name: str, slide: str, patient: str, kept: str, sub: str, mag: int, seq: int) -> None:
    p = parse_name(name)
    assert p is not None
    assert (p.slide, p.patient, p.patient_key("keep"), p.subtype, p.magnification, p.seq) == (
        slide, patient, kept, sub, mag, seq)


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
    assert groups == {"14-22549", "14-13412", "14-16184", "14-2523", "14-12204", "14-13413"}
    assert report["merged_patients"] == {}
    r = next(r for r in records if r.group == "14-16184" and r.meta["magnification"] == 40)
    assert r.label == 0 and r.meta == {"magnification": 40, "subtype": "tubular_adenoma", "tumor_class": "benign",
                                       "slide": "SOB_B_TA-14-16184CD"}
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


# one patient with ductal and lobular carcinoma (as in the published data), two slides of one patient
# that differ by a letter suffix, and 4 more patients per class
SHARED = [("malignant", "ductal_carcinoma", "DC", "13412"), ("malignant", "lobular_carcinoma", "LC", "13412"),
          ("benign", "adenosis", "A", "22549AB"), ("benign", "adenosis", "A", "22549G")] + [
    ("benign", sub, code, str(1000 + i)) for i, (sub, code) in enumerate(
        [("fibroadenoma", "F"), ("tubular_adenoma", "TA"), ("phyllodes_tumor", "PT"), ("adenosis", "A")])] + [
    ("malignant", sub, code, str(2000 + i)) for i, (sub, code) in enumerate(
        [("ductal_carcinoma", "DC"), ("mucinous_carcinoma", "MC"), ("papillary_carcinoma", "PC"),
         ("lobular_carcinoma", "LC")])]


def _split_of(bundle) -> dict[str, set[str]]:
    """slide -> the splits its images are in."""
    out: dict[str, set[str]] = {}
    for part in ("train", "val", "test"):
        for r in getattr(bundle, part).records:
            out.setdefault(r.meta["slide"], set()).add(part)
    return out


def test_patient_is_the_slide_number_without_subtype(tmp_path: Path, breakhis_factory, capsys) -> None:
    """Bar: SOB_M_DC-14-13412 and SOB_M_LC-14-13412 are one patient, in one split for split seeds 0-9;
    22549AB / 22549G too unless data.patient_suffix=keep; the data summary lists the merged ids."""
    from graftkd.cli import main
    from graftkd.config import DataConfig, SplitConfig
    from graftkd.data.build import build_data

    root = breakhis_factory(tmp_path / "bh", mags=(40,), per=1, patients=SHARED)
    records, report = read_breakhis(root, "binary", "all", "error")
    assert report["merged_patients"] == {"14-13412": ["SOB_M_DC-14-13412", "SOB_M_LC-14-13412"],
                                         "14-22549": ["SOB_B_A-14-22549AB", "SOB_B_A-14-22549G"]}
    assert len({r.group for r in records}) == 10
    apart = 0
    for seed in range(10):
        cfg = DataConfig(source="breakhis", root=root, image_size=16, decoded_cache="none",
                         split=SplitConfig(seed=seed))
        where = _split_of(build_data(cfg, 0, None, work_dir=tmp_path / "w"))
        assert where["SOB_M_DC-14-13412"] == where["SOB_M_LC-14-13412"] and len(where["SOB_M_DC-14-13412"]) == 1
        assert where["SOB_B_A-14-22549AB"] == where["SOB_B_A-14-22549G"]
        kept = _split_of(build_data(cfg.model_copy(update={"patient_suffix": "keep"}), 0, None, work_dir=tmp_path / "w"))
        assert kept["SOB_M_DC-14-13412"] == kept["SOB_M_LC-14-13412"]  # no suffix: one patient either way
        apart += kept["SOB_B_A-14-22549AB"] != kept["SOB_B_A-14-22549G"]
    assert apart > 0  # `keep` really treats them as two patients
    assert main(["data", "summary", "data.source=breakhis", f"data.root={root}", "data.image_size=16",
                 "data.decoded_cache=none", f"output.dir={tmp_path / 'w'}"]) == 0
    out = capsys.readouterr().out
    assert ("merged patient ids (2, data.patient_suffix=merge): 14-13412 = SOB_M_DC-14-13412 + SOB_M_LC-14-13412; "
            "14-22549 = SOB_B_A-14-22549AB + SOB_B_A-14-22549G") in out


def test_split_leaving_a_class_without_val_or_test_is_an_error(tmp_path: Path, breakhis_factory, capsys) -> None:
    """Subtype task with 1-2 patients per subtype: an error naming the class, or a warning with the switch."""
    from graftkd.config import DataConfig, SplitConfig
    from graftkd.data.build import build_data

    root = breakhis_factory(tmp_path / "bh", mags=(40,), per=1, patients=SHARED)
    cfg = DataConfig(source="breakhis", root=root, task="subtype", image_size=16, decoded_cache="none")
    with pytest.raises(UserError, match=r"the split leaves no val images of class 'fibroadenoma', 'phyllodes_tumor', "
                                        r".*; no test images of class 'adenosis', .*data.split.on_empty_class=warn"):
        build_data(cfg, 0, None, work_dir=tmp_path / "w")
    capsys.readouterr()
    b = build_data(cfg.model_copy(update={"split": SplitConfig(on_empty_class="warn")}), 0, None, work_dir=tmp_path / "w")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("graftkd: warning: the split leaves no val images of class 'fibro")
    assert b.info["split"]["empty_classes"][0].startswith("no val images of class 'fibroadenoma', 'phyllodes_tumor'")
