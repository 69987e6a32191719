"""A run from config to run folder: data, teachers and method (from the method registry), trainer,
exported student, metrics.json. The top of the stack: it imports every layer, none imports it
(except the commands).

``train`` and ``distill`` both go through ``execute``; methods are looked up by name.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftkd.config import ExperimentConfig, config_to_yaml
from graftkd.distributed import DistContext, init_distributed
from graftkd.engine.trainer import Trainer
from graftkd.errors import UserError
from graftkd.eval.metrics import score_split
from graftkd.files import atomic_write_json, atomic_write_text
from graftkd.runtime import resolve_device, resolve_precision, seed_everything


def prepare_run_dir(cfg: ExperimentConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = cfg.run_dir
    if resume:
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise UserError(f"--resume: {run_dir} has no checkpoints/last.pt")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"run folder {run_dir} already exists: pass --resume to continue it, "
                            f"--overwrite to replace it, or set output.name=<new name>")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    return run_dir


def build_student_factory(cfg: ExperimentConfig, num_classes: int):
    from graftkd.models import create_model

    def build() -> nn.Module:
        m = cfg.model
        return create_model(m.name, num_classes=num_classes, pretrained=m.pretrained, checkpoint=m.checkpoint, **m.kwargs)

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
    import graftkd.methods  # noqa: F401  registers the methods
    from graftkd.data import build_data
    from graftkd.methods.base import METHODS
    from graftkd.models import save_model_file

    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    run_dir = prepare_run_dir(cfg, resume, overwrite) if dist.is_main else cfg.run_dir
    dist.barrier()
    if dist.is_main:
        save_resolved_config(cfg, run_dir, dist)
    t0 = time.perf_counter()
    data = build_data(cfg.data, cfg.seed, run_dir if dist.is_main else None)
    seed_everything(cfg.seed)  # identical initial weights on every rank (rank 0's are broadcast anyway)
    factory = METHODS.get(cfg.method.name)
    method = factory(cfg, data, build_student=build_student_factory(cfg, data.num_classes), run_dir=run_dir,
                     device=device, dist=dist)
    trainer = Trainer(cfg, run_dir, device, dist)
    result = trainer.fit(method, data.train, data.val, resume=resume)
    train_s = time.perf_counter() - t0
    if not dist.is_main:
        return run_dir
    method.eval()
    student = method.student()
    arch = getattr(method, "student_arch", cfg.model.name)
    save_model_file(run_dir / "model.pt", student, arch=arch, num_classes=data.num_classes, classes=data.classes,
                    mean=data.mean, std=data.std, image_size=data.image_size,
                    extra={"run": str(run_dir), "method": cfg.method.name, "best_epoch": result.best_epoch,
                           "best_phase": result.best_phase, "model_kwargs": dict(cfg.model.kwargs)})
    for name, out in method.extra_outputs().items():
        save_model_file(run_dir / f"{name}.pt", out.module, arch=out.arch, num_classes=data.num_classes,
                        classes=data.classes, mean=out.mean or data.mean, std=out.std or data.std,
                        image_size=data.image_size,
                        extra={"run": str(run_dir), "role": name, "model_kwargs": dict(out.kwargs)})
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
