"""torchrun DDP on CPU: 2 gloo ranks on 127.0.0.1 against one process with the same global batch."""
from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import torch

from graftkd.config import load_config
from graftkd.files import load_checkpoint, save_checkpoint
from graftkd.engine.trainer import Trainer
from graftkd.errors import UserError
from graftkd.methods.supervised import Supervised
from tests.engine.toy import ToyNet, ToyViews

from .cachebuild import build_all
from .procs import TOYTRAIN, check, final_weights, launch_ranks, run_toy
from .toytrain import train

CACHEBUILD = Path(__file__).with_name("cachebuild.py")

GLOBAL_BATCH = 8


def rows(run_dir):
    with (run_dir / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_ddp_reaches_single_process_weights(tmp_path):
    """Without BatchNorm (per-rank batch statistics) and Dropout (per-rank masks), 2 ranks with
    batch 4 each take exactly the single process's steps with batch 8: same samples per step,
    averaged gradients. Equal up to float summation order."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(single, "plain", GLOBAL_BATCH, 3)
    check(run_toy(ddp, "--net", "plain", "--batch", str(GLOBAL_BATCH // 2), "--epochs", "3", nproc=2))
    a, b = final_weights(single), final_weights(ddp)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    ra, rb = rows(single), rows(ddp)
    assert [r["global_batch"] for r in rb] == [str(GLOBAL_BATCH)] * 3
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert float(y["train_loss"]) == pytest.approx(float(x["train_loss"]), abs=1e-5)
        assert float(y["val_loss"]) == pytest.approx(float(x["val_loss"]), abs=1e-5)
        assert y["val_acc"] == x["val_acc"]
    assert load_checkpoint(ddp / "checkpoints" / "last.pt")["world_size"] == 2
    listing = sorted(str(p.relative_to(ddp)) for p in ddp.rglob("*"))
    assert listing == sorted(str(p.relative_to(single)) for p in single.rglob("*"))  # rank 0 alone writes


def test_ddp_run_killed_on_rank1_resumes_to_identical_weights(tmp_path):
    """ToyNet with BatchNorm and Dropout: rank 1 is SIGKILLed mid-epoch, the launcher tears the group
    down (as torchrun does), and ``--resume`` on 2 ranks ends bit-identical to the uninterrupted
    2-rank run (BN running statistics are averaged across ranks before every checkpoint)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--batch", "4", "--epochs", "3"]
    assert [c for c, _ in launch_ranks(TOYTRAIN, [str(straight), *args])] == [0, 0]
    out = launch_ranks(TOYTRAIN, [str(killed), *args, "--kill-rank", "1", "--kill-at-step", "14"])
    assert out[1][0] == -signal.SIGKILL and (killed / "killed-step-14").is_file(), out
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["global_epoch"] == 2
    assert [c for c, _ in launch_ranks(TOYTRAIN, [str(killed), *args, "--resume"])] == [0, 0]
    a, b = final_weights(straight), final_weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["train_loss"] for r in rows(straight)] == [r["train_loss"] for r in rows(killed)]


def test_resume_with_another_world_size_is_refused(tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.name=run", "output.tensorboard=false",
                             "trainer.epochs=2", "trainer.progress=false", "data.batch_size=8"])
    data = ToyViews(16), ToyViews(8, seed=1, augment=False)
    Trainer(cfg, cfg.run_dir).fit(Supervised(cfg, ToyNet()), *data)
    last = cfg.run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["world_size"] = 2
    save_checkpoint(last, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(UserError, match=r"2 process\(es\), this one has 1: resume with --nproc 2"):
        Trainer(cfg, cfg.run_dir).fit(Supervised(cfg, ToyNet()), *data, resume=True)


def test_soft_target_cache_build_is_split_across_ranks(tmp_path):
    """Each rank fuses every 2nd (item, view); afterwards both ranks hold, and rank 0 saved, exactly
    the single-process cache (full float16 and top-k)."""
    ref = build_all(tmp_path / "single")
    out = launch_ranks(CACHEBUILD, [str(tmp_path / "ddp")])
    assert [code for code, _ in out] == [0, 0], out
    for name, cache in ref.items():
        saved = load_checkpoint(tmp_path / "ddp" / name / "soft_targets.pt")
        for held in [saved] + [load_checkpoint(tmp_path / "ddp" / f"rank{r}.pt")[name] for r in (0, 1)]:
            assert torch.equal(held["values"], cache.values), name
            assert (held["indices"] is None) == (cache.indices is None)
            assert cache.indices is None or torch.equal(held["indices"], cache.indices), name


@pytest.mark.parametrize("claim", [None, 1.0])
def test_atf_ranks_end_with_identical_teachers_and_stop_decisions(tmp_path, claim):
    """2 gloo ranks, ATF with teacher_bn=train (per-rank batch statistics), the guard every 2 teacher
    updates and the collapse check: every decision that changes the teacher (stop, roll-back) is taken
    once for all ranks, so both end with the same teacher, bit for bit. ``claim`` 1.0 (a pretrained
    accuracy the toy teacher does not have) makes the checks fire mid-run."""
    run = tmp_path / "atf"
    run.mkdir()
    args = [str(run)] + ([] if claim is None else ["--claim", str(claim)])
    out = launch_ranks(Path(__file__).with_name("atftrain.py"), args)
    assert [c for c, _ in out] == [0, 0], out
    r0, r1 = (torch.load(run / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["end"]["stopped"] == r1["end"]["stopped"] and r0["stopped_at"] == r1["stopped_at"]
    assert r0["end"]["reason"] == r1["end"]["reason"]
    assert any(r0["end"]["stopped"]) or claim is None
    for key, value in r0["end"]["teachers"][0].items():
        assert torch.equal(value, r1["end"]["teachers"][0][key]), key
    for key, value in r0["restored"].items():
        assert torch.equal(value, r1["restored"][key]), key
