import os

import pytest
import torch
from hypothesis import settings

import graftkd.methods  # noqa: F401  registers every method and its config section, as the CLI does

torch.set_num_threads(1)
# generated cases are drawn from a fixed seed: a run is repeatable, and a failing case fails every run
settings.register_profile("graftkd", derandomize=True, print_blob=True)
settings.load_profile("graftkd")
os.environ.setdefault("GRAFTKD_TEST", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
