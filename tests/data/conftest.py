"""Shared fixtures for data tests: tiny PNG writers, a quirky BreakHis tree, a tiny synthetic tree."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from graftkd.config import SyntheticConfig
from graftkd.data.synthetic import generate_tree


def write_png(path: Path, seed: int = 0, size: tuple[int, int] = (40, 32)) -> Path:
    """A random RGB PNG of size (w, h)."""
    w, h = size
    rng = np.random.default_rng(seed)
    img = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(img).numpy().tobytes())
    return path


# (class, subtype folder, code, patient id) with the real id quirks
PATIENTS = [
    ("benign", "adenosis", "A", "22549AB"),
    ("benign", "fibroadenoma", "F", "13412"),
    ("benign", "tubular_adenoma", "TA", "16184CD"),
    ("malignant", "ductal_carcinoma", "DC", "2523"),
    ("malignant", "lobular_carcinoma", "LC", "12204"),
    ("malignant", "mucinous_carcinoma", "MC", "13413"),
]


def make_breakhis(root: Path, mags: tuple[int, ...] = (40, 100), per: int = 2,
                  patients: list[tuple[str, str, str, str]] = PATIENTS) -> Path:
    """A BreaKHis_v1-style tree: folder SOB_B_A_14-22549AB, files SOB_B_A-14-22549AB-40-001.png."""
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    k = 0
    for cls, sub, code, pid in patients:
        letter = cls[0].upper()
        for mag in mags:
            for seq in range(1, per + 1):
                k += 1
                write_png(base / cls / "SOB" / sub / f"SOB_{letter}_{code}_14-{pid}" / f"{mag}X"
                          / f"SOB_{letter}_{code}-14-{pid}-{mag}-{seq:03d}.png", seed=k)
    return root


@pytest.fixture
def breakhis_tree(tmp_path: Path) -> Path:
    return make_breakhis(tmp_path / "bh")


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 patients x 4 magnifications x 2 images at 32x32 (128 images)."""
    out = tmp_path_factory.mktemp("synth") / "tree"
    generate_tree(out, SyntheticConfig(patients=16, images_per_patient=2, size=(32, 32)))
    return out


@pytest.fixture
def png() -> object:
    """``png(path, seed=0, size=(w, h))`` writes a random PNG."""
    return write_png


@pytest.fixture
def breakhis_factory() -> object:
    """``breakhis_factory(root, mags=(40, 100), per=2)`` writes a quirky BreakHis tree."""
    return make_breakhis
