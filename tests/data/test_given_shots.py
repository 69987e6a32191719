"""Given few-shot sets (issue 12 item 5): a manifest column or a file of ids names the labelled
training images; the run records how many per class and which."""
from __future__ import annotations

from pathlib import Path

import pytest

from graftkd.config import DataConfig, SplitConfig, load_config
from graftkd.data import build_data
from graftkd.errors import UserError

CLASSES = 3  # integer labels 0..2: a multi-class CSV problem


@pytest.fixture
def manifest(png):
    return lambda root: write_manifest(root, png)


def write_manifest(root: Path, write_png) -> Path:
    """12 train (4 per class, rows 0..11), 3 val, 3 test; column `five` marks train rows 0, 1, 2, 4, 5, 7."""
    rows = ["path,label,split,five"]
    for i in range(18):
        split = "train" if i < 12 else ("val" if i < 15 else "test")
        write_png(root / "img" / f"{i:02d}.png", seed=i, size=(16, 16))
        rows.append(f"img/{i:02d}.png,{i % CLASSES},{split},{'yes' if i in (0, 1, 2, 4, 5, 7) else ''}")
    path = root / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(source="csv", root=path, image_size=16, augment="none",
                      split=SplitConfig(kind="predefined"), **kw)


def test_manifest_column_gives_the_exact_set_and_it_is_recorded(tmp_path: Path, manifest) -> None:
    b = build_data(cfg(manifest(tmp_path), shots_column="five"), seed=3, run_dir=tmp_path / "run")
    assert sorted(Path(r.path).name for r in b.train.records) == [f"{i:02d}.png" for i in (0, 1, 2, 4, 5, 7)]
    shot = b.info["fewshot"]
    assert shot["given"] == "manifest column 'five'" and shot["per_class"] == {"0": 1, "1": 3, "2": 2}
    assert shot["shots"] is None and b.info["shots"] is None  # unequal classes: no common count
    assert shot["images"] == [f"img/{i:02d}.png" for i in (0, 1, 2, 4, 5, 7)]
    assert "task" not in b.info and b.info["num_classes"] == 3
    # the seed does not change a given set
    assert build_data(cfg(manifest(tmp_path), shots_column="five"), seed=4).info["fewshot"]["images"] == shot["images"]


def test_shots_file_plain_and_csv_and_the_shots_check(tmp_path: Path, manifest) -> None:
    path = manifest(tmp_path)
    ids = tmp_path / "ids.txt"
    ids.write_text("img/00.png\nimg/01.png\nimg/02.png\n\nimg/03.png\nimg/04.png\nimg/05.png\n")
    b = build_data(cfg(path, shots_file=ids, shots=2), seed=0)
    assert b.info["shots"] == 2 and b.info["fewshot"]["per_class"] == {"0": 2, "1": 2, "2": 2}
    assert b.info["fewshot"]["given"] == f"file {ids}"
    as_csv = tmp_path / "ids.csv"
    as_csv.write_text("path,note\nimg/00.png,a\nimg/01.png,b\nimg/02.png,c\n")
    assert build_data(cfg(path, shots_file=as_csv), seed=0).info["fewshot"]["per_class"] == {"0": 1, "1": 1, "2": 1}
    with pytest.raises(UserError, match=r"data.shots = 3, but .* \{'0': 2, '1': 2, '2': 2\}"):
        build_data(cfg(path, shots_file=ids, shots=3), seed=0)


def test_a_named_image_outside_train_or_unknown_is_an_error(tmp_path: Path, manifest) -> None:
    path = manifest(tmp_path)
    ids = tmp_path / "ids.txt"
    ids.write_text("img/00.png\nimg/13.png\n")
    with pytest.raises(UserError, match=r"not in the train split, e.g. 'img/13.png' in val"):
        build_data(cfg(path, shots_file=ids), seed=0)
    ids.write_text("img/00.png\nimg/99.png\n")
    with pytest.raises(UserError, match=r"not images of this data set, e.g. 'img/99.png'"):
        build_data(cfg(path, shots_file=ids), seed=0)
    with pytest.raises(UserError, match="no such column"):
        build_data(cfg(path, shots_column="ten"), seed=0)


def test_drawn_shots_record_the_images_too(tmp_path: Path, manifest) -> None:
    b = build_data(cfg(manifest(tmp_path), shots=2), seed=0)
    shot = b.info["fewshot"]
    assert shot["shots"] == b.info["shots"] == 2 and shot["drawn"] == {"shots": 2, "max_per_group": None, "seed": 0}
    assert shot["images"] == sorted(Path(r.path).relative_to(tmp_path).as_posix() for r in b.train.records)


def test_config_refuses_ambiguous_given_sets(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="both given"):
        load_config(None, ["data.source=csv", "data.shots_file=a.txt", "data.shots_column=x"])
    with pytest.raises(UserError, match="needs data.source=csv"):
        load_config(None, ["data.shots_column=x"])
    with pytest.raises(UserError, match="max_per_group"):
        load_config(None, ["data.shots_file=a.txt", "data.max_per_group=2"])
