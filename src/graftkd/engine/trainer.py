"""The one training loop: runs every method's phases with the same device, precision, distribution,
checkpoint and logging code.

Resume is exact on CPU: the sampler order and every augmentation are functions of
(seed, phase, epoch, sample), and ``last.pt`` holds weights, optimisers, schedulers and RNG state.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from graftkd.config import ExperimentConfig, OptimizerConfig, ScheduleConfig
from graftkd.data.loaders import EpochSampler, UnlabeledStream, eval_loader, join_batches, make_loader
from graftkd.distributed import DistContext
from graftkd.errors import UserError
from graftkd.files import atomic_write_text, load_checkpoint, read_log, remove_stale_temporaries, save_checkpoint
from graftkd.methods.base import Method, OptimSpec, Phase, StepContext
from graftkd.runtime import (autocast, autocast_dtype, configure_torch, derived_seed, predict, resolve_device,
                             seed_everything, to_device)


class TrainingDiverged(UserError):
    """A loss term became NaN or infinite; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------ optimisation
def build_optimizer(spec: OptimSpec, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    c: OptimizerConfig = spec.optimizer
    groups = []
    for g in spec.params:
        g = dict(g)
        g["lr"] = c.lr * lr_scale * g.pop("lr_scale", 1.0)
        g["params"] = [p for p in g["params"] if p.requires_grad]
        if g["params"]:
            groups.append(g)
    if not groups:
        raise UserError(f"optimiser '{spec.name}' has no trainable parameters")
    if c.name == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0,
                               weight_decay=c.weight_decay)
    if c.name == "adam":
        return torch.optim.Adam(groups, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
    return torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)


def lr_factor(s: ScheduleConfig, base_lr: float, total_steps: int, steps_per_epoch: int, step: int) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps of a phase of ``total_steps`` steps
    (linear warm-up, then the schedule; multistep milestones are in epochs)."""
    warm = s.warmup_steps if s.warmup_steps is not None else s.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    epoch = step / steps_per_epoch
    if s.name == "constant":
        return 1.0
    if s.name == "multistep":
        return s.gamma ** sum(epoch >= m for m in s.milestones)
    total = max(total_steps - warm, 1)
    t = min((step - warm) / total, 1.0)
    floor = s.min_lr / base_lr if base_lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


# -------------------------------------------------------------------------------------- trainer
@dataclass
class FitResult:
    best_metric: float | None
    best_phase: str | None
    best_epoch: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None  # global optimiser steps done when the best weights were scored

    @property
    def steps(self) -> int:
        """Optimiser steps the run took (all phases)."""
        return int(self.history[-1]["step"]) if self.history else 0

    def phase_steps(self) -> dict[str, int]:
        """Optimiser steps per phase, in phase order."""
        out: dict[str, int] = {}
        done = 0
        for row in self.history:
            out[row["phase"]] = out.get(row["phase"], 0) + int(row["step"]) - done
            done = int(row["step"])
        return out


@dataclass
class PhaseRun:
    """A phase being trained: its place in the method's list, loader, optimisers and length."""

    index: int
    phase: Phase
    loader: DataLoader
    sampler: EpochSampler
    optims: list[torch.optim.Optimizer]
    scheds: list[torch.optim.lr_scheduler.LambdaLR]
    params: list[nn.Parameter]  # every parameter of the phase's optimisers (gradients averaged across ranks)
    steps_per_epoch: int
    total: int  # optimiser steps of the phase
    unlabeled: UnlabeledStream | None = None  # data.unlabeled: unlabelled images joined to every batch

    @property
    def epochs(self) -> int:
        return math.ceil(self.total / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        """Steps of ``epoch``: a full epoch, or what is left of the phase's budget."""
        return min(self.steps_per_epoch, self.total - epoch * self.steps_per_epoch)


def _no_best() -> dict[str, Any]:
    return {"metric": None, "phase": None, "epoch": None, "step": None}


class Trainer:
    """Runs ``method`` on ``train``/``val`` datasets and writes the run folder (rank 0 only)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, device: torch.device | None = None,
                 dist: DistContext | None = None) -> None:
        self.cfg = cfg
        self.tc = cfg.trainer
        self.run_dir = Path(run_dir)
        self.device = device or resolve_device(self.tc.device)
        self.dist = dist or DistContext()
        self.dtype = autocast_dtype(cfg, self.device)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.history: list[dict[str, Any]] = []
        self.unlabeled: Any = None  # fit(unlabeled=...): the unlabelled transfer set
        self._tb = None
        #: called once, after the first ``last.pt`` is written (rank 0)
        self.on_checkpoint: Callable[[], None] | None = None
        configure_torch(self.tc)

    # ---------------------------------------------------------------------------------- logging
    def _log_epoch(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.dist.is_main:
            return
        keys: list[str] = []
        for r in self.history:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.history)
        atomic_write_text(self.run_dir / "log.csv", buf.getvalue())
        if self.cfg.output.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=row["global_epoch"])
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "global_epoch", "step"):
                    self._tb.add_scalar(f"{row['phase']}/{k}" if k.startswith("train_") else k, v, row["global_epoch"])
            self._tb.flush()

    def _read_history(self, upto_global_epoch: int) -> None:
        self.history += [r for r in read_log(self.run_dir / "log.csv") if r["global_epoch"] < upto_global_epoch]

    # ------------------------------------------------------------------------------ checkpoints
    def _save_last(self, method: Method, state: dict[str, Any]) -> None:
        if self.dist.is_main:
            save_checkpoint(self.ckpt_dir / "last.pt", {"kind": "train_state", "model": method.state_dict(), **state})
            if self.on_checkpoint is not None:  # the run has started for good (see experiment.RunStart)
                hook, self.on_checkpoint = self.on_checkpoint, None
                hook()

    def _save_best(self, method: Method, info: dict[str, Any]) -> None:
        if self.dist.is_main:
            save_checkpoint(self.ckpt_dir / "best.pt", {"kind": "train_best", "model": method.state_dict(), **info})
        self.dist.barrier()

    # -------------------------------------------------------------------------------------- fit
    def fit(self, method: Method, train_set: Any, val_set: Any, resume: bool = False,
            unlabeled: Any = None) -> FitResult:
        """Train ``method``'s phases on ``train_set``, selecting on ``val_set``; ``resume`` continues
        from ``checkpoints/last.pt``. Each phase is a loop over its epochs (the last one cut short
        by a step budget); a selecting phase ends with its best validated weights. ``unlabeled``
        (a view dataset, labels -1): every step's batch of labelled images is followed by
        ``data.unlabeled_batch_size`` of these (``join_batches``); the method must ``uses_unlabeled()``."""
        if unlabeled is not None and not method.uses_unlabeled():
            raise UserError(f"data.unlabeled is set, but method '{self.cfg.method.name}' has no teacher-driven term "
                            f"that can use unlabelled images (kd, dkd, graft, fitnet, at, mir, fskd, atf have; dml with "
                            f"teachers and method.teacher_weight > 0); set data.unlabeled=null")
        self.unlabeled = unlabeled
        method.to(self.device)
        if self.tc.channels_last:
            method.to(memory_format=torch.channels_last)
        phases = method.phases()
        self.step, self.global_epoch, self._best = 0, 0, _no_best()
        state = self._resume(method) if resume else None
        if state is None:
            seed_everything(self.cfg.seed)
        start_phase, start_epoch = (state["phase_index"], state["next_epoch"]) if state is not None else (0, 0)
        for index in range(start_phase, len(phases)):
            resumed = state if index == start_phase else None
            run = self._start_phase(method, index, phases[index], train_set, resumed)
            first_epoch = start_epoch if resumed is not None else 0
            if first_epoch == 0 and run.phase.select_best:
                self._best = _no_best()
            for epoch in range(first_epoch, run.epochs):
                row = self._train_epoch(method, run, epoch, val_set)
                row["global_epoch"] = self.global_epoch
                self.global_epoch += 1
                self._log_epoch(row)
                if epoch + 1 < run.epochs:
                    self._save_last(method, self._state(index, epoch + 1, run))
            self._end_phase(method, run)
        if self._tb is not None:
            self._tb.close()
        best = self._best
        return FitResult(best["metric"], best["phase"], best["epoch"], self.history, best.get("step"))

    def _resume(self, method: Method) -> dict[str, Any]:
        """Load ``last.pt`` into the method and the trainer (step, selection, RNG, log history)."""
        last_path = self.ckpt_dir / "last.pt"
        if not last_path.is_file():
            raise UserError(f"--resume: no checkpoint at {last_path}")
        state = load_checkpoint(last_path, map_location=self.device)
        if self.dist.is_main:  # half-written files of a killed run
            remove_stale_temporaries(self.ckpt_dir)
            remove_stale_temporaries(self.run_dir)
        if state.get("kind") != "train_state":
            raise UserError(f"{last_path} is not a training state checkpoint")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise UserError(f"{last_path} was written by a run with {saved_world} process(es), this one has "
                            f"{self.dist.world_size}: resume with --nproc {saved_world} (the global batch, "
                            f"sample order and lr depend on it)")
        try:
            method.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserError(f"{last_path} does not match this method/model: {str(e).splitlines()[0]}") from None
        self.step, self.global_epoch = state["step"], state["global_epoch"]
        self._best.update(state["best"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if torch.cuda.is_available() and "rng_cuda" in state:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
        self._read_history(state["global_epoch"])
        return state

    def _start_phase(self, method: Method, index: int, phase: Phase, train_set: Any,
                     resumed: dict[str, Any] | None) -> PhaseRun:
        """The phase's loader, optimisers and lr schedules (their state from ``resumed``); the
        trainable parameters and buffers are broadcast from rank 0."""
        cfg = self.cfg
        method.start_phase(phase)
        batch_size = phase.batch_size or cfg.data.batch_size
        sampler = EpochSampler(len(train_set), derived_seed(cfg.seed, 17), shuffle=True,
                               rank=self.dist.rank, world_size=self.dist.world_size)
        loader = make_loader(train_set, batch_size, sampler, cfg.data.num_workers, len(sampler) > batch_size)
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise UserError(f"phase '{phase.name}': the training set is empty")
        total = phase.total_steps(steps_per_epoch)
        optims = [build_optimizer(s) for s in phase.optimizers]
        scheds = [torch.optim.lr_scheduler.LambdaLR(
            o, lambda k, s=s: lr_factor(s.schedule, s.optimizer.lr, total, steps_per_epoch, k))
            for s, o in zip(phase.optimizers, optims)]
        if resumed is not None:
            for o, st in zip(optims, resumed["optimizers"]):
                o.load_state_dict(st)
            for sc, st in zip(scheds, resumed["schedulers"]):
                sc.load_state_dict(st)
        params = list({id(p): p for o in optims for g in o.param_groups for p in g["params"]}.values())
        self.dist.broadcast_(params + synced_buffers(method))
        stream = None
        if self.unlabeled is not None:
            stream = UnlabeledStream(self.unlabeled, cfg.data.unlabeled_batch_size, derived_seed(cfg.seed, 19),
                                     cfg.data.num_workers, self.dist.rank, self.dist.world_size)
        return PhaseRun(index, phase, loader, sampler, optims, scheds, params, steps_per_epoch, total, stream)

    def _end_phase(self, method: Method, run: PhaseRun) -> None:
        """A selecting phase hands on its best validated weights; ``last.pt`` marks the boundary."""
        if run.phase.select_best and self._best["phase"] == run.phase.name and (self.ckpt_dir / "best.pt").is_file():
            self.dist.barrier()
            method.load_state_dict(load_checkpoint(self.ckpt_dir / "best.pt", map_location=self.device)["model"])
        self._save_last(method, self._state(run.index + 1, 0, None))

    def _train_epoch(self, method: Method, run: PhaseRun, epoch: int, val_set: Any) -> dict[str, Any]:
        """Train the steps of epoch ``epoch`` (all of it but for a phase's cut-short last epoch),
        validating when due; returns the epoch's log row (val_* of its last validation)."""
        run.sampler.set_epoch(run.index, epoch)
        if hasattr(run.loader.dataset, "set_epoch"):
            run.loader.dataset.set_epoch(self.global_epoch)
        method.train()
        n_steps = run.steps_in(epoch)
        sums: dict[str, float] = {}
        n_seen = 0
        t0 = time.perf_counter()
        bar = self._progress_bar(run, epoch, n_steps)
        val: dict[str, Any] = {}
        phase_step = epoch * run.steps_per_epoch
        if run.unlabeled is not None:
            run.unlabeled.start(run.index, epoch, self.global_epoch)
        for i, batch in enumerate(run.loader):
            if i == n_steps:
                break
            if run.unlabeled is not None:
                batch = join_batches(batch, run.unlabeled.next())
            b = to_device(batch, self.device, self.tc.channels_last)
            ctx = StepContext(phase=run.phase, epoch=epoch, step=self.step, step_in_epoch=i,
                              steps_per_epoch=run.steps_per_epoch, phase_step=phase_step, phase_steps=run.total)
            values = self._train_step(method, run, b, ctx)
            phase_step += 1
            bs = int(b["image"].shape[0])
            n_seen += bs
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * bs
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{n_seen / (time.perf_counter() - t0):.0f}")
            if i + 1 < n_steps and self._eval_due(phase_step, run.total, epoch, False):  # mid-epoch
                t_val = time.perf_counter()
                val = self._validate_and_select(method, run.phase, epoch, val_set, True)
                method.train()
                t0 += time.perf_counter() - t_val
        if bar is not None:
            bar.close()
        self.dist.average_norm_buffers_(method)
        row = self._epoch_row(run, epoch, sums, n_seen, time.perf_counter() - t0)
        if self._eval_due(phase_step, run.total, epoch, True):
            val = self._validate_and_select(method, run.phase, epoch, val_set, False)
        row.update(val)
        return row

    def _train_step(self, method: Method, run: PhaseRun, batch: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        """One optimiser step: losses, divergence check, backward, gradient all-reduce and clipping,
        the phase's optimisers (each every ``spec.every`` steps) and schedules. Returns the loss values."""
        with autocast(self.device, self.dtype):
            out = method.training_step(batch, ctx)
        values = dict(zip(out, torch.stack([v.detach().float() for v in out.values()]).tolist()))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(
                f"non-finite loss in phase '{run.phase.name}' epoch {ctx.epoch} step {ctx.step}: "
                + ", ".join(f"{k}={values[k]}" for k in bad)
                + f"; the last good checkpoint is {self.ckpt_dir / 'last.pt'}")
        for o in run.optims:
            o.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.dist.all_reduce_grads(run.params)
        if self.tc.grad_clip is not None:  # per optimiser: a student's norm never scales a teacher's step
            for o in run.optims:
                torch.nn.utils.clip_grad_norm_([p for g in o.param_groups for p in g["params"]], self.tc.grad_clip)
        for spec, o, s in zip(run.phase.optimizers, run.optims, run.scheds):
            if (self.step + 1) % spec.every == 0:
                o.step()
            s.step()
        self.step += 1
        return values

    def _progress_bar(self, run: PhaseRun, epoch: int, n_steps: int) -> Any:
        if not (self.tc.progress and self.dist.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=n_steps, desc=f"{run.phase.name} {epoch + 1}/{run.epochs}", leave=False, dynamic_ncols=True)

    def _epoch_row(self, run: PhaseRun, epoch: int, sums: dict[str, float], n_seen: int,
                   elapsed: float) -> dict[str, Any]:
        """The epoch's log row: sample-weighted mean losses over all ranks, lr, global batch, speed."""
        totals = self.dist.sum([n_seen] + [sums[k] for k in sorted(sums)], self.device)
        n_all = totals[0]
        row: dict[str, Any] = {"phase": run.phase.name, "epoch": epoch, "step": self.step,
                               "lr": run.optims[0].param_groups[0]["lr"],
                               "global_batch": run.loader.batch_size * self.dist.world_size}
        row.update({f"train_{k}": v / n_all for k, v in zip(sorted(sums), totals[1:])})
        row.update({"epoch_time_s": round(elapsed, 3), "img_s": round(n_all / elapsed, 1)})
        return row

    def _eval_due(self, phase_step: int, total: int, epoch: int, epoch_end: bool) -> bool:
        """Validate after ``phase_step`` steps of the phase? Every ``eval_every_steps`` steps, else at
        every ``eval_every``-th epoch end; always after the phase's last step."""
        tc = self.tc
        if phase_step == total:
            return True
        if tc.eval_every_steps is not None:
            return phase_step % tc.eval_every_steps == 0
        return epoch_end and (epoch + 1) % tc.eval_every == 0

    def _validate_and_select(self, method: Method, phase: Phase, epoch: int, val_set: Any,
                             mid_epoch: bool) -> dict[str, Any]:
        """Score on validation and keep best.pt (mid-epoch: BN statistics averaged across ranks
        first, as they are at every epoch end)."""
        if mid_epoch:
            self.dist.average_norm_buffers_(method)
        val = self.validate(method, val_set)
        extra = method.after_validation()
        metric = val["acc"] if self.tc.select_metric == "val_acc" else -val["loss"]
        best, step = self._best, self.step
        if phase.select_best and (best["metric"] is None or metric > best["metric"]):
            self._best = {"metric": metric, "phase": phase.name, "epoch": epoch, "step": step}
            self._save_best(method, {"phase": phase.name, "epoch": epoch, "step": step, "metric": metric})
        return {**{f"val_{k}": v for k, v in {**val, **extra}.items()}, "val_step": step}

    def _state(self, phase_index: int, next_epoch: int, run: PhaseRun | None) -> dict[str, Any]:
        """``last.pt``'s training state: where to continue (phase, epoch), the run's counters and
        selection, the running phase's optimiser and schedule states (none at a phase boundary), RNG."""
        optims, scheds = (run.optims, run.scheds) if run is not None else ([], [])
        return {"phase_index": phase_index, "next_epoch": next_epoch, "step": self.step,
                "global_epoch": self.global_epoch, "best": self._best, "world_size": self.dist.world_size,
                "optimizers": [o.state_dict() for o in optims], "schedulers": [s.state_dict() for s in scheds],
                "rng_cpu": torch.get_rng_state(),
                **({"rng_cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}

    def validate(self, method: Method, val_set: Any) -> dict[str, float]:
        method.eval()
        loader = eval_loader(val_set, self.cfg.data.eval_batch_size, self.cfg.data.num_workers, self.dist.rank,
                             self.dist.world_size)
        n, correct, loss = 0.0, 0.0, 0.0
        if len(loader.sampler):  # a rank's shard is empty when the set is smaller than the world
            out = predict(method.eval_logits, loader, self.device, self.dtype, self.tc.channels_last)
            logits, labels = out["logits"], out["labels"]
            n, correct = float(len(labels)), (logits.argmax(1) == labels).sum().item()
            loss = nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        n, correct, loss = self.dist.sum([n, correct, loss], self.device)
        return {"acc": correct / max(n, 1), "loss": loss / max(n, 1)}


def synced_buffers(method: Method) -> list[torch.Tensor]:
    """Buffers rank 0 broadcasts at a phase start: all but those of frozen modules (teachers)."""
    frozen = {id(b) for m in method.frozen for b in m.buffers()}
    return [b for b in method.buffers() if id(b) not in frozen]
