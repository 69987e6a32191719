"""A run from config to run folder: data, teachers and method (from the method registry), trainer,
exported student, metrics.json. The top of the stack: it imports every layer, none imports it
(except the commands).

``train`` and ``distill`` both go through ``execute``; methods are looked up by name.
"""
from __future__ import annotations

import csv
import hashlib
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

from graftkd.config import ExperimentConfig, config_to_yaml, validate_config
from graftkd.data.stain import STAIN_FILE, STAIN_KEY
from graftkd.distributed import DistContext, init_distributed
from graftkd.engine.trainer import Trainer
from graftkd.errors import UserError
from graftkd.eval.metrics import score_split
from graftkd.files import (FolderLock, atomic_write_json, atomic_write_text, folder_kind, mark_folder, name_max,
                           require_mark)
from graftkd.methods import METHODS  # the package: importing it registers every method
from graftkd.runtime import derived_seed, resolve_device, resolve_precision, seed_everything


def aside_path(run_dir: Path) -> Path:
    """Where ``--overwrite`` keeps the old run until the new one has written its first checkpoint."""
    return run_dir.parent / f".{run_dir.name}.replaced"


def recover_interrupted_replacement(run_dir: Path) -> None:
    """Finish an ``--overwrite`` that was killed half-way: the old run comes back if the new one never
    reached its first checkpoint; otherwise the new run stands and the old one is deleted."""
    aside = aside_path(run_dir)
    if not aside.is_dir() or folder_kind(aside) != "run":
        return
    if folder_kind(run_dir) == "run" and (run_dir / "checkpoints" / "last.pt").is_file():
        shutil.rmtree(aside, ignore_errors=True)
        return
    if run_dir.exists():
        if folder_kind(run_dir) != "run" and (not run_dir.is_dir() or any(run_dir.iterdir())):
            return  # not ours: leave both alone (check_run_folder names the problem)
        shutil.rmtree(run_dir)
    os.rename(aside, run_dir)
    print(f"graftkd: note: restored {run_dir}, which an interrupted --overwrite had set aside", file=sys.stderr)


def check_run_folder(cfg: ExperimentConfig, resume: bool, overwrite: bool) -> Path:
    """Every check on the run folder, without creating or changing anything."""
    run_dir = cfg.run_dir
    limit = name_max(run_dir.parent)
    for part in (cfg.output.name or cfg.name).split("/"):
        if len(f".{part}.replaced".encode()) > limit:
            raise UserError(f"output.name part {part[:40]!r}... is too long for the filesystem of {cfg.output.dir} "
                            f"(its set-aside copy .<name>.replaced must fit in {limit} bytes)")
    if resume:
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise UserError(f"--resume: {run_dir} has no checkpoints/last.pt")
        require_mark(run_dir, "run", "resume")
        check_resume_config(cfg, run_dir)
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"cannot create run folder {run_dir}: a file of that name exists")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"run folder {run_dir} already exists: pass --resume to continue it, "
                            f"--overwrite to replace it, or set output.name=<new name>")
        require_mark(run_dir, "run", "replace (--overwrite)")
        if aside_path(run_dir).exists():
            raise UserError(f"cannot set {run_dir} aside: {aside_path(run_dir)} exists and graftkd did not make it")
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
        self.new_parents: list[Path] = []
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
            parent = run_dir.parent
            while not parent.exists():  # folders of a nested name made here, removed again on a failed start
                self.new_parents.append(parent)
                parent = parent.parent
            run_dir.mkdir(parents=True)
            self.created = True
            mark_folder(run_dir, "run")
        except (OSError, UserError) as e:
            if self.created:
                shutil.rmtree(run_dir, ignore_errors=True)
                self.created = False
            if self.aside is not None and not run_dir.exists():
                os.rename(self.aside, run_dir)
            elif self.was_empty and not run_dir.exists():
                run_dir.mkdir()
            self._remove_new_parents()
            if isinstance(e, UserError):
                raise
            raise UserError(f"cannot create run folder {run_dir}: {e.strerror or e}") from None
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

    def _remove_new_parents(self) -> None:
        for p in self.new_parents:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break

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
            self._remove_new_parents()
        if exc_type is _Terminated:
            raise SystemExit(143)
        return False


#: keys a resumed run may change: they cannot change what the run computes (progress display,
#: threads, loader workers, the decoded-image cache, TensorBoard logging, where the folder lives);
#: the changes are recorded in the run folder's ``resumes.json``
RESUME_FREE = ("trainer.progress", "trainer.threads", "data.num_workers", "data.decoded_cache",
               "output.tensorboard", "output.dir", "output.name")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of a nested mapping (lists are leaves)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


#: how a key that one of two configs lacks is shown and recorded
NOT_A_KEY = "(not a key then)"


def config_changes(saved: dict[str, Any], now: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> tuple[dict[str, list], dict[str, list]]:
    """(refused, allowed) changes between two resolved configs: key -> [saved value, new value].
    Allowed: ``RESUME_FREE`` keys; a key the saved config lacks whose value is its default
    (``defaults``: the flattened default config; a key added to graftkd since the run started); a
    key the schema no longer has."""
    a, b = flatten(saved), flatten(now)
    changed = {k: [a.get(k, NOT_A_KEY), b.get(k, NOT_A_KEY)] for k in sorted(set(a) | set(b))
               if a.get(k, NOT_A_KEY) != b.get(k, NOT_A_KEY)}
    flat_defaults = flatten(defaults) if defaults is not None else {}

    def free(k: str, v: list) -> bool:
        return (k in RESUME_FREE or k not in b
                or (k not in a and k in flat_defaults and v[1] == flat_defaults[k]))

    allowed = {k: v for k, v in changed.items() if free(k, v)}
    return {k: v for k, v in changed.items() if k not in allowed}, allowed


def saved_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"--resume: cannot read {path} ({getattr(e, 'strerror', None) or type(e).__name__}): "
                        f"the run's resolved config is needed to resume it") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} is not a resolved graftkd config")
    return saved


def check_resume_config(cfg: ExperimentConfig, run_dir: Path) -> dict[str, list]:
    """Resuming continues the saved run: a resolved config that differs from its ``config.yaml`` is
    refused, naming the keys, except the free ones of ``config_changes`` (returned, to be recorded)."""
    defaults = validate_config({"method": {"name": cfg.method.name}}).model_dump(mode="json")
    refused, allowed = config_changes(saved_config(run_dir), cfg.model_dump(mode="json"), defaults)
    if refused:
        shown = ", ".join(f"{k} ({_short(v[0])} -> {_short(v[1])})" for k, v in list(refused.items())[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise UserError(f"--resume: the config differs from the run's {run_dir / 'config.yaml'} in {shown}{more}; "
                        f"a resumed run continues with its saved config (start a new run to change it)")
    return allowed


def _short(v: Any) -> str:
    text = v if v == NOT_A_KEY else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def record_resume(run_dir: Path, allowed: dict[str, list]) -> Path:
    """Append this resume and the free keys it changed to ``resumes.json``."""
    path = run_dir / "resumes.json"
    try:
        history = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        history = []
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
                    "changed": {k: {"saved": v[0], "now": v[1]} for k, v in allowed.items()}})
    return atomic_write_json(path, history)


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
    lock = FolderLock(cfg.run_dir)
    if dist.is_main:
        lock.acquire()  # one writer per run folder (released when the process ends, however it ends)
    try:
        return _execute_locked(cfg, device, dist, resume, overwrite, t0)
    finally:
        lock.release()


def _execute_locked(cfg: ExperimentConfig, device: torch.device, dist: DistContext, resume: bool, overwrite: bool,
                    t0: float) -> Path:
    data = preflight(cfg, resume, overwrite, is_main=dist.is_main)
    run_dir = cfg.run_dir
    with RunStart(run_dir, resume, active=dist.is_main) as start:
        dist.barrier()  # rank 0 has made the folder
        if resume:  # config.yaml is the run's: never rewritten; free keys changed are recorded
            allowed = check_resume_config(cfg, run_dir)
            start.defer(lambda: record_resume(run_dir, allowed))
        else:
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
    metrics.update(method.final_metrics(score_memo(cfg, data, device)))
    atomic_write_json(run_dir / "metrics.json", metrics)
    return run_dir


#: data settings that change no evaluation view (training-set draws, batches, loader workers)
_EVAL_NEUTRAL = {"shots", "max_per_group", "shots_file", "shots_column", "batch_size", "eval_batch_size",
                 "num_workers", "augment", "on_bad_file", "decoded_cache"}


def score_memo(cfg: ExperimentConfig, data: Any, device: torch.device):
    """``score(fn, split, key=None)`` for ``Method.final_metrics``. With a ``key`` (what ``fn`` is, by
    content: a frozen teacher's weight checksum, an ensemble's teachers and weights) the metrics are
    kept in ``<output.dir>/.cache/scores/``, keyed by it, the split's records, the evaluation
    settings (data view, fitted stain normalisation, precision, channels_last, device) and the package source
    (``code_revision``): the runs of a study, which share ``output.dir``, score each teacher and
    ensemble once instead of once per run."""
    from graftkd.runtime import code_revision
    from graftkd.teachers.ensemble import records_hash

    folder = Path(cfg.output.dir) / ".cache" / "scores"
    fixed: dict[str, Any] = {}

    def score(fn: Any, split: str, key: Any = None) -> dict[str, Any]:
        ds = getattr(data, split)
        if key is None:
            return score_split(fn, ds, cfg, device, data.classes)
        if not fixed:
            fixed.update(code=code_revision()["code"], precision=resolve_precision(cfg, device)[0],
                         channels_last=cfg.trainer.channels_last, device=device.type, classes=list(data.classes),
                         view=[data.image_size, list(data.mean), list(data.std)],
                         data=cfg.data.model_dump(mode="json", exclude=_EVAL_NEUTRAL),
                         stain=data.stain.fingerprint() if getattr(data, "stain", None) is not None else None)
        digest = hashlib.sha256(json.dumps([fixed, key, split, records_hash(ds.records)], sort_keys=True,
                                           default=str).encode()).hexdigest()
        path = folder / f"{digest[:40]}.json"
        try:
            return json.loads(path.read_text())["metrics"]
        except (OSError, ValueError, KeyError):
            pass
        metrics = score_split(fn, ds, cfg, device, data.classes)
        try:
            atomic_write_json(path, {"key": key, "split": split, "metrics": metrics})
        except UserError:
            pass  # an unwritable output folder: no memo, the same metrics
        return metrics

    return score


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.json (is it a finished run folder?)")
    return json.loads(path.read_text())
