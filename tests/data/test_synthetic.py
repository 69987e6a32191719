"""Synthetic histology: determinism, BreakHis layout and naming, CLI (synth, data summary)."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from graftkd.cli import main
from graftkd.config import DataConfig, SyntheticConfig
from graftkd.data import build_data
from graftkd.data.breakhis import read_breakhis
from graftkd.data.datasets import decode_file
from graftkd.data.synthetic import generate_tree, patient_ids, tree_key
from graftkd.errors import UserError


def _digest(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_and_reader(synth_tree: Path) -> None:
    records, report = read_breakhis(synth_tree, "subtype", "all", "error")
    assert len(records) == 16 * 4 * 2 and report["skipped_names"] == 0
    assert Counter(r.label for r in records) == {k: 16 for k in range(8)}  # every subtype, 2 patients each
    assert Counter(r.meta["magnification"] for r in records) == {40: 32, 100: 32, 200: 32, 400: 32}
    first = Path(sorted(r.path for r in records)[0]).relative_to(synth_tree)
    assert first.parts[:6] == ("BreaKHis_v1", "histology_slides", "breast", "benign", "SOB", "adenosis")
    assert first.parts[6].startswith("SOB_B_A_14-") and first.parts[7] == "100X"
    assert first.name.startswith("SOB_B_A-14-") and first.name.endswith("-100-001.png")
    assert decode_file(str(synth_tree / first)).shape == (3, 32, 32)
    assert (synth_tree / "synthetic.json").is_file()


def test_patient_ids_have_quirks() -> None:
    ids = patient_ids(16, 0)
    assert len(set(ids)) == 16 and any(i.isdigit() for i in ids) and any(i.endswith("AB") for i in ids)
    assert any(i.endswith("CD") for i in ids)


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    cfg = SyntheticConfig(patients=8, images_per_patient=1, size=(24, 24), magnifications=[40, 400])
    generate_tree(tmp_path / "a", cfg)
    generate_tree(tmp_path / "b", cfg)
    generate_tree(tmp_path / "c", cfg.model_copy(update={"seed": 1}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    with pytest.raises(UserError, match="already exists and is not empty"):
        generate_tree(tmp_path / "a", cfg)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_build_data_generates_into_run_parent(tmp_path: Path) -> None:
    syn = SyntheticConfig(patients=8, images_per_patient=1, size=(24, 24), magnifications=[40])
    cfg = DataConfig(source="synthetic", image_size=16, synthetic=syn)
    b = build_data(cfg, seed=0, run_dir=tmp_path / "runs" / "demo")
    root = tmp_path / "runs" / ".synthetic" / tree_key(syn)
    assert (root / "synthetic.json").is_file() and b.info["synthetic"]["root"] == str(root)
    assert len(b.train) + len(b.val) + len(b.test) == 8 and b.classes == ["benign", "malignant"]
    assert (tmp_path / "runs" / "demo" / "splits.csv").is_file()
    given = DataConfig(source="synthetic", root=tmp_path / "mine", image_size=16, synthetic=syn)
    build_data(given, seed=0, run_dir=None)
    assert (tmp_path / "mine" / "synthetic.json").is_file()


def test_cli_synth_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tree"
    assert main(["synth", str(out), "--patients", "8", "--size", "24x24", "--images-per-patient", "1",
                 "--magnifications", "40", "100", "--seed", "2"]) == 0
    assert "wrote 16 images of 8 patients" in capsys.readouterr().out
    assert main(["data", "summary", f"data.root={out}", "data.source=breakhis", "data.decoded_cache=none",
                 f"output.dir={tmp_path / 'runs'}"]) == 0
    text = capsys.readouterr().out
    assert "| benign | 8 | 4 |" in text and "| 100X | 8 | 8 |" in text and "| mucinous_carcinoma | 2 | 1 |" in text
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "x"), "--size", "24"])
    assert "size must be WxH" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "y"), "--patients", "3"]) == 2  # config validation -> one-line error
    assert "--patients: Input should be greater than or equal to 8" in capsys.readouterr().err


def test_images_per_patient_can_vary_and_older_tree_keys_stay(tmp_path: Path) -> None:
    from collections import Counter

    fixed = SyntheticConfig(patients=8, images_per_patient=2, size=(24, 24), magnifications=[40, 100])
    varying = fixed.model_copy(update={"images_per_patient_max": 5})
    assert tree_key(fixed) == tree_key(SyntheticConfig.model_validate(fixed.model_dump())) != tree_key(varying)
    generate_tree(tmp_path / "v", varying)
    per = Counter((p.parent.parent.name, p.parent.name) for p in (tmp_path / "v").rglob("*.png"))
    counts = [per[(pid, "40X")] for pid, mag in per if mag == "40X"]
    assert len(counts) == 8 and all(2 <= c <= 5 for c in counts) and len(set(counts)) > 1
    assert all(per[(pid, "100X")] == per[(pid, "40X")] for pid, _ in per)  # same count at every magnification
    with pytest.raises(ValueError, match="images_per_patient_max = 1 < images_per_patient = 2"):
        SyntheticConfig(images_per_patient=2, images_per_patient_max=1)
