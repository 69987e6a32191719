"""The Method interface: an nn.Module that turns a batch into named losses, phase by phase.

The trainer owns device, precision, distribution, checkpointing and logging; a method only says
what it trains (``phases``), how a batch becomes losses (``training_step``), which network is
scored on validation (``eval_logits``) and which network is exported (``student``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from graftkd.config import ExperimentConfig, MethodConfig, OptimizerConfig, ScheduleConfig, register_method_config
from graftkd.registry import Registry


@dataclass
class OptimSpec:
    """One optimiser of a phase. ``params`` are parameter groups (dicts with "params", optional
    "lr_scale"); the optimiser steps every ``every`` steps (gradients in between are dropped)."""

    params: list[dict[str, Any]]
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    name: str = "main"
    every: int = 1


@dataclass
class Phase:
    """A stretch of training with its own optimisers. Its length is ``steps`` optimiser steps when
    given (the last epoch is then cut short), else ``epochs`` passes. ``select_best``: keep the
    best-validation weights of this phase (else the last step's); a selecting phase starts a new
    selection, so the run's ``best.pt`` comes from the last selecting phase."""

    name: str
    epochs: int | None
    optimizers: list[OptimSpec]
    select_best: bool = True
    batch_size: int | None = None
    steps: int | None = None

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            raise ValueError(f"phase '{self.name}' has neither steps nor epochs")
        return self.epochs * steps_per_epoch


@dataclass
class ExtraOutput:
    """A network saved beside the student as ``<name>.pt``: its architecture name (so
    ``create_model`` rebuilds it) and its input normalisation (None: the data's)."""

    module: nn.Module
    arch: str
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    phase: Phase
    epoch: int  # epoch within the phase, from 0
    step: int  # global optimiser step over the whole run
    step_in_epoch: int
    steps_per_epoch: int
    phase_step: int = 0  # optimiser step within the phase, from 0
    phase_steps: int = 0  # optimiser steps of the whole phase


class Method(nn.Module):
    """Base class. Subclasses keep frozen teachers in eval mode by overriding ``train``."""

    #: modules that are never trained (frozen teachers): kept in eval, excluded from DDP
    frozen: list[nn.Module]

    def __init__(self) -> None:
        super().__init__()
        self.frozen = []

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def start_phase(self, phase: Phase) -> None:
        """Called before a phase's first epoch (also after resume): set what is trainable."""

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the network being selected on validation (the student, or the current hybrid)."""
        return self.student()(images)

    def student(self) -> nn.Module:
        """The network exported as the run's ``model.pt``."""
        raise NotImplementedError

    def student_arch(self) -> str | None:
        """The ``create_model`` name that rebuilds ``student()`` from its state dict (recorded in
        ``model.pt``); None: the config's ``model.name``. Grafting, whose folded student may be a
        ``graft:<name>`` network, overrides it."""
        return None

    def uses_unlabeled(self) -> bool:
        """Whether the method has a teacher-driven term that can learn from unlabelled images
        (``data.unlabeled``). When True, a training batch may hold unlabelled images after the
        labelled ones: their ``label`` is ``UNLABELED`` (-1) and ``batch["labeled"]`` is False; label
        terms must use only the labelled ones (``labelled_ce``, ``labelled_acc``)."""
        return False

    def after_validation(self) -> dict[str, float]:
        """Called (in eval mode) after every validation of the student; returns extra values for
        the log row (e.g. ATF's teacher guard)."""
        return {}

    def extra_outputs(self) -> dict[str, ExtraOutput]:
        """Other networks worth saving beside the student (adapted teacher, DML peers)."""
        return {}

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        for m in self.frozen:
            m.eval()
        return self

    def final_metrics(self, score: Callable[[Callable[[torch.Tensor], torch.Tensor], str], dict[str, Any]]) -> dict[str, Any]:
        """Extra entries for metrics.json after training (teachers, ensemble, parameter counts, ...).
        ``score(fn, split)`` evaluates a logits function on "val" or "test" with every metric."""
        return {}


#: the label of an unlabelled image in a training batch
UNLABELED = -1


def labelled_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the labelled images of a batch (label ``UNLABELED`` is skipped);
    equal to ``F.cross_entropy`` when every image is labelled."""
    return nn.functional.cross_entropy(logits, labels, ignore_index=UNLABELED, label_smoothing=label_smoothing)


def labelled_acc(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy over the labelled images of a batch."""
    known = labels != UNLABELED
    return (logits.argmax(1)[known] == labels[known]).float().mean()


def single_phase(cfg: ExperimentConfig, params: Iterable[nn.Parameter], name: str = "train") -> list[Phase]:
    """The common case: one phase of the run's length, one optimiser over ``params`` from the config."""
    return [Phase(name=name, epochs=cfg.trainer.epochs, steps=cfg.trainer.steps,
                  optimizers=[OptimSpec(params=[{"params": list(params)}], optimizer=cfg.optimizer, schedule=cfg.schedule)])]


class MethodRegistry(Registry[Callable[..., Method]]):
    """name -> factory. A method module registers its factory together with its config class::

        @METHODS.register("kd", config=KDMethod)
        def build_kd(cfg, data, *, build_student, run_dir, device, dist) -> Method: ...

    The factory gets the validated ``ExperimentConfig`` (``cfg.method`` is a ``config``), the
    ``DataBundle`` and, by keyword, ``build_student()`` (a fresh student network), the run folder,
    the device and the ``DistContext``; it may ignore any of them (``**_``). ``config`` (a
    ``graftkd.config.MethodConfig`` whose ``name`` defaults to the method's name) joins the
    ``method:`` union of ``ExperimentConfig``."""

    def register(self, name: str | None = None, *, config: type[MethodConfig] | None = None
                 ) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
        if name is None or config is None:
            raise TypeError("METHODS.register needs the method's name and config class")
        if config.model_fields["name"].default != name:
            raise ValueError(f"{config.__name__}.name defaults to {config.model_fields['name'].default!r}, "
                             f"not the method's name {name!r}")
        add = super().register(name)

        def deco(factory: Callable[..., Method]) -> Callable[..., Method]:
            add(factory)
            register_method_config(config)
            return factory

        return deco


METHODS = MethodRegistry("method")
