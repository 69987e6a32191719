"""Dual-stage progressive network grafting (NetGraft) with multi-teacher soft targets (methods.md I.3).

Host (one frozen teacher, by default the best on validation) and student are seen through their
stage views (``graftkd.models.staged``). Grafting is a list of named :class:`Unit` s (``plan_units``):
the segments between the boundaries both networks share (equal spatial size, i.e. the reductions
both have), the first starting at the image (so the student's stem is a unit like any other) and
the last ending in the head. Each unit holds student segments, the host segments it replaces and
the boundary it ends at; where the widths at that boundary differ, a 1x1 bridge ``s2t_u`` feeds
the host from student unit u and ``t2s_{u+1}`` feeds student unit u+1 from the host.

- Stage 1, one phase per unit u: hybrid = host with unit u replaced by ``t2s_u -> S_u -> s2t_u``;
  only that unit and its bridges train; the weights of the last epoch are kept.
- Stage 2, one phase per i = 2..U: units 1..i chained in place of the host's; all of them train;
  the last phase (whole student) keeps its best-validation epoch.
- Loss: ``host`` NetGraft normalised-logit MSE to the host logits; ``fused`` the same loss to the
  fused multi-teacher logit vector (``fused_loss: nlmse``, default; ``fusion.fuse_logits``, default the
  weighted mean of the teachers' normalised logits) or T^2 KL
  to the fused probabilities (``fused_loss: kl``); ``label`` CE; a stage may have its own target;
  plus ``kd_weight`` * fused KL and ``ce_weight`` * CE. On real digits the KL form lost to the host
  target and the normalised-logit form beat it (docs/methods/graft.md).
- Lengths: stage epochs, or one ``trainer.steps`` budget split by ``stage1_share``.
- ``shared_units``: leading units copied from the host and never trained (NetGraft's VGG16).

``student()`` folds every bridge pair into the student's own layers where exact (the next block's
first convs and projection shortcut, or the head's Linear): the exported network is the plain
student architecture unless a boundary has no such consumer (identity shortcut, depthwise conv,
norm first), where a 1x1 junction stays (``GraftedStudent``, ``graft:<student>``).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Iterator, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from graftkd.config import ExperimentConfig, MethodConfig, OptimizerConfig, ScheduleConfig, Strict
from graftkd.errors import UserError
from graftkd.losses import kd_loss_from_probs, normalized_logit_mse
from graftkd.methods.base import METHODS, Method, OptimSpec, Phase, StepContext, labelled_acc, labelled_ce
from graftkd.models import count_params
from graftkd.models.staged import (
    GRAFT_PREFIX,
    GraftedStudent,
    StagedModel,
    compose_1x1,
    fold_into_convs,
    fold_into_linear,
    make_bridge,
)
from graftkd.teachers.targets import Score, TeacherTargets, build_teacher_targets, teachers_report

log = logging.getLogger(__name__)


class GraftStageOptim(Strict):
    """Adam of grafting stage 1, block-wise (NetGraft CIFAR-10 defaults: a fresh Adam per unit,
    constant lr, the weights of the last epoch handed on)."""

    epochs: list[Annotated[int, Field(ge=1)]] | None = Field(
        [100, 60, 60], min_length=1, description="epochs per unit (stages, then the head); the last value repeats. "
                                                 "Not with trainer.steps (method.stage1_share splits those instead)")
    lr: list[Annotated[float, Field(gt=0)]] = Field(
        [2.5e-4], min_length=1, description="Adam lr of the student modules per unit; the last value repeats")
    bridge_lr: float = Field(2.5e-3, gt=0, description="Adam lr of the 1x1 bridges")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas (PyTorch defaults, as NetGraft)")
    scale_lr_with_shots: bool = Field(True, description="with method.scale_with_shots, multiply these lrs by N/10")
    target: Literal["host", "fused", "label"] | None = Field(
        None, description="the target of this stage's phases; None: method.target")


class GraftStage2Optim(GraftStageOptim):
    """Adam of grafting stage 2, progressive (NetGraft: lr 1e-4 for every parameter, not scaled with
    N; the final step keeps its best-validation epoch)."""

    epochs: list[Annotated[int, Field(ge=1)]] | None = Field(
        [100, 100], min_length=1, description="epochs per progressive step (units 1..i, i = 2..n); the last repeats. "
                                              "Not with trainer.steps")
    lr: list[Annotated[float, Field(gt=0)]] = Field([1e-4], min_length=1, description="Adam lr per step; the last repeats")
    bridge_lr: float = Field(1e-4, gt=0, description="Adam lr of the 1x1 bridges")
    scale_lr_with_shots: bool = Field(False, description="with method.scale_with_shots, multiply these lrs by N/10")


class GraftMethod(MethodConfig):
    """Dual-stage progressive network grafting (methods.md I.3): student units grafted into a frozen
    host teacher one by one (stage 1), then progressively chained (stage 2), then bridges folded."""

    name: Literal["graft"] = "graft"

    @classmethod
    def with_run_steps(cls, section: dict) -> dict:
        """With ``trainer.steps`` the stage lengths come from the budget: the stage epochs' defaults are
        cleared (null), epochs given explicitly stay and are refused by the factory."""
        out = dict(section)
        for key in ("stage1", "stage2"):
            stage = out.get(key, {})
            if isinstance(stage, dict) and "epochs" not in stage:
                out[key] = {**stage, "epochs": None}
        return out
    target: Literal["host", "fused", "label"] = Field(
        "fused", description="host: NetGraft normalised-logit MSE to the host's logits; fused: the fused "
                             "multi-teacher target (`fusion`), matched as `fused_loss` says; label: cross-entropy (ablation)")
    host: int | None = Field(None, ge=0, description="index into `teachers` of the host; None: the best on validation "
                                                 "that the student can be grafted into")
    temperature: float = Field(4.0, gt=0, description="temperature of the fused target (target=fused)")
    fused_loss: Literal["nlmse", "kl"] = Field(
        "nlmse", description="how the fused target is matched: nlmse: NetGraft's normalised-logit MSE to the fused "
                          "logits (`fused_logits`); kl: T^2 KL to the fused probabilities")
    fused_logits: Literal["normalized_mean", "mean", "log_probs"] = Field(
        "normalized_mean", description="fused logit vector for fused_loss=nlmse: normalized_mean: sum_k w_k z_k/||z_k||; "
                                       "mean: sum_k w_k z_k; log_probs: T log of the fused probabilities, centred")
    kd_weight: float = Field(0.0, ge=0, description="weight of an extra T^2 KL term to the fused probabilities")
    ce_weight: float = Field(0.0, ge=0, description="weight of an extra CE term to the labels (host/fused)")
    shared_units: int = Field(0, ge=0, description="leading units (the stem is unit 0 when the network has one) "
                                                   "copied from the host into the student and never grafted "
                                                   "(NetGraft VGG16: 3)")
    init_from_teacher: bool = Field(True, description="initialise grafted student tensors from the host's "
                                                      "where name and shape match")
    scale_with_shots: bool = Field(True, description="NetGraft rule with data.shots = N: batch = "
                                                     "int(data.batch_size * N/10), lrs x N/10 (see scale_lr_with_shots)")
    stage1_share: float = Field(0.5, gt=0, lt=1, description="with trainer.steps: the share of the run's optimiser "
                                                             "steps given to stage 1, split evenly over its phases; "
                                                             "stage 2 splits the rest evenly")
    stage1: GraftStageOptim = Field(GraftStageOptim(), description="block-wise grafting, one phase per unit")
    stage2: GraftStage2Optim = Field(GraftStage2Optim(), description="progressive grafting, units 1..i together")


@dataclass(frozen=True)
class UnitPlan:
    """What a phase grafts: units ``lo <= u < hi`` are in the hybrid, ``train`` are optimised."""

    lo: int
    hi: int  # units lo <= u < hi are the student's in the hybrid
    train: tuple[int, ...]
    target: str = "host"


def shot_scaling(shots: int | None, enabled: bool, batch_size: int) -> tuple[float, int]:
    """NetGraft's N-shot rule: ``(N/10, int(batch_size * N/10))`` (batch at least 1); ``(1, batch_size)``
    without few-shot data or when disabled."""
    if not enabled or shots is None:
        return 1.0, batch_size
    factor = shots / 10
    return factor, max(1, int(batch_size * factor))


def stage_targets(opts: GraftMethod) -> tuple[str, str]:
    """The targets of stage 1 and stage 2."""
    return opts.stage1.target or opts.target, opts.stage2.target or opts.target


def uses_fused_probs(opts: GraftMethod) -> bool:
    """Whether a phase reads the fused probabilities (the only targets the soft-target cache stores)."""
    return opts.kd_weight > 0 or (opts.fused_loss == "kl" and "fused" in stage_targets(opts))


def split_steps(total: int, parts: int) -> list[int]:
    """``total`` steps in ``parts`` near-equal whole parts summing to ``total``; the later parts get the
    remainder (the final, selected phase is never the shorter one)."""
    q, r = divmod(total, parts)
    return [q + (i >= parts - r) for i in range(parts)]


def phase_steps(steps: int, stage1_share: float, n_units: int) -> tuple[list[int], list[int]]:
    """Optimiser steps of the stage-1 phases (one per unit) and the stage-2 phases (n_units - 1): stage 1
    gets ``round(steps * stage1_share)`` (all of them when there is no stage 2), stage 2 the rest; each
    phase at least one step (UserError if ``steps`` cannot give that)."""
    n2 = n_units - 1
    s1 = steps if n2 == 0 else round(steps * stage1_share)
    if s1 < n_units or steps - s1 < n2:
        raise UserError(f"trainer.steps = {steps} with method.stage1_share = {stage1_share} gives stage 1 {s1} steps "
                        f"for {n_units} phases and stage 2 {steps - s1} for {n2}: every phase needs at least one step")
    return split_steps(s1, n_units), split_steps(steps - s1, n2) if n2 else []


def _per_unit(values: list, i: int) -> Any:
    return values[min(i, len(values) - 1)]


@dataclass
class Unit:
    """One graft unit: the student's segments and the host's segments it replaces (indices into each
    view), from the input or a boundary both networks share up to the next one (or the logits when
    ``head``). ``boundary``: (host, student) boundary index at the unit's output; None for the head."""

    name: str
    student: tuple[int, ...]
    host: tuple[int, ...]
    head: bool
    boundary: tuple[int, int] | None


def shared_boundaries(host: list[tuple[int, int, int]], student: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """(host, student) boundary pairs of equal spatial size: the k-th boundary of a size in one network
    with the k-th of that size in the other (so boundaries both networks have at a reduction pair up)."""
    pairs = []
    for size in dict.fromkeys(s[1:] for s in host):
        hs = [i for i, s in enumerate(host) if s[1:] == size]
        ss = [i for i, s in enumerate(student) if s[1:] == size]
        pairs += list(zip(hs, ss))
    pairs.sort()
    if [s for _, s in pairs] != sorted(s for _, s in pairs):
        raise UserError("grafting needs boundaries of the same spatial size in the same order in both networks")
    return pairs


def plan_units(H: StagedModel, S: StagedModel, input_size: int) -> list[Unit]:
    """The units of grafting ``S`` into ``H``: segments between the boundaries both share, then the head."""
    hs, ss = H.boundary_shapes(input_size), S.boundary_shapes(input_size)
    pairs = shared_boundaries(hs, ss)
    if not pairs:
        raise UserError(f"grafting needs at least one stage boundary of the same spatial size in both networks; at "
                        f"{input_size} px {H.label} has {[s[1:] for s in hs]} (H, W), {S.label} {[s[1:] for s in ss]}")
    units, h0, s0 = [], 0, 0
    for h, s in pairs + [(H.n_stages - 1, S.n_stages - 1)]:
        head = len(units) == len(pairs)
        student = tuple(range(s0, s + 1)) if not head else tuple(range(s0, S.n_stages))
        host = tuple(range(h0, h + 1)) if not head else tuple(range(h0, H.n_stages))
        names = [S.stage_names[i] for i in student] + (["head"] if head else [])
        units.append(Unit("+".join(names), student, host, head, None if head else (h, s)))
        h0, s0 = h + 1, s + 1
    return units


class Graft(Method):
    """Grafts ``student``'s units into the host ``targets.ensemble.teachers[host_index]``."""

    def __init__(self, opts: GraftMethod, targets: TeacherTargets, host_index: int, student: nn.Module, *,
                 student_name: str, input_size: int, batch_size: int, shots: int | None,
                 steps: int | None = None) -> None:
        super().__init__()
        self.opts = opts
        self.targets = targets
        self.host_index = host_index
        self.net = student
        self.input_size = input_size
        if targets.temperature != opts.temperature:
            raise ValueError(f"targets built at T = {targets.temperature}, method.temperature = {opts.temperature}")
        host_teacher = targets.ensemble.teachers[host_index]
        if host_teacher.renormalise:
            raise UserError(f"graft host teacher {host_index} ({host_teacher.name}) expects inputs normalised with "
                            f"mean {host_teacher.mean} std {host_teacher.std}, not the data's; set data.mean/data.std "
                            f"to those values, since the hybrid feeds the host's modules the student's features")
        self.H = StagedModel(host_teacher.model, f"host teacher {host_index} ({host_teacher.name})")
        self.S = StagedModel(student, f"student ({student_name})")
        self.units = plan_units(self.H, self.S, input_size)
        self.n_units = len(self.units)
        if opts.shared_units >= self.n_units:
            raise UserError(f"method.shared_units = {opts.shared_units} but grafting {self.S.label} into {self.H.label} "
                            f"has only {self.n_units} units ({', '.join(u.name for u in self.units)})")
        self.k = opts.shared_units
        self.shared_modules = self._copy_shared_units()
        # bridges at every shared boundary whose widths differ; bias-free where the map folds into a conv
        self.t2s, self.s2t = nn.ModuleDict(), nn.ModuleDict()
        self.junction_boundaries: list[int] = []
        for u, unit in enumerate(self.units[:-1]):
            h, s = unit.boundary  # type: ignore[misc]
            ch, cs = self.H.channels[h], self.S.channels[s]
            if ch == cs:
                continue
            consumer = self.S.consumer(s)
            bias = consumer is None or consumer.takes_bias
            self.s2t[str(u)] = make_bridge(cs, ch, bias)
            self.t2s[str(u + 1)] = make_bridge(ch, cs, bias)
            if consumer is None:
                self.junction_boundaries.append(s)
        self.copied = self._init_from_host() if opts.init_from_teacher else 0
        self.exported_arch = GRAFT_PREFIX + student_name if self.junction_boundaries else student_name
        targets.requires_grad_(False)
        for m in self.shared_modules:
            m.requires_grad_(False)
        self.frozen = [targets, *self.shared_modules]
        self.factor, self.batch_size = shot_scaling(shots, opts.scale_with_shots, batch_size)
        self.steps = steps
        self._phases, self._plan = self._build_phases()
        self.active = UnitPlan(self.k, self.n_units, ())
        log.info("graft: %s", self.describe())

    # ------------------------------------------------------------------------------------ units
    def student_modules(self, u: int) -> list[tuple[str, nn.Module]]:
        """(name, module) of the student's unit u (without bridges)."""
        unit = self.units[u]
        mods = [nm for i in unit.student for nm in self.S.segments[i].modules]
        return mods + (list(self.S.named_head()) if unit.head else [])

    def host_modules(self, u: int) -> list[tuple[str, nn.Module]]:
        unit = self.units[u]
        mods = [nm for i in unit.host for nm in self.H.segments[i].modules]
        return mods + (list(self.H.named_head()) if unit.head else [])

    def unit_name(self, u: int) -> str:
        return self.units[u].name

    def unit_modules(self, u: int) -> list[nn.Module]:
        return [m for _, m in self.student_modules(u)]

    def unit_bridges(self, u: int) -> list[nn.Module]:
        return [d[str(u)] for d in (self.t2s, self.s2t) if str(u) in d]

    @torch.no_grad()
    def _copy_shared_units(self) -> list[nn.Module]:
        """Copy the host's first ``shared_units`` units into the student; their tensors must match."""
        out = []
        for u in range(self.k):
            host = dict(self.host_modules(u))
            for name, module in self.student_modules(u):
                src = host.get(name)
                ours, theirs = module.state_dict(), src.state_dict() if src is not None else {}
                bad = sorted(key for key in set(ours) | set(theirs)
                             if key not in ours or key not in theirs or ours[key].shape != theirs[key].shape)
                if bad or (src is None and not ours):
                    key = bad[0] if bad else ""
                    raise UserError(
                        f"method.shared_units = {self.k}: the student keeps the host's unit '{self.unit_name(u)}', so "
                        f"'{name}' must have the same tensors in both: '{name}.{key}' is "
                        f"{tuple(theirs[key].shape) if key in theirs else 'missing'} in {self.H.label} and "
                        f"{tuple(ours[key].shape) if key in ours else 'missing'} in {self.S.label}")
                module.load_state_dict(theirs)
                out.append(module)
        return out

    @torch.no_grad()
    def _init_from_host(self) -> int:
        """Copy host tensors into the grafted units where module name, key and shape match; returns how many."""
        copied = 0
        for u in range(self.k, self.n_units):
            host = dict(self.host_modules(u))
            for name, module in self.student_modules(u):
                theirs = host[name].state_dict() if name in host else {}
                for key, value in module.state_dict().items():
                    if key in theirs and theirs[key].shape == value.shape:
                        value.copy_(theirs[key])
                        copied += 1
        return copied

    def _stage_optim(self, stage: GraftStageOptim, index: int, units: tuple[int, ...]) -> OptimSpec:
        scale = self.factor if stage.scale_lr_with_shots else 1.0
        lr = _per_unit(stage.lr, index) * scale
        modules = [p for u in units for m in self.unit_modules(u) for p in m.parameters()]
        bridges = [p for u in units for m in self.unit_bridges(u) for p in m.parameters()]
        groups = [{"params": modules}] + ([{"params": bridges, "lr_scale": stage.bridge_lr * scale / lr}] if bridges else [])
        return OptimSpec(params=groups, optimizer=OptimizerConfig(name="adam", lr=lr, betas=stage.betas,
                                                                  weight_decay=stage.weight_decay),
                         schedule=ScheduleConfig(name="constant"))

    def _build_phases(self) -> tuple[list[Phase], dict[str, UnitPlan]]:
        """Stage 1 then stage 2 over the grafted units ``k..U-1``; lengths in epochs (``stage<k>.epochs``)
        or, with a run budget in optimiser steps, in steps (``phase_steps``)."""
        s1, s2 = self.opts.stage1, self.opts.stage2
        grafted = list(range(self.k, self.n_units))
        if self.steps is not None:
            steps1, steps2 = phase_steps(self.steps, self.opts.stage1_share, len(grafted))
        else:
            steps1, steps2 = [], []
            for k, stage in ((1, s1), (2, s2)):
                if stage.epochs is None:
                    raise UserError(f"method.stage{k}.epochs is null: give the stage lengths in epochs, or the run's "
                                    f"length in trainer.steps (split by method.stage1_share)")
        phases, plan = [], {}

        def length(stage: GraftStageOptim, steps: list[int], i: int) -> dict[str, int | None]:
            if self.steps is not None:
                return {"epochs": None, "steps": steps[i]}
            return {"epochs": _per_unit(stage.epochs, i), "steps": None}

        for i, u in enumerate(grafted):
            name = f"stage1_{self.unit_name(u)}"
            plan[name] = UnitPlan(u, u + 1, (u,), s1.target or self.opts.target)
            phases.append(Phase(name, optimizers=[self._stage_optim(s1, i, (u,))], select_best=False,
                                batch_size=self.batch_size, **length(s1, steps1, i)))
        for i, u in enumerate(grafted[1:]):
            name = f"stage2_to_{self.unit_name(u)}"
            units = tuple(range(self.k, u + 1))
            plan[name] = UnitPlan(self.k, u + 1, units, s2.target or self.opts.target)
            phases.append(Phase(name, optimizers=[self._stage_optim(s2, i, units)],
                                select_best=False, batch_size=self.batch_size, **length(s2, steps2, i)))
        phases[-1].select_best = True  # the last progressive step keeps its best validated epoch
        return phases, plan

    # ------------------------------------------------------------------------------------ method
    def phases(self) -> list[Phase]:
        return self._phases

    def start_phase(self, phase: Phase) -> None:
        self.active = self._plan[phase.name]
        for u in range(self.k, self.n_units):
            on = u in self.active.train
            for m in self.unit_modules(u) + self.unit_bridges(u):
                m.requires_grad_(on)

    def _student_unit(self, u: int, h: Tensor) -> Tensor:
        """Unit u of the student with its bridges: host-width in (after unit 0), host-width out (not the head)."""
        if str(u) in self.t2s:
            h = self.t2s[str(u)](h)
        for i in self.units[u].student:
            h = self.S.stage(i, h)
        if self.units[u].head:
            return self.S.head(h)
        return self.s2t[str(u)](h) if str(u) in self.s2t else h

    def _host_unit(self, u: int, h: Tensor) -> Tensor:
        for i in self.units[u].host:
            h = self.H.stage(i, h)
        return self.H.head(h) if self.units[u].head else h

    def _host_from(self, u: int, h: Tensor) -> Tensor:
        """The host's units u.. on h."""
        for v in range(u, self.n_units):
            h = self._host_unit(v, h)
        return h

    def _prefix(self, x: Tensor) -> Tensor:
        """The host's (= the shared student's) units before the first grafted unit of the phase."""
        with torch.no_grad():
            for u in range(self.active.lo):
                x = self._host_unit(u, x)
            return x

    def _hybrid_from(self, h: Tensor) -> Tensor:
        for u in range(self.active.lo, self.active.hi):
            h = self._student_unit(u, h)
        return h if self.active.hi == self.n_units else self._host_from(self.active.hi, h)

    def hybrid(self, x: Tensor) -> Tensor:
        """Logits of the current hybrid (the whole student chain outside of a phase's partial graft)."""
        return self._hybrid_from(self._prefix(x))

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        h = self._prefix(x)
        s = self._hybrid_from(h).float()
        out: dict[str, Tensor] = {}
        opts, target = self.opts, self.active.target
        if target == "host":
            with torch.no_grad():
                z = self._host_from(self.active.lo, h).float()
            out["nlmse"] = loss = normalized_logit_mse(s, z)
        elif target == "fused" and opts.fused_loss == "nlmse":
            z = self.targets.ensemble.fused_logits(x, y, opts.fused_logits, opts.temperature)
            out["nlmse"] = loss = normalized_logit_mse(s, z)
        elif target == "fused":
            out["kd"] = loss = kd_loss_from_probs(s, self.targets(batch), opts.temperature)
        else:
            out["ce"] = loss = labelled_ce(s, y)
        if opts.kd_weight > 0 and not (target == "fused" and opts.fused_loss == "kl"):
            out["kd"] = kd_loss_from_probs(s, self.targets(batch), opts.temperature)
            loss = loss + opts.kd_weight * out["kd"]
        if target != "label" and opts.ce_weight > 0:
            out["ce"] = labelled_ce(s, y)
            loss = loss + self.opts.ce_weight * out["ce"]
        out["loss"] = loss
        out["acc"] = labelled_acc(s, y)
        return out

    def eval_logits(self, images: Tensor) -> Tensor:
        return self.hybrid(images)

    def uses_unlabeled(self) -> bool:
        """The host and fused targets need no label (NetGraft is label-free); ``target: label`` and
        ``ce_weight`` use the labelled images only."""
        return True

    # ------------------------------------------------------------------------------------ export
    @torch.no_grad()
    def fold(self) -> nn.Module:
        """The plain student: each bridge pair composed into one 1x1 map and absorbed by what consumes
        that boundary in the student (next block's first convs, or the head's Linear/1x1 conv), else
        kept as a junction of a ``GraftedStudent``."""
        net = copy.deepcopy(self.net).eval()
        view = StagedModel(net, self.S.label)
        junctions: dict[int, nn.Conv2d] = {}
        for u, unit in enumerate(self.units[:-1]):
            if str(u) not in self.s2t:
                continue
            b = unit.boundary[1]  # type: ignore[index]
            conv = compose_1x1(self.s2t[str(u)], self.t2s[str(u + 1)])
            consumer = view.consumer(b)
            if consumer is None:
                junctions[b] = conv
            elif consumer.linear is not None:
                fold_into_linear(conv, consumer.linear)
            else:
                fold_into_convs(conv, consumer.convs)
        if not junctions:
            return net
        p = next(net.parameters())
        grafted = GraftedStudent(net).to(device=p.device, dtype=p.dtype)
        for b, conv in junctions.items():
            grafted.junctions[str(b)].load_state_dict(conv.state_dict())
        return grafted.eval()

    def student(self) -> nn.Module:
        return self.fold()

    def student_arch(self) -> str:
        """``graft:<student>`` when the folded student keeps 1x1 junctions, else the student's name."""
        return self.exported_arch

    def _hybrid_modules(self) -> Iterator[nn.Module]:
        yield from self.shared_modules
        for u in range(self.k, self.n_units):
            yield from self.unit_modules(u) + self.unit_bridges(u)

    def param_counts(self) -> dict[str, int]:
        """Parameters of the host teacher, the full hybrid chain (with bridges) and the folded student."""
        hybrid = sum(p.numel() for m in self._hybrid_modules() for p in m.parameters())
        return {"teacher": count_params(self.H.model), "hybrid": hybrid, "student": count_params(self.fold())}

    def describe(self) -> dict[str, Any]:
        return {
            "host": {"index": self.host_index, "name": self.targets.ensemble.teachers[self.host_index].name},
            "target": self.opts.target, "units": [u.name for u in self.units],
            "host_units": ["+".join([self.H.stage_names[i] for i in u.host] + (["head"] if u.head else []))
                           for u in self.units],
            "shared_units": [u.name for u in self.units[: self.k]],
            "bridges": {f"{kind}_{self.unit_name(int(u))}": [c.in_channels, c.out_channels]
                        for kind, d in (("t2s", self.t2s), ("s2t", self.s2t)) for u, c in d.items()},
            "junctions_after": [self.S.stage_names[b] for b in self.junction_boundaries],
            "exported_arch": self.exported_arch, "tensors_copied_from_host": self.copied,
            "shot_factor": self.factor, "batch_size": self.batch_size, "params": self.param_counts(),
        }

    def final_metrics(self, score: Score) -> dict[str, Any]:
        report = teachers_report(self.targets.ensemble, score)
        report["graft"] = self.describe()
        report["params"] = report["graft"]["params"]
        return report


def first_graftable(order: list[int], build: Any, names: list[str]) -> Graft:
    """``build(host)`` for the first host in ``order`` the student can be grafted into (a UserError
    from ``build`` means it cannot); a UserError naming every refusal when none can. With one host
    in ``order`` its own error is raised."""
    refusals = []
    for host in order:
        try:
            return build(host)
        except UserError as e:
            if len(order) == 1:
                raise
            refusals.append(f"teacher {host} ({names[host]}): {e}")
            log.info("graft: teacher %d (%s) cannot be the host: %s", host, names[host], e)
    raise UserError("no teacher can be the graft host:\n  " + "\n  ".join(refusals))


@METHODS.register("graft", config=GraftMethod)
def build_graft(cfg: ExperimentConfig, data: Any, build_student: Any, run_dir: Any, device: torch.device,
                dist: Any, **_: Any) -> Graft:
    opts = cfg.method
    assert isinstance(opts, GraftMethod)
    if cfg.teacher_cache.enabled and not uses_fused_probs(opts):
        raise UserError(f"teacher_cache.enabled = true, but no phase uses the fused teacher probabilities (method.target "
                        f"= '{opts.target}', fused_loss = '{opts.fused_loss}', kd_weight = {opts.kd_weight}); the cache "
                        f"stores only those; set teacher_cache.enabled=false")
    if cfg.trainer.steps is not None:
        given = [f"method.stage{k}.epochs = {stage.epochs}" for k, stage in ((1, opts.stage1), (2, opts.stage2))
                 if stage.epochs is not None]
        if given:
            raise UserError(f"trainer.steps = {cfg.trainer.steps} and {' and '.join(given)}: give grafting's length in "
                            f"steps (split by method.stage1_share) or in stage epochs, not both (set those to null)")
    targets = build_teacher_targets(cfg, data, run_dir, device, dist, opts.temperature, False)
    k = len(targets.ensemble)
    if opts.host is not None and opts.host >= k:
        raise UserError(f"method.host = {opts.host} but there are only {k} teachers")
    # host: null -> the best teacher on validation that the student can be grafted into (the fused
    # target needs only the other teachers' outputs, so they may have any architecture)
    order = [opts.host] if opts.host is not None else [int(i) for i in targets.ensemble.val_acc.argsort(descending=True, stable=True)]
    return first_graftable(order, lambda host: Graft(
        opts, targets, host, build_student().to(device), student_name=cfg.model.name, input_size=data.image_size,
        batch_size=cfg.data.batch_size, shots=data.info.get("shots"),
        steps=cfg.trainer.steps), [t.name for t in targets.ensemble.teachers])
