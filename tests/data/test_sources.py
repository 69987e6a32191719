"""CIFAR pickles (folder and .tar.gz), ImageFolder trees, CSV manifests."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from graftkd.config import DataConfig, SplitConfig
from graftkd.data import build_data
from graftkd.data.cifar import LAYOUT, read_cifar
from graftkd.data.sources import read_csv_manifest, read_folder
from graftkd.errors import UserError


def _cifar_members(name: str, n: int = 6) -> dict[str, bytes]:
    lay = LAYOUT[name]
    classes = 10 if name == "cifar10" else 100
    meta = {lay["names"]: [f"c{i}" for i in range(classes)]}
    out = {lay["meta"]: pickle.dumps(meta)}
    k = 0
    for part in ("train", "test"):
        for member in lay[part]:
            data = np.arange(n * 3072, dtype=np.int64).reshape(n, 3072) % 251 + k
            labels = [(k + j) % classes for j in range(n)]
            batch = {"data": data.astype(np.uint8), lay["labels"]: labels, "batch_label": member}
            if name == "cifar100":
                batch["coarse_labels"] = [0] * n
            out[member] = pickle.dumps(batch, protocol=2)
            k += 1
    return out


def _write_folder(root: Path, name: str) -> Path:
    folder = root / LAYOUT[name]["folder"]
    folder.mkdir(parents=True)
    for member, blob in _cifar_members(name).items():
        (folder / member).write_bytes(blob)
    return folder


def _write_tar(root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tar_path = root / LAYOUT[name]["tarball"]
    with tarfile.open(tar_path, "w:gz") as tar:
        for member, blob in _cifar_members(name).items():
            info = tarfile.TarInfo(f"{LAYOUT[name]['folder']}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return tar_path


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_folder_and_tarball_agree(tmp_path: Path, name: str) -> None:
    folder = _write_folder(tmp_path / "f", name)
    tar_path = _write_tar(tmp_path / "t", name)
    n_train = 5 * 6 if name == "cifar10" else 6
    arr, recs, classes = read_cifar(name, folder)
    for root in (folder.parent, tar_path, tar_path.parent):
        arr2, recs2, classes2 = read_cifar(name, root)
        assert np.array_equal(arr, arr2) and [r.label for r in recs] == [r.label for r in recs2]
    assert arr.shape == (n_train + 6, 32, 32, 3) and arr.dtype == np.uint8
    assert len(classes) == (10 if name == "cifar10" else 100)
    assert [r.meta["split"] for r in recs].count("test") == 6
    # row layout: 1024 R, 1024 G, 1024 B, each row-major -> NHWC
    assert arr[0, 0, 1, 0] == 1 and arr[0, 0, 0, 1] == 1024 % 251 and arr[0, 1, 0, 0] == 32


def test_cifar_missing_file_says_what_to_put_where(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path, "cifar10")
    (folder / "data_batch_3").unlink()
    with pytest.raises(UserError, match=r"'data_batch_3' not found in .*cifar-10-batches-py; put the python-version files"):
        read_cifar("cifar10", tmp_path)
    with pytest.raises(UserError, match=r"does not exist; put cifar-100-python/ \(or cifar-100-python.tar.gz\) there"):
        read_cifar("cifar100", tmp_path / "nothing")
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="'data_batch_3' .* is not a CIFAR pickle"):
        read_cifar("cifar10", tmp_path)


def test_cifar_bundle_predefined_split(tmp_path: Path) -> None:
    _write_tar(tmp_path, "cifar10")
    cfg = DataConfig(source="cifar10", root=tmp_path, image_size=32, augment="cifar",
                     split=SplitConfig(kind="predefined", val_fraction=0.2, on_empty_class="warn"))
    b = build_data(cfg, seed=0, run_dir=tmp_path / "run")  # 10 classes, 6 val and 6 test images
    assert (len(b.train), len(b.val), len(b.test)) == (22, 8, 6)  # 1 val image for every class with 2+ train images
    assert b.mean == (0.4914, 0.4822, 0.4465)
    item = b.test[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32 and item["index"] == 0
    assert (tmp_path / "run" / "splits.csv").read_text().startswith("index,label,group,split\n")
    arr = read_cifar("cifar10", tmp_path)[0]
    expected = (torch.from_numpy(arr[b.test.records[0].meta["index"]]).permute(2, 0, 1).float() / 255
                - torch.tensor(b.mean).view(3, 1, 1)) / torch.tensor(b.std).view(3, 1, 1)
    assert torch.allclose(item["image"], expected, atol=1e-6)


def test_image_folder_and_predefined_layout(tmp_path: Path, png) -> None:
    for i, cls in enumerate(["cat", "dog", "dog"]):
        png(tmp_path / "flat" / cls / f"{i}.png", seed=i)
    png(tmp_path / "flat" / "dog" / "sub" / "x.png", seed=9)
    png(tmp_path / "flat" / ".hidden" / "y.png", seed=9)
    recs, classes, info = read_folder(tmp_path / "flat", "error")
    assert classes == ["cat", "dog"] and [r.label for r in recs] == [0, 1, 1, 1]
    assert recs[0].group == recs[0].path and info["predefined_split"] is False
    for split, cls in [("train", "a"), ("train", "b"), ("test", "a"), ("test", "b")]:
        png(tmp_path / "pre" / split / cls / "0.png")
    recs, classes, info = read_folder(tmp_path / "pre", "error")
    assert classes == ["a", "b"] and [r.meta["split"] for r in recs] == ["test", "test", "train", "train"]


def test_empty_class_folder(tmp_path: Path, png) -> None:
    png(tmp_path / "a" / "0.png")
    png(tmp_path / "a" / "1.png", seed=1)
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=r"class folder .*/b contains no images"):
        read_folder(tmp_path, "error")
    recs, classes, info = read_folder(tmp_path, "skip")
    assert classes == ["a", "b"] and len(recs) == 2 and info["empty_classes"] == ["b"]


def test_csv_manifest(tmp_path: Path, png) -> None:
    for i in range(4):
        png(tmp_path / "imgs" / f"{i}.png", seed=i)
    csv = tmp_path / "meta" / "list.csv"
    csv.parent.mkdir()
    csv.write_text("path,label,group,split\n" + "".join(
        f"../imgs/{i}.png,{['tumour', 'normal'][i % 2]},pat{i // 2},{['train', 'train', 'test', 'test'][i]}\n"
        for i in range(4)))
    recs, classes, info = read_csv_manifest(csv, "error")
    assert classes == ["normal", "tumour"] and [r.label for r in recs] == [1, 0, 1, 0]
    assert recs[0].path == str((tmp_path / "imgs" / "0.png").resolve()) and recs[3].group == "pat1"
    b = build_data(DataConfig(source="csv", root=csv, image_size=16, split=SplitConfig(kind="predefined", val_fraction=0)),
                   seed=0, run_dir=tmp_path / "run")
    assert (len(b.train), len(b.val), len(b.test)) == (2, 0, 2)
    assert (tmp_path / "run" / "splits.csv").read_text().splitlines()[1] == "../imgs/0.png,1,pat0,train"
    ints = tmp_path / "ints.csv"
    ints.write_text("path,label\nimgs/0.png,2\nimgs/1.png,0\n")
    recs, classes, _ = read_csv_manifest(ints, "error")
    assert classes == ["0", "1", "2"] and [r.label for r in recs] == [2, 0] and recs[0].group == recs[0].path


def test_csv_manifest_errors(tmp_path: Path, png) -> None:
    png(tmp_path / "0.png")
    bad = tmp_path / "m.csv"
    bad.write_text("file,label\n0.png,a\n")
    with pytest.raises(UserError, match=r"m\.csv: missing column 'path' \(header: file,label\)"):
        read_csv_manifest(bad, "error")
    bad.write_text("path,label\n0.png,a\nmissing.png,b\n")
    with pytest.raises(UserError, match=r"m\.csv, line 3: image .*missing\.png not found"):
        read_csv_manifest(bad, "error")
    recs, _, info = read_csv_manifest(bad, "skip")
    assert len(recs) == 1 and info["missing_files"] == 1
    bad.write_text("path,label,split\n0.png,a,holdout\n")
    with pytest.raises(UserError, match=r"line 2: split must be train, val or test, got 'holdout'"):
        read_csv_manifest(bad, "error")
