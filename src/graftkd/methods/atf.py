"""Adaptive Teacher Finetune (ATF): offline KD whose pretrained teachers keep learning, from the
labels and from the student, while the student distils from them.

The ATF paper's text is not available; this is graftkd's definition (methods.md I.4). With
``p = softmax(Z(v) / T)`` (``Z`` the per-sample logit standardisation, switch ``standardize``)::

    student    L_S = ce_weight * CE(s, y) + kd_weight * T^2 * D(stopgrad(p_T) || p_S)
    teacher k  L_k = teacher_ce_weight * CE(z_k, y) + lam * T^2 * D(stopgrad(p_S) || p_k)
                     + mu * ||theta_k - theta_k0||^2

``D`` is the configured divergence (alpha fixed or adaptive, KL, alpha-beta). ``p_T`` is teacher
k's distribution when K = 1, else the fused target ``sum_k w_k p_k`` (``fusion`` section): global
strategies (mean, accuracy, best) use the accuracies of the teachers *before* adaptation, measured
once on validation when the method is built, so the weights stay fixed; per-sample strategies
(entropy, confidence) are computed live from the adapting teachers' current logits.

One phase, one optimiser for the student and one per teacher (lr = ratio * student lr, weight decay
``teacher_weight_decay``; ``adapt`` = all | last_stage | head says which teacher parameters train;
``guard`` stops a teacher's adaptation and rolls it back to its best validated state once its
validation accuracy drops by more than ``guard``, checked at every validation and, with
``guard_every``, every N teacher updates, see ``ATF.check_guard``; a head-adapting teacher with
``teacher_bn: eval`` is then scored from its cached pre-head validation features). The step
returns ``loss = L_S + sum_k L_k``; the stop-gradients make L_S reach only the student and L_k
only teacher k. A teacher *update step* is a step in epoch >= ``warmup_epochs`` (or, with
``warmup_steps``, a step of the phase >= ``warmup_steps``) with
``(step + 1) % teacher_every == 0`` (the steps on which the trainer steps its optimiser); only on
those steps does the teacher run with gradients (and, with ``teacher_bn: train``, in train mode).
On every other step it is a frozen eval-mode teacher without gradients, so its optimiser skips it
(``grad is None``: no momentum or weight-decay move) and its BN statistics do not change.

Modes (``method.mode``), one code path:

============= ====================== ====== ==== ========== ======== ===========
mode          teachers               CE_T   lam  mu         lr ratio warm-up
============= ====================== ====== ==== ========== ======== ===========
offline       pretrained, frozen     --     --   --         --       --
offline_joint pretrained, trained    yes    0    mu         lr_ratio warmup_epochs
atf           pretrained, trained    yes    lam  mu         lr_ratio warmup_epochs
online        random init (DML peer) yes    lam  0          peer_lr  0
============= ====================== ====== ==== ========== ======== ===========

Online peers are built from the teachers' architectures (checkpoints ignored), always run in train
mode on their (every-step) updates and see the data's normalisation.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field, model_validator
from torch import nn

from graftkd.config import DivergenceConfig, ExperimentConfig, MethodConfig, WarmupInSteps
from graftkd.data.loaders import predict_split
from graftkd.distributed import DistContext
from graftkd.errors import UserError
from graftkd.losses import divergences
from graftkd.losses.standardize import soft_targets
from graftkd.methods.base import (METHODS, UNLABELED, ExtraOutput, Method, OptimSpec, Phase, StepContext, labelled_acc,
                                  labelled_ce)
from graftkd.models import create_model
from graftkd.models.staged import StagedModel
from graftkd.teachers import fusion
from graftkd.teachers.ensemble import Teacher, load_teacher, stack_logits

log = logging.getLogger(__name__)

Predict = Callable[[Callable[[torch.Tensor], torch.Tensor]], dict[str, torch.Tensor]]


class ATFMethod(MethodConfig, WarmupInSteps):
    """Adaptive Teacher Finetune (our definition, methods.md I.4) and the modes it is compared with.

    Student: ``ce_weight*CE(s, y) + kd_weight*T^2*D(stopgrad(p_T) || p_S)``. Teacher k (own
    optimiser): ``teacher_ce_weight*CE(z_k, y) + lam*T^2*D(stopgrad(p_S) || p_k) + mu*||theta_k - theta_k0||^2``
    over the parameters ``adapt`` selects. The defaults were chosen on validation with full labels (issue 23,
    docs/methods/atf.md): the kd method's student loss (T 4, CE 0.1, KL 0.9), the teacher's classifier head
    adapting (eval-mode BN, lam 0.1) after a one-epoch warm-up, the collapse check on. The former defaults
    (standardised alpha-divergence, whole teacher) are the CIFAR-100 preset's.
    ``mode`` says which teacher terms are on: ``atf`` all of them; ``offline`` none (teachers frozen:
    plain KD with the same divergence); ``offline_joint`` CE + mu (lam is not used); ``online`` CE +
    lam with peers of the teachers' architectures from random init, trained from step 0 at
    ``peer_lr_ratio`` (DML-like; checkpoints, mu, warmup_epochs and teacher_bn are not used).
    """

    name: Literal["atf"] = "atf"
    mode: Literal["atf", "offline", "offline_joint", "online"] = "atf"
    temperature: float = Field(4.0, gt=0, description="T of every divergence term (the kd method's 4; the "
                                                      "logit-standardisation preset: 2)")
    standardize: bool = Field(False, description="Z-score logits per sample before /T in every divergence term "
                                                 "(the logit-standardisation preset: true)")
    ce_weight: float = Field(0.1, ge=0, description="student CE weight (the kd method's and the LS preset's 0.1)")
    kd_weight: float = Field(0.9, ge=0, description="student divergence weight (the kd method's 0.9; LS preset: 9)")
    divergence: DivergenceConfig = Field(DivergenceConfig(kind="kl"),
                                         description="D for the student and the teacher terms (the former default, "
                                                     "alpha 0.5 on standardised logits, is the CIFAR-100 preset's)")
    lam: float = Field(0.1, ge=0, description="weight of the teacher's divergence to the student (atf, online)")
    mu: float = Field(1e-3, ge=0, description="weight of ||theta_T - theta_T0||^2 over all teacher parameters "
                                               "(atf, offline_joint)")
    lr_ratio: float = Field(0.1, ge=0, description="teacher lr = ratio * student lr (atf, offline_joint)")
    peer_lr_ratio: float = Field(1.0, ge=0, description="mode online: peer lr = ratio * student lr "
                                                         "(DML trains peers like the student)")
    teacher_every: int = Field(1, ge=1, description="a teacher step every N optimiser steps (not online)")
    warmup_epochs: int = Field(1, ge=0, description="epochs of plain offline KD before the teachers adapt "
                                                    "(atf, offline_joint)")
    warmup_steps: int | None = Field(None, ge=1, description="the same warm-up in optimiser steps (then "
                                                             "warmup_epochs must be 0; it is, unless given)")
    teacher_bn: Literal["train", "eval"] = Field(
        "eval", description="mode of a pretrained teacher on its update steps: eval = running BN statistics used "
                            "and never changed, no dropout (the frozen-teacher forward); train = batch statistics, "
                            "running statistics updated, dropout on (use it with adapt=all: with eval, the whole "
                            "teacher adapting collapsed on digits, docs/methods/atf.md). Peers (online) always train")
    teacher_weight_decay: float = Field(0.0, ge=0, description="weight decay of the teacher optimisers (atf, "
                                                               "offline_joint; the student's optimizer.weight_decay "
                                                               "would pull the teacher towards 0, against the anchor)")
    teacher_ce_weight: float = Field(1.0, ge=0, description="weight of the teacher's CE to the labels (atf, "
                                                            "offline_joint); 0: the teacher learns from the "
                                                            "student's predictions and the anchor only")
    adapt: Literal["all", "last_stage", "head"] = Field(
        "head", description="which teacher parameters adapt (atf, offline_joint): all, the last stage and the "
                           "head, or the classifier head only (as DIST+'s acclimation)")
    guard: float | None = Field(None, ge=0, description="stop a teacher's adaptation, and roll it back to its best "
                                                        "validated state, once its validation accuracy falls more "
                                                        "than this below its accuracy before training; checked at "
                                                        "every validation (None: off)")
    guard_every: int | None = Field(None, ge=1, description="with guard: also check it every N teacher updates "
                                                            "(adapt=head with teacher_bn=eval: from cached "
                                                            "pre-head validation features, one head forward per "
                                                            "check; otherwise a full validation pass)")

    collapse_drop: float | None = Field(
        0.25, ge=0, le=1, description="collapse check (atf, offline_joint): stop a teacher's adaptation, and roll it "
                                      "back (to its best validated state with guard, else its pretrained weights), "
                                      "once its training accuracy over the last collapse_window updates falls more "
                                      "than this below its validation accuracy before training, or its logits are "
                                      "not finite; decided on the accuracy summed over all ranks (None: off)")
    collapse_window: int = Field(10, ge=1, description="teacher updates per collapse check")

    @model_validator(mode="after")
    def _guard_every_needs_guard(self) -> "ATFMethod":
        if self.guard_every is not None and self.guard is None:
            raise ValueError("method.guard_every is set but method.guard is not: guard_every says how often "
                             "the guard is checked; set method.guard (e.g. 0.01) or remove guard_every")
        return self


@dataclass(frozen=True)
class Effective:
    """The values a mode actually uses (recorded in metrics.json)."""

    lam: float
    mu: float
    lr_ratio: float
    teacher_every: int
    warmup_epochs: int
    teacher_bn: str
    warmup_steps: int | None = None
    teacher_weight_decay: float = 0.0
    teacher_ce_weight: float = 1.0
    adapt: str = "all"
    guard: float | None = None
    guard_every: int | None = None
    collapse_drop: float | None = None
    collapse_window: int = 10

    @staticmethod
    def of(m: ATFMethod, student_weight_decay: float = 0.0) -> "Effective":
        if m.mode == "offline":
            return Effective(0.0, 0.0, 0.0, 1, 0, "eval", None, 0.0, 0.0, "none", None, None)
        if m.mode == "online":  # peers train like the student, from scratch
            return Effective(m.lam, 0.0, m.peer_lr_ratio, 1, 0, "train", None, student_weight_decay, 1.0, "all",
                             None, None)
        lam = m.lam if m.mode == "atf" else 0.0
        return Effective(lam, m.mu, m.lr_ratio, m.teacher_every, m.warmup_epochs, m.teacher_bn, m.warmup_steps,
                         m.teacher_weight_decay, m.teacher_ce_weight, m.adapt, m.guard, m.guard_every,
                         m.collapse_drop, m.collapse_window)


def adapted_parameters(model: nn.Module, adapt: str, label: str = "teacher") -> list[nn.Parameter]:
    """The parameters of ``model`` that ``adapt`` (all | last_stage | head) trains: the head is the
    classifier after the last stage (``StagedModel``'s head, or timm's ``get_classifier()``)."""
    if adapt == "all":
        return list(model.parameters())
    try:
        view = StagedModel(model, label)
    except UserError:
        if adapt == "head" and hasattr(model, "get_classifier"):
            return list(model.get_classifier().parameters())
        raise UserError(f"method.adapt={adapt}: {label} ({type(model).__name__}) has no stage view; "
                        f"use adapt=all") from None
    modules = [m for _, m in view.named_head()]
    if adapt == "last_stage":
        modules[:0] = view.stage_modules(view.n_stages - 1)
    return [p for m in modules for p in m.parameters()]


class Snapshot(nn.Module):
    """A copy of a module's state (parameters and buffers) as persistent buffers: ``save`` and ``restore``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for i, v in enumerate(module.state_dict().values()):
            self.register_buffer(f"s{i}", v.detach().clone())

    @torch.no_grad()
    def save(self, module: nn.Module) -> None:
        for b, v in zip(self.buffers(), module.state_dict().values()):
            b.copy_(v)

    @torch.no_grad()
    def restore(self, module: nn.Module) -> None:
        for b, v in zip(self.buffers(), module.state_dict().values()):
            v.copy_(b)


class Anchor(nn.Module):
    """A fixed copy of a module's parameters (theta_0) as persistent buffers, in parameter order."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for i, p in enumerate(module.parameters()):
            self.register_buffer(f"p{i}", p.detach().clone())

    def squared_distance(self, module: nn.Module) -> torch.Tensor:
        """``||theta - theta_0||^2`` summed over every parameter (differentiable in theta)."""
        return torch.stack([(p.float() - p0.float()).square().sum()
                            for p, p0 in zip(module.parameters(), self.buffers())]).sum()

    @torch.no_grad()
    def relative_change(self, module: nn.Module) -> float:
        """``||theta - theta_0|| / ||theta_0||`` over all parameters."""
        ref = torch.stack([p0.float().square().sum() for p0 in self.buffers()]).sum()
        return float((self.squared_distance(module) / ref).sqrt())


class ATF(Method):
    """Student + K adapting teachers (see the module docstring). ``teachers`` are ``Teacher``
    wrappers (input re-normalisation + model); ``val_logits0`` [K, N, C] are their validation
    logits before training, ``val_labels`` [N]; ``predict_val(fn)`` runs ``fn`` over the
    validation split in the same order (the run's device and precision)."""

    def __init__(self, cfg: ExperimentConfig, student: nn.Module, teachers: Sequence[Teacher],
                 val_logits0: torch.Tensor, val_labels: torch.Tensor, predict_val: Predict,
                 dist: DistContext | None = None) -> None:
        super().__init__()
        m = cfg.method
        assert isinstance(m, ATFMethod)
        if m.mode == "online" and len(teachers) > 1 and cfg.fusion.strategy in ("accuracy", "best"):
            raise UserError(f"method.mode=online: peers start from random init, so fusion.strategy="
                            f"'{cfg.fusion.strategy}' (validation accuracy) has nothing to weigh; use mean, "
                            f"entropy or confidence")
        self.cfg, self.m, self.eff = cfg, m, Effective.of(m, cfg.optimizer.weight_decay)
        self.kind, self.params = divergences.divergence_spec(m.divergence)
        self.model = student
        self.teachers = nn.ModuleList(teachers)
        self.anchors = nn.ModuleList(Anchor(t.model) for t in teachers)
        self.predict_val = predict_val
        self.register_buffer("val_pred0", val_logits0.argmax(-1))  # [K, N]
        self.register_buffer("val_acc0", (self.val_pred0 == val_labels).float().mean(1))  # [K]
        for t in teachers:
            t.model.requires_grad_(False)
            if m.mode == "offline":
                self.frozen.append(t)
            else:
                for p in adapted_parameters(t.model, self.eff.adapt, t.name):
                    p.requires_grad_(True)
        # guard and collapse check: the state a stopped teacher is rolled back to (theta_0 at first; with
        # guard its best validated state), its accuracy, and whether its adaptation was stopped
        guarded = self.eff.guard is not None
        self.collapse_check = self.eff.collapse_drop is not None and m.mode in ("atf", "offline_joint")
        self.dist = dist or DistContext()
        rollback = guarded or self.collapse_check
        self.best_states = nn.ModuleList(Snapshot(t.model) for t in teachers) if rollback else None
        self.register_buffer("best_acc", self.val_acc0.clone())
        self.register_buffer("stopped", torch.zeros(len(teachers), dtype=torch.bool))
        self.register_buffer("stopped_at", torch.full((len(teachers),), -1, dtype=torch.long))
        # collapse check: this rank's correct predictions and samples of each teacher in the current window
        self.register_buffer("window", torch.zeros(len(teachers), 2, dtype=torch.float64))
        self.register_buffer("window_updates", torch.zeros((), dtype=torch.long))
        self.stop_reason: list[str | None] = [None] * len(teachers)
        self.end_state: dict[str, Any] | None = None  # the teachers at the last validation (see final_metrics)
        self.register_buffer("val_labels", val_labels.clone(), persistent=False)
        if guarded and self.eff.guard_every is not None:
            self.register_buffer("teacher_updates", torch.zeros((), dtype=torch.long))
        # head probes: a head-adapting eval-BN teacher is scored on validation from cached features
        self.probe_views: list[StagedModel | None] = []
        for k, t in enumerate(teachers):
            probe = head_probe(t, self.eff, predict_val) if guarded and m.mode != "offline" else None
            self.probe_views.append(None if probe is None else probe[0])
            self.register_buffer(f"val_features{k}", None if probe is None else probe[1], persistent=False)
        self._step = 0

    # ------------------------------------------------------------------------------- training
    def phases(self) -> list[Phase]:
        c = self.cfg
        specs = [OptimSpec(params=[{"params": list(self.model.parameters())}], optimizer=c.optimizer,
                           schedule=c.schedule, name="student")]
        if self.m.mode != "offline":
            specs += [OptimSpec(params=[{"params": list(t.model.parameters()), "lr_scale": self.eff.lr_ratio,
                                         "weight_decay": self.eff.teacher_weight_decay}],
                                optimizer=c.optimizer, schedule=c.schedule, name=f"teacher{k}",
                                every=self.eff.teacher_every)
                      for k, t in enumerate(self.teachers)]
        return [Phase(name="train", epochs=c.trainer.epochs, steps=c.trainer.steps, optimizers=specs)]

    def updates_teachers(self, ctx: StepContext) -> bool:
        """Whether this step is a teacher update step (see the module docstring)."""
        warm = ctx.phase_step >= self.eff.warmup_steps if self.eff.warmup_steps else ctx.epoch >= self.eff.warmup_epochs
        return (self.m.mode != "offline" and warm
                and (ctx.step + 1) % self.eff.teacher_every == 0)

    def div(self, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Batch mean of ``T^2 * D(target || softmax(Z(logits) / T))``."""
        return divergences.divergence(self.kind, target, logits, self.m.temperature,
                                      standardize=self.m.standardize, **self.params).mean()

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"]
        m, T = self.m, self.m.temperature
        update = self.updates_teachers(ctx)
        self._step = ctx.step
        if update and self.eff.guard_every is not None:  # (guard_every needs guard)
            n = int(self.teacher_updates)
            if n > 0 and n % self.eff.guard_every == 0 and not bool(self.stopped.all()):
                self.check_guard(self.teacher_val_accuracy())
            self.teacher_updates += 1
        live = [update and not bool(done) for done in self.stopped]  # teachers adapting on this step
        z = self.teacher_logits(x, live)  # [K, B, C]
        if any(live) and self.collapse_check and self.training:
            if self.watch_collapse(z.detach(), y, live):  # a teacher was stopped and rolled back
                live = [update and not bool(done) for done in self.stopped]
                z = self.teacher_logits(x, live)
        s = self.model(x).float()
        zt = z.detach()
        w = fusion.weights(self.cfg.fusion.strategy, zt, y, self.val_acc0, self.cfg.fusion.tau)
        target = fusion.fuse(zt, w, T, m.standardize)
        ce = labelled_ce(s, y)
        kd = self.div(target, s)
        student_loss = m.ce_weight * ce + m.kd_weight * kd
        out = {"ce": ce, "kd": kd, "student_loss": student_loss, "acc": labelled_acc(s, y)}
        if m.mode == "offline":
            return {"loss": student_loss, **out}
        k, b, c = z.shape
        with torch.set_grad_enabled(update):
            t_ce = labelled_ce(z.reshape(k * b, c), y.repeat(k)) * k  # sum over teachers, labelled images only
            teacher_loss = self.eff.teacher_ce_weight * t_ce
            out["teacher_ce"] = t_ce
            if m.mode != "offline_joint":
                p_s = soft_targets(s.detach(), T, m.standardize).repeat(k, 1)
                t_kd = self.div(p_s, z.reshape(k * b, c)) * k
                teacher_loss = teacher_loss + self.eff.lam * t_kd
                out["teacher_kd"] = t_kd
            if m.mode != "online":
                drift = []
                for a, t, on in zip(self.anchors, self.teachers, live):
                    with torch.set_grad_enabled(on):  # a stopped teacher does not move, not even to theta_0
                        drift.append(a.squared_distance(t.model))
                drift = torch.stack(drift).sum()
                teacher_loss = teacher_loss + self.eff.mu * drift
                out["teacher_drift"] = drift
        out["teacher_loss"] = teacher_loss
        out["teacher_acc"] = labelled_acc(zt.flatten(0, 1), y.repeat(k))
        return {"loss": student_loss + teacher_loss if update else student_loss, **out}

    def uses_unlabeled(self) -> bool:
        return True  # the student's divergence and the teachers' term to the student need no label

    def teacher_logits(self, x: torch.Tensor, live: list[bool]) -> torch.Tensor:
        """[K, B, C] float32 logits of the teachers; the ``live`` ones with gradients (and, with
        ``teacher_bn: train``, in train mode)."""
        if self.eff.teacher_bn == "train":
            for t, on in zip(self.teachers, live):
                t.model.train(on and self.training)
        zs = []
        for t, on in zip(self.teachers, live):
            with torch.set_grad_enabled(on):
                zs.append(t(x).float())
        return torch.stack(zs)

    @torch.no_grad()
    def watch_collapse(self, z: torch.Tensor, y: torch.Tensor, live: list[bool]) -> bool:
        """The collapse check on an update step, given the teachers' logits ``z`` [K, B, C] (before
        this step's update): count each live teacher's correct predictions; every ``collapse_window``
        updates (and at once if a teacher's logits are not finite) sum the counts over ranks and stop
        every teacher whose window accuracy is more than ``collapse_drop`` below its validation
        accuracy before training. Returns whether a teacher was stopped."""
        finite = torch.isfinite(z).flatten(1).all(1)  # [K]
        on = torch.tensor(live, device=z.device)
        known = y != UNLABELED  # unlabelled images (data.unlabeled) have no accuracy
        self.window[:, 0] += (((z.argmax(-1) == y) & known).sum(1) * on).double()
        self.window[:, 1] += on.double() * int(known.sum())
        self.window_updates += 1
        bad = (~finite & on).double()
        due = int(self.window_updates) % self.eff.collapse_window == 0
        if self.dist.enabled:  # one decision for every rank: counts and flags summed over ranks
            flags = self.dist.sum(bad.tolist(), z.device)
            bad = torch.tensor(flags, device=z.device)
        if not due and not bool(bad.any()):
            return False
        counts = self.window.clone()
        if due and self.dist.enabled:
            counts = torch.tensor(self.dist.sum(counts.flatten().tolist(), z.device),
                                  dtype=torch.float64, device=z.device).view_as(counts)
        stop = []
        for k in range(len(self.teachers)):
            if not live[k]:
                continue
            if bad[k] > 0:
                stop.append((k, "its logits were not finite"))
            elif due and counts[k, 1] > 0:
                acc = float(counts[k, 0] / counts[k, 1])
                floor = float(self.val_acc0[k]) - self.eff.collapse_drop
                if acc < floor:
                    stop.append((k, f"its training accuracy over the last {int(counts[k, 1])} samples was "
                                    f"{acc:.3f}, below {floor:.3f} (validation accuracy before training "
                                    f"{float(self.val_acc0[k]):.3f} - collapse_drop {self.eff.collapse_drop})"))
        if due:
            self.window.zero_()
        for k, reason in stop:
            self.stop_teacher(k, f"collapse check: {reason}")
        return bool(stop)

    @torch.no_grad()
    def stop_teacher(self, k: int, reason: str) -> None:
        """Stop teacher k's adaptation and roll it back to its best state (rank 0's on every rank);
        one log line."""
        t = self.teachers[k]
        self.best_states[k].restore(t.model)
        self.dist.broadcast_(list(t.model.state_dict().values()))
        self.stopped[k] = True
        self.stopped_at[k] = self._step
        target = "its best validated state" if self.eff.guard is not None else "its pretrained weights"
        self.stop_reason[k] = f"{reason}; rolled back to {target}"
        if self.dist.is_main:
            log.warning("atf: teacher %d (%s) stopped adapting at step %d: %s", k, t.name, self._step,
                        self.stop_reason[k])

    @torch.no_grad()
    def after_validation(self) -> dict[str, float]:
        """Records the teachers' state (the last call is the end of training; see ``final_metrics``);
        with ``guard``: ``check_guard`` on the teachers' validation accuracy (rank 0's on every rank).
        Returns those accuracies for the log."""
        if self.m.mode == "offline":
            return {}
        log_row = {}
        if self.eff.guard is not None:
            log_row = self.check_guard(self.teacher_val_accuracy())
        self.end_state = {"teachers": [{k: v.detach().clone() for k, v in t.model.state_dict().items()}
                                       for t in self.teachers],
                          "step": self._step + 1, "stopped": self.stopped.tolist(),
                          "stopped_at": self.stopped_at.tolist(), "reason": list(self.stop_reason)}
        return log_row

    @torch.no_grad()
    def teacher_val_accuracy(self) -> torch.Tensor:
        """[K] the teachers' current validation accuracy: from the cached features through the head
        where a head probe applies, else one validation pass (in eval mode)."""
        logits: list[torch.Tensor | None] = []
        for k, view in enumerate(self.probe_views):
            if view is None:
                logits.append(None)
                continue
            feats = getattr(self, f"val_features{k}")
            with torch.autocast(feats.device.type, enabled=False):
                logits.append(view.head(feats).float())
        if any(z is None for z in logits):
            for t in self.teachers:
                t.eval()
            full = self.predict_val(lambda x: stack_logits(self.teachers, x, 1))["logits"]  # [N, K, C]
            logits = [full[:, k] if z is None else z for k, z in enumerate(logits)]
        labels = self.val_labels
        return torch.stack([(z.argmax(-1).to(labels.device) == labels).float().mean() for z in logits])

    @torch.no_grad()
    def check_guard(self, acc: torch.Tensor) -> dict[str, float]:
        """Given the teachers' validation accuracy ``acc`` [K]: keep each one's best state; stop a
        teacher whose accuracy fell more than ``guard`` below its accuracy before training and roll
        it back to its best state."""
        self.dist.broadcast_([acc])  # rank 0's accuracies decide on every rank
        row = {}
        for k, t in enumerate(self.teachers):
            row[f"teacher{k}_acc"] = float(acc[k])
            if self.stopped[k]:
                continue
            if acc[k] >= self.best_acc[k]:
                self.best_acc[k] = acc[k]
                self.best_states[k].save(t.model)
            elif acc[k] < self.val_acc0[k] - self.eff.guard:
                self.stop_teacher(k, f"guard: validation accuracy {float(acc[k]):.3f} fell more than "
                                     f"{self.eff.guard} below {float(self.val_acc0[k]):.3f}")
        return row

    # -------------------------------------------------------------------------------- outputs
    def student(self) -> nn.Module:
        return self.model

    def extra_outputs(self) -> dict[str, ExtraOutput]:
        """The adapted teachers (``teacher_adapted`` or ``teacher_adapted_<k>``); none when offline."""
        if self.m.mode == "offline":
            return {}
        out = {}
        for k, t in enumerate(self.teachers):
            name = "teacher_adapted" if len(self.teachers) == 1 else f"teacher_adapted_{k}"
            out[name] = ExtraOutput(t.model, t.name, t.mean, t.std)
        return out

    def final_metrics(self, score: Callable[[Callable[[torch.Tensor], torch.Tensor], str], dict[str, Any]]
                      ) -> dict[str, Any]:
        """Per teacher, measured on the weights it had at the end of training (its state at the last
        validation, after the last step; a stopped teacher's is the state it was rolled back to):
        relative weight change ``||theta - theta_0|| / ||theta_0||``, val/test metrics, validation
        accuracy before/after, agreement of the exported student's validation predictions with the
        teacher before (theta_0) and after. ``selected_checkpoint``: the same for the teacher of the
        student's best-validation checkpoint (best.pt holds the whole method), which is the one in
        ``teacher_adapted*.pt``."""
        selected = self.report_rows()
        end = self.end_state
        if end is not None:  # the trainer restored best.pt: measure the end state, then put it back
            kept = [{k: v.clone() for k, v in t.model.state_dict().items()} for t in self.teachers]
            for t, st in zip(self.teachers, end["teachers"]):
                t.model.load_state_dict(st)
        rows = self.report_rows()
        for k, (row, sel, t) in enumerate(zip(rows, selected, self.teachers)):
            stopped = bool(end["stopped"][k]) if end is not None else bool(self.stopped[k])
            at = end["stopped_at"][k] if end is not None else int(self.stopped_at[k])
            reason = end["reason"][k] if end is not None else self.stop_reason[k]
            row["weights"] = (f"rolled back at step {at}" if stopped else
                              f"end of training (after step {end['step']})" if end is not None else
                              "selected checkpoint (no validation was recorded)")
            row["val"], row["test"] = score(t, "val"), score(t, "test")
            if self.best_states is not None:
                row["stop"] = {"stopped": stopped, "stopped_at_step": at if stopped else None, "reason": reason}
            if self.eff.guard is not None:
                row["guard"] = {"best_val_acc": float(self.best_acc[k]),
                                "scored_from": "cached head features" if self.probe_views[k] is not None
                                else "validation pass"}
            row["selected_checkpoint"] = {key: sel[key] for key in
                                          ("relative_weight_change", "val_acc_after", "agreement_after")}
        if end is not None:
            for t, st in zip(self.teachers, kept):
                t.model.load_state_dict(st)
        return {"atf": {"mode": self.m.mode, "effective": asdict(self.eff), "fusion": self.cfg.fusion.strategy,
                        "teachers": rows}}

    @torch.no_grad()
    def report_rows(self) -> list[dict[str, Any]]:
        """Per teacher, on its current weights: name, source, relative weight change, validation
        accuracy before/after and agreement with the student before/after."""
        out = self.predict_val(lambda x: stack_logits([self.model, *self.teachers], x, 1))
        pred = out["logits"].argmax(-1).T.to(self.val_pred0.device)  # [1 + K, N]
        labels = out["labels"].to(pred.device)
        rows = []
        for k, t in enumerate(self.teachers):
            acc0, acc1 = float(self.val_acc0[k]), float((pred[1 + k] == labels).float().mean())
            rows.append({
                "name": t.name, "source": t.source,
                "relative_weight_change": self.anchors[k].relative_change(t.model),
                "val_acc_before": acc0, "val_acc_after": acc1, "val_acc_change": acc1 - acc0,
                "agreement_before": float((pred[0] == self.val_pred0[k]).float().mean()),
                "agreement_after": float((pred[0] == pred[1 + k]).float().mean()),
            })
        return rows


def head_probe(t: Teacher, eff: Effective, predict_val: Predict) -> tuple[StagedModel, torch.Tensor] | None:
    """For a teacher that adapts only its head and keeps eval-mode BN, everything before the head is
    frozen, so its validation features never change: its stage view and those features [N, ...]
    (then a validation score is one head forward). None when the teacher does not qualify."""
    if eff.adapt != "head" or eff.teacher_bn != "eval":
        return None
    try:
        view = StagedModel(t.model, t.name)
    except UserError:
        return None
    t.eval()
    with torch.no_grad():
        return view, predict_val(lambda x: view.features(t.renormalised(x)))["logits"]


def online_peer(cfg_name: str, kwargs: dict[str, Any], num_classes: int, mean: Sequence[float],
                std: Sequence[float]) -> Teacher:
    """A randomly initialised peer of the given architecture that sees the data's normalisation."""
    model = create_model(cfg_name, num_classes=num_classes, **kwargs)
    return Teacher(model, cfg_name, "random init (online peer)", tuple(mean), tuple(std), tuple(mean), tuple(std))


@METHODS.register("atf", config=ATFMethod)
def build_atf(cfg: ExperimentConfig, data: Any, build_student: Callable[[], nn.Module], device: torch.device,
              dist: DistContext | None = None, **_: Any) -> ATF:
    """ATF (or one of its comparison modes) for ``cfg.method.mode``; measures the teachers on
    validation once, before any training."""
    m = cfg.method
    assert isinstance(m, ATFMethod)
    if not cfg.teachers:
        raise UserError("method 'atf' needs teachers: add a `teachers:` list to the config")
    if cfg.teacher_cache.enabled:
        raise UserError("teacher_cache.enabled = true, but ATF adapts its teachers during training, so their "
                        "targets cannot be precomputed; set teacher_cache.enabled=false")
    if len(data.val) == 0:
        raise UserError("method 'atf' measures the teachers before and after on validation, and it is empty")
    student = build_student()
    if m.mode == "online":
        teachers = [online_peer(t.name, t.kwargs, data.num_classes, data.mean, data.std) for t in cfg.teachers]
    else:
        teachers = [load_teacher(t, i, list(data.classes), tuple(data.mean), tuple(data.std))
                    for i, t in enumerate(cfg.teachers)]

    def predict_val(fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        return predict_split(fn, data.val, cfg, device)

    for t in teachers:
        t.to(device).eval()
    before = predict_val(lambda x: stack_logits(teachers, x, 1))
    return ATF(cfg, student, teachers, before["logits"].transpose(0, 1), before["labels"], predict_val, dist)
