import os

import pytest
import torch

import graftkd.methods  # noqa: F401  registers every method and its config section, as the CLI does

torch.set_num_threads(1)
os.environ.setdefault("GRAFTKD_TEST", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
