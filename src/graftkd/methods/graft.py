"""Dual-stage progressive network grafting (NetGraft) with multi-teacher soft targets (methods.md I.3).

The host (one frozen teacher, by default the best on validation) is viewed as ``stem -> stages ->
head``; the student must have as many stages with the same boundary spatial sizes. Units are the
student's grafted stages (after ``shared_stages``) and finally its head. Where channel widths
differ, a 1x1 bridge ``t2s_u`` feeds unit u from the host and ``s2t_u`` feeds the host from it.

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

The student's stem (and shared stages) is the host's: copied at set-up, never trained, so the
hybrid and the exported student see the same features. ``student()`` folds the bridges
(``graftkd.models.staged``): the exported network is the plain student architecture when every
folded bridge pair was absorbed into the head's Linear (or no bridge was needed), else a
``GraftedStudent`` (``graft:<student>``) with square 1x1 junctions between stages.
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
from graftkd.models import MODELS, count_params
from graftkd.models.staged import (
    GRAFT_PREFIX,
    GraftedStudent,
    StagedModel,
    check_compatible,
    compose_1x1,
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
    shared_stages: int = Field(0, ge=0, description="leading host stages kept with the stem: copied into the "
                                                    "student, never grafted (NetGraft VGG16: 3)")
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
    hi: int
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
                            f"to those values, since the grafted student keeps the host's stem")
        self.H = StagedModel(host_teacher.model, f"host teacher {host_index} ({host_teacher.name})")
        self.S = StagedModel(student, f"student ({student_name})")
        shapes = check_compatible(self.H, self.S, input_size)
        n, k = self.H.n_stages, opts.shared_stages
        if k > n:
            raise UserError(f"method.shared_stages = {k} but the host has only {n} stages")
        self.k, self.n_units = k, n - k + 1
        self.shared_modules = self._copy_stem_region()
        self.t2s, self.s2t = nn.ModuleDict(), nn.ModuleDict()
        for u in range(self.n_units):
            b_in = k + u  # boundary feeding unit u: 0 = stem output, j = output of stage j-1
            if shapes[b_in][0][0] != shapes[b_in][1][0]:
                self.t2s[str(u)] = make_bridge(shapes[b_in][0][0], shapes[b_in][1][0])
            if u < self.n_units - 1 and shapes[b_in + 1][0][0] != shapes[b_in + 1][1][0]:
                self.s2t[str(u)] = make_bridge(shapes[b_in + 1][1][0], shapes[b_in + 1][0][0])
        for u in range(self.n_units - 1):
            if (str(u) in self.s2t) != (str(u + 1) in self.t2s):
                raise RuntimeError(f"unpaired bridges after unit {u}")  # widths chain in both networks
        self.copied = self._init_from_host() if opts.init_from_teacher else 0
        self.junction_stages = [k + u for u in range(self.n_units - 1) if str(u) in self.s2t
                                and not (u + 1 == self.n_units - 1 and self.S.head_linear is not None)]
        base = student_name.removeprefix("timm:")
        self.exported_arch = GRAFT_PREFIX + base if self.junction_stages else student_name
        if self.junction_stages and self.exported_arch not in MODELS:
            raise UserError(f"student '{student_name}' would need 1x1 junctions after stages {self.junction_stages} "
                            f"(its widths differ from the host's) and cannot be exported as '{self.exported_arch}'; "
                            f"graftable students with junctions: our CIFAR family and "
                            f"{', '.join(n.removeprefix(GRAFT_PREFIX) for n in MODELS.names(GRAFT_PREFIX + 'resnet[0-9]*'))}")
        targets.requires_grad_(False)
        for m in self.shared_modules:
            m.requires_grad_(False)
        self.frozen = [targets, *self.shared_modules]
        self.factor, self.batch_size = shot_scaling(shots, opts.scale_with_shots, batch_size)
        self.steps = steps
        self._phases, self._plan = self._build_phases()
        self.active = UnitPlan(0, self.n_units, ())
        log.info("graft: %s", self.describe())

    # ------------------------------------------------------------------------------------ set-up
    def _stem_region(self, view: StagedModel) -> list[tuple[str, nn.Module]]:
        return list(view.named_stem()) + [(view.stage_names[j], view.stage_module(j)) for j in range(self.k)]

    @torch.no_grad()
    def _copy_stem_region(self) -> list[nn.Module]:
        """Copy the host's stem and shared stages into the student; their shapes must match."""
        host, student = dict(self._stem_region(self.H)), self._stem_region(self.S)
        for name, module in student:
            src = host.get(name)
            ours, theirs = module.state_dict(), src.state_dict() if src is not None else {}
            bad = [key for key in set(ours) | set(theirs)
                   if key not in ours or key not in theirs or ours[key].shape != theirs[key].shape]
            if bad:
                key = sorted(bad)[0]
                raise UserError(
                    f"the grafted student keeps the host's stem and shared stages, so '{name}' must have the same "
                    f"tensors in both: '{name}.{key}' is {tuple(theirs[key].shape) if key in theirs else 'missing'} "
                    f"in {self.H.label} and {tuple(ours[key].shape) if key in ours else 'missing'} in {self.S.label}")
            module.load_state_dict(theirs)
        return [m for _, m in student]

    def _unit_pairs(self, u: int) -> list[tuple[str, nn.Module, nn.Module]]:
        """(name, student module, host module) of unit u."""
        if u < self.n_units - 1:
            j = self.k + u
            return [(self.S.stage_names[j], self.S.stage_module(j), self.H.stage_module(j))]
        host = dict(self.H.named_head())
        return [(name, m, host[name]) for name, m in self.S.named_head() if name in host]

    @torch.no_grad()
    def _init_from_host(self) -> int:
        """Copy host tensors into the grafted units where name and shape match; returns how many."""
        copied = 0
        for u in range(self.n_units):
            for _, s_mod, h_mod in self._unit_pairs(u):
                theirs = h_mod.state_dict()
                for key, value in s_mod.state_dict().items():
                    if key in theirs and theirs[key].shape == value.shape:
                        value.copy_(theirs[key])
                        copied += 1
        return copied

    def unit_name(self, u: int) -> str:
        return self.S.stage_names[self.k + u] if u < self.n_units - 1 else "head"

    def unit_modules(self, u: int) -> list[nn.Module]:
        """The student modules of unit u (without bridges)."""
        if u < self.n_units - 1:
            return [self.S.stage_module(self.k + u)]
        return [m for _, m in self.S.named_head()]

    def unit_bridges(self, u: int) -> list[nn.Module]:
        return [d[str(u)] for d in (self.t2s, self.s2t) if str(u) in d]

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
        """Stage 1 then stage 2; lengths in epochs (``stage<k>.epochs``) or, with a run budget in optimiser
        steps, in steps (``phase_steps``)."""
        s1, s2 = self.opts.stage1, self.opts.stage2
        if self.steps is not None:
            steps1, steps2 = phase_steps(self.steps, self.opts.stage1_share, self.n_units)
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

        for u in range(self.n_units):
            name = f"stage1_{self.unit_name(u)}"
            plan[name] = UnitPlan(u, u + 1, (u,), s1.target or self.opts.target)
            phases.append(Phase(name, optimizers=[self._stage_optim(s1, u, (u,))], select_best=False,
                                batch_size=self.batch_size, **length(s1, steps1, u)))
        for i in range(2, self.n_units + 1):
            name = f"stage2_to_{self.unit_name(i - 1)}"
            units = tuple(range(i))
            plan[name] = UnitPlan(0, i, units, s2.target or self.opts.target)
            phases.append(Phase(name, optimizers=[self._stage_optim(s2, i - 2, units)],
                                select_best=False, batch_size=self.batch_size, **length(s2, steps2, i - 2)))
        phases[-1].select_best = True  # the last progressive step keeps its best validated epoch
        return phases, plan

    # ------------------------------------------------------------------------------------ method
    def phases(self) -> list[Phase]:
        return self._phases

    def start_phase(self, phase: Phase) -> None:
        self.active = self._plan[phase.name]
        for u in range(self.n_units):
            on = u in self.active.train
            for m in self.unit_modules(u) + self.unit_bridges(u):
                m.requires_grad_(on)

    def _unit(self, u: int, h: Tensor) -> Tensor:
        if str(u) in self.t2s:
            h = self.t2s[str(u)](h)
        if u == self.n_units - 1:
            return self.S.head(h)
        h = self.S.stage(self.k + u, h)
        return self.s2t[str(u)](h) if str(u) in self.s2t else h

    def _host_from(self, u: int, h: Tensor) -> Tensor:
        """The host's units u.. on h."""
        for v in range(u, self.n_units - 1):
            h = self.H.stage(self.k + v, h)
        return self.H.head(h)

    def _prefix(self, x: Tensor) -> Tensor:
        """Host stem and stages before the first grafted unit of the phase (nothing there trains)."""
        with torch.no_grad():
            return self.H.features(x, self.k + self.active.lo)

    def _hybrid_from(self, h: Tensor) -> Tensor:
        for u in range(self.active.lo, self.active.hi):
            h = self._unit(u, h)
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
        """The plain student: bridge pairs composed into one 1x1 conv, folded into the head's Linear
        where exact, else kept as a junction of a ``GraftedStudent``."""
        net = copy.deepcopy(self.net).eval()
        view = StagedModel(net, self.S.label)
        junctions: dict[int, nn.Conv2d] = {}
        for u in range(self.n_units - 1):
            if str(u) not in self.s2t:
                continue
            conv = compose_1x1(self.s2t[str(u)], self.t2s[str(u + 1)])
            if self.k + u in self.junction_stages:
                junctions[self.k + u] = conv
            else:
                fold_into_linear(conv, view.head_linear_module())
        if not junctions:
            return net
        p = next(net.parameters())
        grafted = GraftedStudent(net, self.input_size).to(device=p.device, dtype=p.dtype)
        for j, conv in junctions.items():
            grafted.junctions[str(j)].load_state_dict(conv.state_dict())
        return grafted.eval()

    def student(self) -> nn.Module:
        return self.fold()

    def student_arch(self) -> str:
        """``graft:<student>`` when the folded student keeps 1x1 junctions, else the student's name."""
        return self.exported_arch

    def _hybrid_modules(self) -> Iterator[nn.Module]:
        yield from (m for _, m in self._stem_region(self.H))
        for u in range(self.n_units):
            yield from self.unit_modules(u) + self.unit_bridges(u)

    def param_counts(self) -> dict[str, int]:
        """Parameters of the host teacher, the full hybrid chain (with bridges) and the folded student."""
        hybrid = sum(p.numel() for m in self._hybrid_modules() for p in m.parameters())
        return {"teacher": count_params(self.H.model), "hybrid": hybrid, "student": count_params(self.fold())}

    def describe(self) -> dict[str, Any]:
        return {
            "host": {"index": self.host_index, "name": self.targets.ensemble.teachers[self.host_index].name},
            "target": self.opts.target, "units": [self.unit_name(u) for u in range(self.n_units)],
            "shared_stages": list(self.H.stage_names[: self.k]),
            "bridges": {f"{kind}_{self.unit_name(int(u))}": [c.in_channels, c.out_channels]
                        for kind, d in (("t2s", self.t2s), ("s2t", self.s2t)) for u, c in d.items()},
            "junctions_after": [self.S.stage_names[j] for j in self.junction_stages],
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
                 if "epochs" in stage.model_fields_set and stage.epochs is not None]
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
