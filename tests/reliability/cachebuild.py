"""One rank of a sharded soft-target cache build: ``python cachebuild.py FOLDER`` (env:// variables set).

Builds the caches of the teachers' toy bundle (full and top-2; rank 0 saves FOLDER/full, FOLDER/top2)
and writes what every rank holds afterwards to FOLDER/rank<r>.pt."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.teachers.test_cache import _manifest, _setup  # noqa: E402

from graftkd.distributed import DistContext, init_distributed  # noqa: E402
from graftkd.files import save_checkpoint  # noqa: E402
from graftkd.runtime import Inference  # noqa: E402
from graftkd.teachers import SoftTargetCache  # noqa: E402


def build_all(folder: Path, dist=None) -> dict[str, SoftTargetCache]:
    """The full and the top-2 cache of the toy bundle, saved below ``folder``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data, ens = _setup(folder / "teachers")
    return {name: SoftTargetCache.load_or_build(folder / name, ens, data.train, _manifest(ens, data, topk=topk),
                                                Inference(torch.device("cpu"), 5, dist=dist or DistContext()))
            for name, topk in (("full", None), ("top2", 2))}


if __name__ == "__main__":
    dist = init_distributed(torch.device("cpu"))
    caches = build_all(Path(sys.argv[1]), dist)
    assert all(c.built for c in caches.values())
    save_checkpoint(Path(sys.argv[1]) / f"rank{dist.rank}.pt",
                    {name: {"values": c.values, "indices": c.indices} for name, c in caches.items()})
    torch.distributed.destroy_process_group()
