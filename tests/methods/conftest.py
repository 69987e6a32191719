"""Real digits for the method tests: scikit-learn's handwritten digits as the image data set the
benchmarks use (``benchmarks/digits_data.py``), prepared once per test session, and the supervised
teacher the methods distil from, trained once per session (small: resnet8 at 16 px)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SIZE = 16  # px: the 8x8 scans lose nothing at 16 px, and a step costs a quarter of 32 px's
TEACHER_STEPS = 200


def benchmark_module(name: str) -> ModuleType:
    """A module of ``benchmarks/`` (they import each other by file name, so the folder goes on the path)."""
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="session")
def digits_manifest(digits_dir) -> Path:
    """The digits as 32 px PNGs with the benchmarks' fixed split (897 train, 300 val, 600 test)."""
    return benchmark_module("digits_data").prepare(digits_dir / "data")


@pytest.fixture(scope="session")
def digits_teacher(digits_manifest, digits_dir) -> Path:
    """model.pt of a supervised resnet8 trained on the whole digits train split at 16 px, no augmentation."""
    return benchmark_module("defaults_all_methods").teacher(digits_manifest, digits_dir / "teachers", size=SIZE,
                                                            augment="none", steps=TEACHER_STEPS)
