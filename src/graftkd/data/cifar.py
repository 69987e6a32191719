"""CIFAR-10/100 from the python pickle folders or their .tar.gz, read without torchvision downloads."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np

from graftkd.data.types import Record
from graftkd.errors import UserError

LAYOUT = {
    "cifar10": {"folder": "cifar-10-batches-py", "tarball": "cifar-10-python.tar.gz",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "meta": "batches.meta", "names": "label_names", "labels": "labels"},
    "cifar100": {"folder": "cifar-100-python", "tarball": "cifar-100-python.tar.gz",
                 "train": ["train"], "test": ["test"], "meta": "meta",
                 "names": "fine_label_names", "labels": "fine_labels"},
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (containers, strings, numpy arrays) and refuses any other global, so a
    crafted file cannot run code."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


class _Source:
    """Reads members of a CIFAR folder or tarball by file name."""

    def __init__(self, name: str, root: Path) -> None:
        lay = LAYOUT[name]
        self.name, self.root, self.lay = name, root, lay
        self.tar: tarfile.TarFile | None = None
        self.folder: Path | None = None
        tarball = root if root.is_file() else root / lay["tarball"]
        if root.is_dir() and (root / lay["folder"]).is_dir():
            self.folder = root / lay["folder"]
        elif root.is_dir() and not tarball.is_file():
            self.folder = root
        elif tarball.is_file():
            try:
                self.tar = tarfile.open(tarball, "r:*")
            except (tarfile.TarError, OSError) as e:
                raise UserError(f"{tarball}: not a readable tar archive ({e})") from None
            self.members = {Path(m.name).name: m for m in self.tar.getmembers() if m.isfile()}
            self.where = tarball
        else:
            raise UserError(f"{name}: data.root {root} does not exist; put {lay['folder']}/ (or {lay['tarball']}) there")

    def _missing(self, member: str) -> UserError:
        files = ", ".join(self.lay["train"] + self.lay["test"] + [self.lay["meta"]])
        where = self.where if self.tar is not None else self.folder
        return UserError(f"{self.name}: '{member}' not found in {where}; put the python-version files ({files}) from "
                         f"{self.lay['tarball']} in {self.lay['folder']}/ under data.root, or point data.root at the .tar.gz")

    def load(self, member: str) -> dict:
        try:
            if self.tar is not None:
                if member not in self.members:
                    raise self._missing(member)
                fh = self.tar.extractfile(self.members[member])
                assert fh is not None
                with fh:
                    obj = _ArrayUnpickler(fh, encoding="latin1").load()
            else:
                assert self.folder is not None
                path = self.folder / member
                if not path.is_file():
                    raise self._missing(member)
                with open(path, "rb") as fh:
                    obj = _ArrayUnpickler(fh, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, tarfile.TarError) as e:
            raise UserError(f"{self.name}: '{member}' in {self.root} is not a CIFAR pickle ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{self.name}: '{member}' in {self.root} does not hold a dict")
        return obj


def read_cifar(name: str, root: Path) -> tuple[np.ndarray, list[Record], list[str]]:
    """Images (uint8 Nx32x32x3, train then test), records (``meta`` index/split), class names.

    ``root`` may be the batches folder, its parent, the .tar.gz, or the folder holding the .tar.gz.
    """
    if root is None:
        raise UserError(f"data.source={name} needs data.root (the {LAYOUT[name]['folder']} folder or its .tar.gz)")
    src = _Source(name, Path(root))
    lay = src.lay
    meta = src.load(lay["meta"])
    if lay["names"] not in meta:
        raise UserError(f"{name}: '{lay['meta']}' has no '{lay['names']}' key")
    classes = [str(c) for c in meta[lay["names"]]]
    arrays, records = [], []
    for part in ("train", "test"):
        for member in lay[part]:
            batch = src.load(member)
            for key in ("data", lay["labels"]):
                if key not in batch:
                    raise UserError(f"{name}: '{member}' has no '{key}' key")
            data = np.asarray(batch["data"], dtype=np.uint8)
            labels = np.asarray(batch[lay["labels"]], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise UserError(f"{name}: '{member}' data has shape {data.shape} with {len(labels)} labels; expected (N, 3072)")
            if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
                raise UserError(f"{name}: '{member}' has labels outside 0..{len(classes) - 1}")
            start = sum(len(a) for a in arrays)
            arrays.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            records += [Record(None, int(y), f"{part}:{start + j}", {"index": start + j, "split": part})
                        for j, y in enumerate(labels.tolist())]
    if src.tar is not None:
        src.tar.close()
    return np.ascontiguousarray(np.concatenate(arrays)), records, classes
