"""Crash safety: SIGKILL at seeded random steps and mid-checkpoint-write, resume, same weights."""
from __future__ import annotations

import csv
import random
import signal

import torch

from graftkd.files import load_checkpoint

from .procs import check, final_weights, run_toy
from .toytrain import train

EPOCHS, BATCH, N = 4, 8, 48
STEPS = EPOCHS * N // BATCH


def read_log(run_dir):
    with (run_dir / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_sigkill_three_times_then_resume_gives_identical_weights(tmp_path):
    """Three SIGKILLs at seeded random points (one half-way through a checkpoint write, two at
    optimiser steps), each followed by ``--resume``: bit-identical to an uninterrupted run."""
    ref = tmp_path / "straight"
    straight = train(ref)  # in-process reference
    rng = random.Random(8)
    run = tmp_path / "killed"
    # writes of a fresh run: best.pt and last.pt of epoch 0, then of epoch 1 ...: the 3rd or 4th is
    # past the first last.pt, so there is always a checkpoint to resume from
    p = run_toy(run, "--kill-in-save", str(rng.choice([3, 4])))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert list((run / "checkpoints").glob(".*.tmp")), "the half-written temporary is left behind"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] <= 2 * N // BATCH
    for k in sorted(rng.sample(range(2 * N // BATCH, STEPS), 2)):  # past any checkpoint left above
        p = run_toy(run, "--resume", "--kill-at-step", str(k))
        assert p.returncode == -signal.SIGKILL and (run / f"killed-step-{k}").is_file(), (k, p.stderr[-2000:])
        assert not list((run / "checkpoints").glob(".*.tmp")), "resume removes stale temporaries"
        assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] <= k
    check(run_toy(run, "--resume"))

    resumed = final_weights(run)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    la, lb = read_log(ref), read_log(run)
    assert len(lb) == EPOCHS
    for ra, rb in zip(la, lb):
        assert (ra["train_loss"], ra["val_acc"], ra["step"]) == (rb["train_loss"], rb["val_acc"], rb["step"])
    assert torch.equal(load_checkpoint(ref / "checkpoints" / "best.pt")["model"]["model.fc.weight"],
                       load_checkpoint(run / "checkpoints" / "best.pt")["model"]["model.fc.weight"])
