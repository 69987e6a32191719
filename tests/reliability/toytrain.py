"""Train the toy problem in a subprocess (single process, or one rank under torchrun).

``python toytrain.py RUN_DIR [--net toy|plain] [--batch B] [--epochs E] [--resume]
[--kill-at-step K] [--kill-in-save N] [--kill-rank R]``

``--kill-at-step K`` sends SIGKILL to this process at optimiser step K, ``--kill-in-save N`` in the
middle of the N-th checkpoint write (half a file written). Each kill happens once: a marker file
in RUN_DIR remembers it, so the resumed run goes past that point. Rank 0 writes the final
weights to ``RUN_DIR/final.pt``. Tests import ``train`` to run the reference in-process.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.engine.toy import ToyNet, ToyViews  # noqa: E402

import graftkd.files as gio  # noqa: E402
from graftkd.config import ExperimentConfig, load_config  # noqa: E402
from graftkd.distributed import DistContext, init_distributed  # noqa: E402
from graftkd.engine.trainer import Trainer  # noqa: E402
from graftkd.methods.supervised import Supervised  # noqa: E402


class PlainNet(nn.Module):
    """ToyNet without BatchNorm and Dropout: its DDP gradients equal the single-process ones."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def kill_once(marker: Path) -> None:
    """SIGKILL this process unless ``marker`` exists (then create it first)."""
    if marker.exists():
        return
    marker.write_text("killed\n")
    os.kill(os.getpid(), signal.SIGKILL)


def toy_config(run_dir: Path, batch: int, epochs: int) -> ExperimentConfig:
    return load_config(None, [f"output.dir={run_dir.parent}", f"output.name={run_dir.name}",
                              "output.tensorboard=false", f"trainer.epochs={epochs}", "trainer.progress=false",
                              "trainer.device=cpu", "trainer.precision=fp32", f"data.batch_size={batch}", "optimizer.lr=0.1",
                              "schedule.name=cosine", "schedule.warmup_epochs=1"])


def train(run_dir: Path, net: str = "toy", batch: int = 8, epochs: int = 4, resume: bool = False,
          dist: DistContext | None = None, kill_at_step: int | None = None) -> dict[str, torch.Tensor]:
    """Fit the toy problem into ``run_dir``; returns the final weights (rank 0 also writes final.pt)."""
    torch.set_num_threads(1)
    cfg = toy_config(run_dir, batch, epochs)
    dist = dist or DistContext()
    torch.manual_seed(123)  # initial weights; the trainer broadcasts rank 0's anyway
    model = ToyNet() if net == "toy" else PlainNet()

    class Killable(Supervised):
        def training_step(self, batch, ctx):  # type: ignore[no-untyped-def]
            if ctx.step == kill_at_step:
                kill_once(run_dir / f"killed-step-{ctx.step}")
            return super().training_step(batch, ctx)

    method = Killable(cfg, model)
    Trainer(cfg, cfg.run_dir, torch.device("cpu"), dist).fit(
        method, ToyViews(48), ToyViews(20, seed=1, augment=False), resume=resume)
    if dist.is_main:
        gio.save_checkpoint(run_dir / "final.pt", {"kind": "test_final", "model": method.state_dict()})
    return method.state_dict()


def kill_in_save(run_dir: Path, n: int) -> None:
    """Make the ``n``-th checkpoint write of this process write half a file, then SIGKILL."""
    real_save, calls = torch.save, [0]

    def half_save(obj, f):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == n:
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            kill_once(run_dir / f"killed-save-{n}")
        real_save(obj, f)

    gio.torch.save = half_save  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--net", choices=["toy", "plain"], default="toy")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-at-step", type=int, default=None)
    ap.add_argument("--kill-in-save", type=int, default=None)
    ap.add_argument("--kill-rank", type=int, default=0)
    a = ap.parse_args()
    dist = init_distributed(torch.device("cpu"))
    kills = dist.rank == a.kill_rank
    if kills and a.kill_in_save is not None:
        kill_in_save(a.run_dir, a.kill_in_save)
    train(a.run_dir, a.net, a.batch, a.epochs, a.resume, dist, a.kill_at_step if kills else None)
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
