"""ATF on the toy problem in a subprocess (one rank under torchrun): teacher_bn train, the guard
checked every 2 teacher updates and the collapse check. Each rank writes the teachers it ends with
(before and after the trainer restores best.pt) and its stop decisions to ``RUN_DIR/rank<r>.pt``.

``python atftrain.py RUN_DIR [--claim ACC]``: ``--claim`` replaces the teacher's validation accuracy
before training (the reference of both checks), to make them fire.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.engine.toy import ToyNet, ToyViews  # noqa: E402

from graftkd.config import load_config  # noqa: E402
from graftkd.distributed import init_distributed  # noqa: E402
from graftkd.engine.trainer import Trainer  # noqa: E402
from graftkd.methods.atf import ATF  # noqa: E402
from graftkd.teachers.ensemble import Teacher  # noqa: E402

STATS = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--claim", type=float, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist = init_distributed(torch.device("cpu"))
    cfg = load_config(None, [f"output.dir={a.run_dir.parent}", f"output.name={a.run_dir.name}",
                             "output.tensorboard=false", "trainer.epochs=2", "trainer.progress=false",
                             "trainer.device=cpu", "trainer.precision=fp32", "data.batch_size=4", "optimizer.lr=0.1",
                             "method.name=atf", "method.warmup_epochs=0", "method.teacher_bn=train", "method.adapt=all",
                             "method.lr_ratio=1", "method.guard=0.0", "method.guard_every=2",
                             "method.collapse_window=3", "trainer.eval_every_steps=2"])
    val = ToyViews(16, seed=1, augment=False)
    torch.manual_seed(123)
    teacher = Teacher(ToyNet(), "toy", "test", *STATS, *STATS)

    def predict_val(fn):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return {"logits": fn(val.x), "labels": val.y}

    with torch.no_grad():
        z0 = teacher.eval()(val.x)[None]
    method = ATF(cfg, ToyNet(), [teacher], z0, val.y, predict_val, dist)
    if a.claim is not None:
        method.val_acc0.fill_(a.claim)
        method.best_acc.fill_(a.claim)
    Trainer(cfg, cfg.run_dir, torch.device("cpu"), dist).fit(method, ToyViews(48), val)
    torch.save({"end": method.end_state, "restored": method.teachers[0].model.state_dict(),
                "stopped": method.stopped.tolist(), "stopped_at": method.stopped_at.tolist()},
               a.run_dir / f"rank{dist.rank}.pt")
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
