"""Typed experiment configuration: one YAML file per experiment, ``a.b=c`` overrides, resolved dump.

Every default a method uses is a field here, so the resolved ``config.yaml`` in the run folder
shows all of them. Unknown keys are errors that name the key and the closest valid one.
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from graftkd.errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def steps_replace_epochs(data: Any, steps: str, epochs: str, unset: Any) -> Any:
    """Before-validation: a length given in ``steps`` clears the default of its ``epochs`` twin (to
    ``unset``), so ``x.steps=300`` alone is enough; both given explicitly is an error (after-validation)."""
    if isinstance(data, dict) and data.get(steps) is not None and epochs not in data:
        return {**data, epochs: unset}
    return data


def check_one_length(obj: BaseModel, section: str, steps: str, epochs: str, unset: Any) -> None:
    if getattr(obj, steps) is not None and getattr(obj, epochs) != unset:
        raise ValueError(f"{section}.{steps} = {getattr(obj, steps)} and {section}.{epochs} = "
                         f"{getattr(obj, epochs)}: give the length in steps or in epochs, not both "
                         f"(set {section}.{epochs}={'null' if unset is None else unset})")


# ----------------------------------------------------------------------------------------- data
class SplitConfig(Strict):
    """How records are split into train/val/test. Always on groups (patients), never on images."""

    kind: Literal["fraction", "kfold", "official", "predefined"] = "fraction"
    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.2, ge=0, lt=1)
    test: float = Field(0.2, ge=0, lt=1)
    k: int = Field(5, ge=2, description="number of folds for kind=kfold")
    fold: int = Field(0, ge=0, description="which fold is the test fold (kfold/official)")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="val carved from train groups (kfold/official/predefined)")
    folds_csv: Path | None = Field(None, description="official BreakHis Folds.csv (fold,mag,grp,filename)")
    file: Path | None = Field(None, description="a split CSV written by an earlier run, re-used as is")
    seed: int | None = Field(None, description="split seed; None means the experiment seed")
    on_empty_class: Literal["error", "warn"] = Field(
        "error", description="a class that has images but none in train, val or test: error (naming the class), "
                             "or warn (one line on stderr) and go on")

    @model_validator(mode="after")
    def _fractions(self) -> "SplitConfig":
        if self.kind == "fraction" and abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"split fractions train+val+test must sum to 1, got {self.train}+{self.val}+{self.test}")
        return self


class SyntheticConfig(Strict):
    """Synthetic H&E-like histology in the BreakHis layout (the embedded default)."""

    patients: int = Field(24, ge=8, description="patients in total (>= 8: every subtype gets one)")
    images_per_patient: int = Field(8, ge=1, description="images per patient and magnification (with "
                                                          "images_per_patient_max: the fewest)")
    images_per_patient_max: int | None = Field(None, ge=1, description="each patient draws its image count "
                                                                       "uniformly from images_per_patient..this "
                                                                       "(same at every magnification); None: all equal")
    size: tuple[int, int] = Field((128, 128), description="width, height in pixels")
    magnifications: list[Literal[40, 100, 200, 400]] = [40, 100, 200, 400]
    seed: int = 0

    @model_validator(mode="after")
    def _range(self) -> "SyntheticConfig":
        if self.images_per_patient_max is not None and self.images_per_patient_max < self.images_per_patient:
            raise ValueError(f"images_per_patient_max = {self.images_per_patient_max} < images_per_patient = "
                             f"{self.images_per_patient}")
        return self


class DataConfig(Strict):
    source: Literal["breakhis", "synthetic", "cifar10", "cifar100", "folder", "csv"] = "synthetic"
    root: Path | None = Field(None, description="data folder (BreaKHis_v1, CIFAR folder, image folder, CSV file)")
    task: Literal["binary", "subtype"] = "binary"
    magnification: Literal["all", "40", "100", "200", "400"] = "all"
    image_size: int = Field(64, ge=8, le=2048)
    augment: Literal["histology", "cifar", "none"] = "histology"
    mean: tuple[float, float, float] | None = Field(None, description="None: the source's preset")
    std: tuple[float, float, float] | None = None
    split: SplitConfig = SplitConfig()
    shots: int | None = Field(None, ge=1, description="few-shot: N training images per class (drawn with the "
                                                     "experiment seed; with shots_file/shots_column: the count "
                                                     "every class of the given set must have)")
    max_per_group: int | None = Field(None, ge=1, description="few-shot: at most M images per patient")
    shots_file: Path | None = Field(None, description="few-shot: the exact labelled training images, one id a line "
                                                      "(path relative to the data root as in splits.csv, or the "
                                                      "CIFAR index), or a CSV with a 'path' or 'index' column")
    shots_column: str | None = Field(None, description="few-shot (data.source=csv): manifest column marking the "
                                                       "labelled training images (1/true/yes; 0/false/no/empty: not)")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    num_workers: int = Field(0, ge=0)
    decoded_cache: Literal["none", "memory", "mmap"] = "memory"
    on_bad_file: Literal["error", "skip"] = Field(
        "error", description="an unreadable image (empty, truncated, not an image; BreakHis: a name that does not "
                             "parse): error naming the file, or skip it (counted in the data summary and metrics.json)")
    patient_suffix: Literal["merge", "keep"] = Field(
        "merge", description="BreakHis slide ids that differ only by a letter suffix (22549AB, 22549G): merge = one "
                             "patient (leak-free), keep = different patients")
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _given_shots(self) -> "DataConfig":
        if self.shots_file is not None and self.shots_column is not None:
            raise ValueError("data.shots_file and data.shots_column both given: name the labelled set once")
        if (self.shots_file is not None or self.shots_column is not None) and self.max_per_group is not None:
            raise ValueError("data.max_per_group draws a subset; with a given labelled set "
                             "(shots_file/shots_column) set it to null")
        if self.shots_column is not None and self.source != "csv":
            raise ValueError(f"data.shots_column needs data.source=csv (a manifest), not {self.source!r}; "
                             f"use data.shots_file")
        return self


# --------------------------------------------------------------------------------------- models
class ModelConfig(Strict):
    name: str = "resnet8"
    pretrained: bool = False
    checkpoint: Path | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the constructor")


class TeacherConfig(ModelConfig):
    """A frozen teacher: a checkpoint from `graftkd train`, or a timm name with pretrained: true."""

    mean: tuple[float, float, float] | None = Field(None, description="input normalisation; None: from checkpoint or data")
    std: tuple[float, float, float] | None = None


class FusionConfig(Strict):
    """How K teachers' softmax outputs become one target ``sum_k w_k softmax(z_k / T)`` (methods.md I.2)."""

    strategy: Literal["mean", "accuracy", "entropy", "confidence", "best"] = Field(
        "accuracy", description="mean: 1/K; accuracy: softmax(val_acc / tau) per teacher; entropy (EBKD): per "
                                "sample 1 - H_k / sum_j H_j; confidence (CA-MKD): per sample (1 - softmax_k(CE_k)) / "
                                "(K-1), uses the label; best: the teacher with the best val accuracy")
    tau: float = Field(0.05, gt=0, description="accuracy fusion: w = softmax(acc / tau); large tau -> mean")


class CacheConfig(Strict):
    """Soft-target cache: fused teacher targets of V replayable views per training image."""

    enabled: bool = Field(False, description="precompute targets once in run/cache (frozen teachers only); "
                                             "the training set then shows one of `views` views per image each epoch")
    views: int = Field(8, ge=1, description="replayable augmented views cached per training image")
    topk: int | None = Field(None, ge=1, description="store top-k + residual mass (None: full float16)")


# -------------------------------------------------------------------------------------- methods
class SupervisedMethod(Strict):
    name: Literal["supervised"] = "supervised"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class DivergenceConfig(Strict):
    kind: Literal["kl", "alpha", "alpha_beta"] = "kl"
    alpha: float = 1.0
    beta: float = 0.0
    adaptive: bool = Field(False, description="alpha: per-sample max over {alpha_min, alpha_max}")
    alpha_min: float = -1.0
    alpha_max: float = 1.0
    iw_clip: float = Field(5.0, gt=0)


class KDMethod(Strict):
    """ce_weight * CE + kd_weight * T^2 D(target || softmax(s/T)); target = one teacher's softmax or the
    fused multi-teacher distribution (mdistiller defaults)."""

    name: Literal["kd"] = "kd"
    temperature: float = Field(4.0, gt=0, description="T of the teachers' and the student's softmax")
    ce_weight: float = Field(0.1, ge=0, description="weight of CE to the labels")
    kd_weight: float = Field(0.9, ge=0, description="weight of the T^2-scaled divergence to the target")
    standardize: bool = Field(False, description="logit standardisation Z() of teacher and student logits before /T")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the CE term")
    divergence: DivergenceConfig = Field(DivergenceConfig(), description="kl | alpha | alpha_beta")


class DKDMethod(Strict):
    """ce_weight * CE + min(epoch / warmup, 1) * (alpha TCKD + beta NCKD), epoch from 1 (mdistiller defaults)."""

    name: Literal["dkd"] = "dkd"
    temperature: float = Field(4.0, gt=0, description="T of the teachers' and the student's softmax")
    ce_weight: float = Field(1.0, ge=0, description="weight of CE to the labels")
    alpha: float = Field(1.0, ge=0, description="weight of target-class KD (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of non-target-class KD (NCKD); mdistiller uses 6 or 2 for some pairs")
    warmup_epochs: int = Field(20, ge=0, description="linear ramp of the DKD term over this many epochs (0: none)")
    warmup_steps: int | None = Field(None, ge=1, description="the ramp in optimiser steps instead (then "
                                                             "warmup_epochs must be 0; it is, unless given)")
    standardize: bool = Field(False, description="logit standardisation Z() of teacher and student logits before /T")

    _steps = model_validator(mode="before")(classmethod(lambda cls, d: steps_replace_epochs(
        d, "warmup_steps", "warmup_epochs", 0)))

    @model_validator(mode="after")
    def _one_warmup(self) -> "DKDMethod":
        check_one_length(self, "method", "warmup_steps", "warmup_epochs", 0)
        return self


class DMLMethod(Strict):
    """Deep mutual learning: `model` (peer 0, the student) and `peers` trained together from scratch."""

    name: Literal["dml"] = "dml"
    peers: list[ModelConfig] = Field(default_factory=list, description="extra peers besides `model` (at least one); "
                                                                       "each saved as peer<k>.pt")
    temperature: float = Field(1.0, gt=0, description="T of the mutual KL terms (DML: 1)")
    ce_weight: float = Field(1.0, ge=0, description="weight of each peer's CE to the labels")
    kd_weight: float = Field(1.0, ge=0, description="weight of mean_j T^2 KL(p_j || p_self) over the other (detached) peers")
    teacher_weight: float = Field(0.0, ge=0, description="weight of an extra KD term to the fused teachers' target")


class ATFMethod(Strict):
    """Adaptive Teacher Finetune (our definition, methods.md I.4) and the modes it is compared with.

    Student: ``ce_weight*CE(s, y) + kd_weight*T^2*D(stopgrad(p_T) || p_S)``. Teacher k (own
    optimiser): ``CE(z_k, y) + lam*T^2*D(stopgrad(p_S) || p_k) + mu*||theta_k - theta_k0||^2``.
    ``mode`` says which teacher terms are on: ``atf`` all of them; ``offline`` none (teachers frozen:
    plain KD with the same divergence); ``offline_joint`` CE + mu (lam is not used); ``online`` CE +
    lam with peers of the teachers' architectures from random init, trained from step 0 at
    ``peer_lr_ratio`` (DML-like; checkpoints, mu, warmup_epochs and teacher_bn are not used).
    """

    name: Literal["atf"] = "atf"
    mode: Literal["atf", "offline", "offline_joint", "online"] = "atf"
    temperature: float = Field(2.0, gt=0, description="T of every divergence term (logit-standardisation preset: 2)")
    standardize: bool = Field(True, description="Z-score logits per sample before /T in every divergence term")
    ce_weight: float = Field(0.1, ge=0, description="student CE weight (logit-standardisation preset: 0.1)")
    kd_weight: float = Field(9.0, ge=0, description="student divergence weight (logit-standardisation preset: 9)")
    divergence: DivergenceConfig = Field(DivergenceConfig(kind="alpha", alpha=0.5),
                                         description="D for the student and the teacher terms")
    lam: float = Field(1.0, ge=0, description="weight of the teacher's divergence to the student (atf, online)")
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
        "eval", description="mode of a pretrained teacher on its update steps: eval = running BN statistics "
                            "used and never changed, no dropout (the frozen-teacher forward); train = batch "
                            "statistics, running statistics updated, dropout on. Peers (online) always train")
    teacher_weight_decay: float = Field(0.0, ge=0, description="weight decay of the teacher optimisers (atf, "
                                                               "offline_joint; the student's optimizer.weight_decay "
                                                               "would pull the teacher towards 0, against the anchor)")
    teacher_ce_weight: float = Field(1.0, ge=0, description="weight of the teacher's CE to the labels (atf, "
                                                            "offline_joint); 0: the teacher learns from the "
                                                            "student's predictions and the anchor only")
    adapt: Literal["all", "last_stage", "head"] = Field(
        "all", description="which teacher parameters adapt (atf, offline_joint): all, the last stage and the "
                           "head, or the classifier head only (as DIST+'s acclimation)")
    guard: float | None = Field(None, ge=0, description="stop a teacher's adaptation, and roll it back to its best "
                                                        "validated state, once its validation accuracy falls more "
                                                        "than this below its accuracy before training; checked at "
                                                        "every validation (None: off)")

    _steps = model_validator(mode="before")(classmethod(lambda cls, d: steps_replace_epochs(
        d, "warmup_steps", "warmup_epochs", 0)))

    @model_validator(mode="after")
    def _one_warmup(self) -> "ATFMethod":
        check_one_length(self, "method", "warmup_steps", "warmup_epochs", 0)
        return self


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


class GraftMethod(Strict):
    """Dual-stage progressive network grafting (methods.md I.3): student units grafted into a frozen
    host teacher one by one (stage 1), then progressively chained (stage 2), then bridges folded."""

    name: Literal["graft"] = "graft"
    target: Literal["host", "fused", "label"] = Field(
        "fused", description="host: NetGraft normalised-logit MSE to the host's logits; fused: T^2 KL to the "
                             "fused multi-teacher target (`fusion`); label: cross-entropy (ablation)")
    host: int | None = Field(None, ge=0, description="index into `teachers` of the host; None: best on validation")
    temperature: float = Field(4.0, gt=0, description="temperature of the fused target (target=fused)")
    fused_loss: Literal["nlmse", "kl"] = Field(
        "kl", description="how the fused target is matched: nlmse: NetGraft's normalised-logit MSE to the fused "
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


MethodConfig = Annotated[
    Union[SupervisedMethod, KDMethod, DKDMethod, DMLMethod, ATFMethod, GraftMethod],
    Field(discriminator="name"),
]
METHOD_CLASSES: dict[str, type[Strict]] = {
    c.model_fields["name"].default: c
    for c in (SupervisedMethod, KDMethod, DKDMethod, DMLMethod, ATFMethod, GraftMethod)
}


# ----------------------------------------------------------------------------- optimisation/run
class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(Strict):
    """lr multiplier per optimiser step of a phase: linear warm-up, then the schedule over the rest of
    the phase (cosine reaches ``min_lr`` at the phase's last step, epochs or steps alike)."""

    name: Literal["constant", "multistep", "cosine"] = "cosine"
    warmup_epochs: int = Field(0, ge=0, description="linear lr warm-up in epochs")
    warmup_steps: int | None = Field(None, ge=1, description="linear lr warm-up in optimiser steps (instead of "
                                                             "warmup_epochs, which must then be 0)")
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs where lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _one_warmup(self) -> "ScheduleConfig":
        check_one_length(self, "schedule", "warmup_steps", "warmup_epochs", 0)
        return self


class TrainerConfig(Strict):
    """How long and how a run trains. The length is ``epochs`` or ``steps`` (optimiser steps, the budget
    to give every method of a comparison: the same number of updates whatever the batch or data size)."""

    epochs: int | None = Field(10, ge=1, description="passes over the training set (None when steps is given; graft: "
                                                  "method.stage1/stage2.epochs)")
    steps: int | None = Field(None, ge=1, description="optimiser steps of the run instead of epochs (setting it "
                                                      "clears the epochs default); metrics.json records the "
                                                      "steps every run took")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), "
                                                                       "fp32 elsewhere and with method.standardize")
    channels_last: bool = False
    grad_clip: float | None = Field(None, gt=0)
    deterministic: bool = True
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch default)")
    select_metric: Literal["val_acc", "val_loss"] = "val_acc"
    eval_every: int = Field(1, ge=1, description="validate every N epochs (and at a phase's end)")
    eval_every_steps: int | None = Field(None, ge=1, description="validate every N optimiser steps of a phase "
                                                                 "instead (mid-epoch too; and at the phase's end)")
    progress: bool = True

    _steps = model_validator(mode="before")(classmethod(lambda cls, d: steps_replace_epochs(
        d, "steps", "epochs", None)))

    @model_validator(mode="after")
    def _one_length(self) -> "TrainerConfig":
        check_one_length(self, "trainer", "steps", "epochs", None)
        if self.steps is None and self.epochs is None:
            raise ValueError("trainer.epochs and trainer.steps are both null: give the run's length in one of them")
        return self


class OutputConfig(Strict):
    dir: Path = Path("runs")
    name: str | None = Field(None, description="run folder name; None: the experiment name")
    tensorboard: bool = True


class ExperimentConfig(Strict):
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    teachers: list[TeacherConfig] = Field(default_factory=list)
    fusion: FusionConfig = FusionConfig()
    teacher_cache: CacheConfig = CacheConfig()
    method: MethodConfig = SupervisedMethod()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    trainer: TrainerConfig = TrainerConfig()
    output: OutputConfig = OutputConfig()

    @property
    def run_dir(self) -> Path:
        return self.output.dir / (self.output.name or self.name)


# ------------------------------------------------------------------------------ loading/overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value parsed as YAML scalar/list)."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise UserError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"override '{text}': value is not valid YAML ({e.__class__.__name__})") from None
    return parts, value


def apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                node = node[int(p)]
                continue
            except (ValueError, IndexError):
                raise UserError(f"override key '{'.'.join(parts)}': '{p}' is not an index of that list") from None
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, (dict, list)):
            raise UserError(f"override key '{'.'.join(parts)}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise UserError(f"override key '{'.'.join(parts)}': '{last}' is not an index of that list") from None
    else:
        node[last] = value


def _model_at(loc: tuple, raw: Any) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (discriminator tags skipped)."""
    cls: Any = ExperimentConfig
    node = raw
    for part in loc:
        if cls is None:
            return None
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if part in METHOD_CLASSES and cls is None:
            continue
        fields = cls.model_fields
        if part not in fields:
            return cls
        ann = fields[part].annotation
        node = node.get(part) if isinstance(node, dict) else None
        cls = _resolve(ann, node)
    return cls


def _resolve(ann: Any, node: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    args = getattr(ann, "__args__", ()) or ()
    metadata = getattr(ann, "__metadata__", None)
    if metadata is not None:
        return _resolve(args[0], node)
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(models) > 1 and isinstance(node, dict):
        return METHOD_CLASSES.get(str(node.get("name", "supervised")))
    if models:
        return models[0]
    for a in args:  # list[Model]
        r = _resolve(a, node[0] if isinstance(node, list) and node else None)
        if r is not None:
            return r
    return None


def _clean_loc(loc: tuple) -> list:
    return [p for p in loc if not (isinstance(p, str) and p in METHOD_CLASSES and p not in ExperimentConfig.model_fields)]


def _origin(loc: list, overrides: tuple[tuple[list[str], str], ...], source: str) -> str:
    """Where the value at ``loc`` came from: the last command-line override that set it (or a section
    above or below it), else the file."""
    path = [str(p) for p in loc]
    for parts, text in reversed(overrides):
        n = min(len(parts), len(path))
        if parts[:n] == path[:n]:
            return f"command line '{text}'"
    return source


def format_validation_error(err: ValidationError, raw: dict, source: str,
                            overrides: tuple[tuple[list[str], str], ...] = ()) -> str:
    """One line per problem, each headed by where the bad key or value came from (``source``, the
    file, or the command-line override that set it); problems from one origin share the heading."""
    lines: list[tuple[str, str]] = []
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        key = ".".join(str(p) for p in loc)
        origin = _origin(loc, overrides, source)
        if e["type"] == "extra_forbidden":
            owner = _model_at(tuple(loc[:-1]), raw)
            hint = ""
            if owner is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1, cutoff=0.5)
                hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + [close[0]])}'?" if close else \
                    f" (valid: {', '.join(owner.model_fields)})"
            lines.append((origin, f"unknown config key '{key}'{hint}"))
        elif e["type"] == "union_tag_invalid":
            lines.append((_origin(loc + ["name"], overrides, source),
                          f"config key '{key}.name': unknown method {e['input'].get('name')!r} "
                          f"(known: {', '.join(METHOD_CLASSES)})" if isinstance(e.get("input"), dict) else
                          f"config key '{key}': {e['msg']}"))
        else:
            value = e.get("input")
            shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
            lines.append((origin, f"config key '{key}' = {shown}: {e['msg']}"))
    out: list[str] = []
    for i, (origin, text) in enumerate(lines):
        out.append(text if i and lines[i - 1][0] == origin else f"{origin}: {text}")
    return "; ".join(out)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML file (safe_load), apply ``a.b=c`` overrides, validate into ExperimentConfig."""
    raw: dict = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    given: list[tuple[list[str], str]] = []
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(raw, parts, value)
        given.append((parts, text))
    return validate_config(raw, source, tuple(given))


def validate_config(raw: dict, source: str = "config",
                    overrides: tuple[tuple[list[str], str], ...] = ()) -> ExperimentConfig:
    """Validate a raw config tree; errors name ``source`` or the command-line override (parts, text)
    that set the bad key."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, raw, source, overrides)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings recursively, everything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

