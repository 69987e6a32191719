"""A run from config to run folder: data, teachers and method (from the method registry), trainer,
exported student, metrics.json. The top of the stack: it imports every layer, none imports it
(except the commands).

``train`` and ``distill`` both go through ``execute``; methods are looked up by name.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftkd.config import ExperimentConfig, config_to_yaml
from graftkd.data.stain import STAIN_FILE, STAIN_KEY
from graftkd.distributed import DistContext, init_distributed
from graftkd.engine.trainer import Trainer
from graftkd.errors import UserError
from graftkd.eval.metrics import score_split
from graftkd.files import atomic_write_json, atomic_write_text
from graftkd.methods import METHODS  # the package: importing it registers every method
from graftkd.runtime import derived_seed, resolve_device, resolve_precision, seed_everything


def aside_path(run_dir: Path) -> Path:
    """Where ``--overwrite`` keeps the old run until the new one has written its first checkpoint."""
    return run_dir.parent / f".{run_dir.name}.replaced"


def recover_interrupted_replacement(run_dir: Path) -> None:
    """Finish an ``--overwrite`` that was killed half-way: the old run comes back if the new one never
    reached its first checkpoint; otherwise the new run stands and the old one is deleted."""
    aside = aside_path(run_dir)
    if not aside.is_dir():
        return
    if (run_dir / "checkpoints" / "last.pt").is_file():
        shutil.rmtree(aside, ignore_errors=True)
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.rename(aside, run_dir)
    print(f"graftkd: note: restored {run_dir}, which an interrupted --overwrite had set aside", file=sys.stderr)


def check_run_folder(cfg: ExperimentConfig, resume: bool, overwrite: bool) -> Path:
    """Every check on the run folder, without creating or changing anything."""
    run_dir = cfg.run_dir
    if resume:
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise UserError(f"--resume: {run_dir} has no checkpoints/last.pt")
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"cannot create run folder {run_dir}: a file of that name exists")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"run folder {run_dir} already exists: pass --resume to continue it, "
                        f"--overwrite to replace it, or set output.name=<new name>")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create run folder {run_dir}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create run folder {run_dir}: {parent} is not writable")
    return run_dir


class _Terminated(BaseException):
    """SIGTERM while a run is starting (torchrun stops the other ranks when one fails)."""


class RunStart:
    """The run folder of a starting run, made only after ``preflight`` passed.

    A new run gets a fresh folder; with ``--overwrite`` the old folder is first renamed to
    ``aside_path`` and deleted only at ``commit`` (the first checkpoint). Any failure before then
    deletes the new folder and puts the old one back, so a failed start leaves no trace. A resumed
    run changes nothing in its folder (``defer``) until its checkpoint has loaded and it saves again.
    Active on rank 0 only; the other ranks use the folder rank 0 made.
    """

    def __init__(self, run_dir: Path, resume: bool, active: bool) -> None:
        self.run_dir, self.resume, self.active = run_dir, resume, active
        self.aside: Path | None = None
        self.created = self.committed = self.was_empty = False
        self._pending: list = []
        self._old_handler: Any = None

    def __enter__(self) -> "RunStart":
        if not self.active or self.resume:
            return self
        run_dir = self.run_dir
        try:
            if run_dir.is_dir() and any(run_dir.iterdir()):  # --overwrite (checked by check_run_folder)
                self.aside = aside_path(run_dir)
                os.rename(run_dir, self.aside)
            elif run_dir.is_dir():
                self.was_empty = True
                run_dir.rmdir()
            run_dir.mkdir(parents=True)
        except OSError as e:
            if self.aside is not None and not run_dir.exists():
                os.rename(self.aside, run_dir)
            raise UserError(f"cannot create run folder {run_dir}: {e.strerror or e}") from None
        self.created = True
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    @staticmethod
    def _on_sigterm(signum: int, frame: Any) -> None:
        raise _Terminated()

    def defer(self, write) -> None:
        """Run ``write()`` now in a new folder; for a resumed run, at ``commit``."""
        if not self.active:
            return
        if self.resume and not self.committed:
            self._pending.append(write)
        else:
            write()

    def commit(self) -> None:
        """The run has started for good: drop the old folder, do the deferred writes."""
        if self.committed or not self.active:
            return
        self.committed = True
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None
        for write in self._pending:
            write()
        self._pending.clear()
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            self.commit()
            return False
        self._restore_handler()
        if self.created and not self.committed:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            if self.aside is not None:
                os.rename(self.aside, self.run_dir)
            elif self.was_empty:
                self.run_dir.mkdir()
        if exc_type is _Terminated:
            raise SystemExit(143)
        return False


def preflight(cfg: ExperimentConfig, resume: bool, overwrite: bool, *, is_main: bool = True) -> Any:
    """Every check that can fail before training, with nothing written to the run folder: the run
    folder's state, the data (scan, full decode of every image, split), the student model and the
    teachers (files, classes). Returns the data bundle."""
    from graftkd.data import build_data
    from graftkd.teachers.ensemble import load_teacher

    if is_main:
        recover_interrupted_replacement(cfg.run_dir)
    check_run_folder(cfg, resume, overwrite)
    data = build_data(cfg.data, cfg.seed, None, work_dir=cfg.output.dir)
    if data.unlabeled is not None and cfg.fusion.strategy == "confidence" and len(cfg.teachers) > 1:
        raise UserError("fusion.strategy = confidence weighs teachers by their loss on the label, which unlabelled "
                        "images (data.unlabeled) do not have; choose mean, accuracy, entropy or best")
    build_student_factory(cfg, data.num_classes)()
    for i, t in enumerate(cfg.teachers):
        load_teacher(t, i, list(data.classes), tuple(data.mean), tuple(data.std))
    return data


#: derived-seed stream of the students' initial weights
STUDENT_INIT_STREAM = 29


def build_student_factory(cfg: ExperimentConfig, num_classes: int):
    """``build()``: a fresh student. Its initial weights depend only on ``cfg.seed`` and on how many
    students this factory has built (own RNG stream, global RNG untouched), not on what a method
    builds before it (teachers, peers): for one seed every method starts from the same student, so
    differences between methods are paired (common random numbers)."""
    from graftkd.models import create_model

    built = 0

    def build() -> nn.Module:
        nonlocal built
        m = cfg.model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(cfg.seed, STUDENT_INIT_STREAM, built))
            built += 1
            return create_model(m.name, num_classes=num_classes, pretrained=m.pretrained, checkpoint=m.checkpoint,
                                **m.kwargs)

    return build


def write_predictions_csv(path: Path, rows: list[list[Any]]) -> Path:
    """``predictions.csv``: split, image (path or array index), group, label, pred (class indices)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "image", "group", "label", "pred"])
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def save_resolved_config(cfg: ExperimentConfig, run_dir: Path, dist: DistContext) -> Path:
    """``config.yaml``: the resolved config, headed by how it was launched (world size, global batch)."""
    head = (f"# launched with {dist.world_size} process(es) (backend {dist.backend or 'none'}): global batch "
            f"{cfg.data.batch_size * dist.world_size} = {dist.world_size} x data.batch_size {cfg.data.batch_size}\n")
    return atomic_write_text(run_dir / "config.yaml", head + config_to_yaml(cfg))


def execute(cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train ``cfg.method`` and write the whole run folder (rank 0). Returns the run folder."""
    device = resolve_device(cfg.trainer.device)
    dist = init_distributed(device)
    try:
        return _execute(cfg, device, dist, resume, overwrite)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _execute(cfg: ExperimentConfig, device: torch.device, dist: DistContext, resume: bool, overwrite: bool) -> Path:

    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    data = preflight(cfg, resume, overwrite, is_main=dist.is_main)
    run_dir = cfg.run_dir
    with RunStart(run_dir, resume, active=dist.is_main) as start:
        dist.barrier()  # rank 0 has made the folder
        start.defer(lambda: save_resolved_config(cfg, run_dir, dist))
        start.defer(lambda: data.write_splits(run_dir))
        if data.stain is not None:
            start.defer(lambda: atomic_write_json(run_dir / STAIN_FILE, data.stain.describe()))
        seed_everything(cfg.seed)  # identical initial weights on every rank (rank 0's are broadcast anyway)
        factory = METHODS.get(cfg.method.name)
        method = factory(cfg, data, build_student=build_student_factory(cfg, data.num_classes), run_dir=run_dir,
                         device=device, dist=dist)
        trainer = Trainer(cfg, run_dir, device, dist)
        trainer.on_checkpoint = start.commit
        result = trainer.fit(method, data.train, data.val, resume=resume, unlabeled=data.unlabeled)
    train_s = time.perf_counter() - t0
    if not dist.is_main:
        return run_dir
    try:
        return _finish(cfg, device, dist, data, method, result, run_dir, train_s)
    except (UserError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"training finished (checkpoints in {run_dir / 'checkpoints'}), but the run could not be "
                        f"scored, so there is no metrics.json: {reason}") from None


def _finish(cfg: ExperimentConfig, device: torch.device, dist: DistContext, data: Any, method: Any, result: Any,
            run_dir: Path, train_s: float) -> Path:
    """Exported student, extra outputs, predictions.csv and metrics.json of a trained run (rank 0)."""
    from graftkd.models import save_model_file

    method.eval()
    student = method.student()
    arch = method.student_arch() or cfg.model.name
    save_model_file(run_dir / "model.pt", student, arch=arch, num_classes=data.num_classes, classes=data.classes,
                    mean=data.mean, std=data.std, image_size=data.image_size,
                    extra={"run": str(run_dir), "method": cfg.method.name, "best_epoch": result.best_epoch,
                           "best_phase": result.best_phase, "model_kwargs": dict(cfg.model.kwargs),
                           **({STAIN_KEY: data.stain.describe()} if data.stain is not None else {})})
    for name, out in method.extra_outputs().items():
        save_model_file(run_dir / f"{name}.pt", out.module, arch=out.arch, num_classes=data.num_classes,
                        classes=data.classes, mean=out.mean or data.mean, std=out.std or data.std,
                        image_size=data.image_size,
                        extra={"run": str(run_dir), "role": name, "model_kwargs": dict(out.kwargs),
                               **({STAIN_KEY: data.stain.describe()} if data.stain is not None else {})})
    if data.unlabeled is not None:  # how many unlabelled images the run had and drew
        per_rank = -(-len(data.unlabeled) // dist.world_size)
        data.info["unlabeled"]["drawn"] = result.steps * min(cfg.data.unlabeled_batch_size, per_rank) * dist.world_size
    metrics: dict[str, Any] = {
        "run": str(run_dir), "method": cfg.method.name, "student": arch, "checkpoint": "model.pt (best on val)",
        "selection": {"metric": cfg.trainer.select_metric, "phase": result.best_phase, "epoch": result.best_epoch,
                      "step": result.best_step, "value": result.best_metric},
        "steps": result.steps, "phase_steps": result.phase_steps(),
        "data": data.info, "train_seconds": round(train_s, 2), "world_size": dist.world_size,
        "backend": dist.backend, "global_batch": cfg.data.batch_size * dist.world_size,
        "phase_global_batch": {row["phase"]: row["global_batch"] for row in result.history},
        "precision": dict(zip(("ran", "why"), resolve_precision(cfg, device)), asked=cfg.trainer.precision),
    }
    rows: list[list[Any]] = []
    for split, ds in (("val", data.val), ("test", data.test)):
        metrics[split] = score_split(method.eval_logits, ds, cfg, device, data.classes, rows, split)
    write_predictions_csv(run_dir / "predictions.csv", rows)
    metrics.update(method.final_metrics(
        lambda fn, split: score_split(fn, getattr(data, split), cfg, device, data.classes)))
    atomic_write_json(run_dir / "metrics.json", metrics)
    return run_dir


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.json (is it a finished run folder?)")
    return json.loads(path.read_text())
