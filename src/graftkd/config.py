"""Typed experiment configuration: one YAML file per experiment, ``a.b=c`` overrides, resolved dump.

Every default is a field, so the resolved ``config.yaml`` in the run folder shows all of them.
Unknown keys are errors that name the key and the closest valid one (``config_errors``).

The ``method:`` section is the exception to "everything is here": each method's config class
lives in its own module in ``graftkd/methods/`` and joins the union when that module registers
it (``METHODS.register(name, config=...)``); importing ``graftkd.methods`` registers them all
(the CLI and ``graftkd.experiment`` do).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graftkd.config_errors import format_validation_error
from graftkd.errors import UserError
from graftkd.registry import Registry


#: a seed: what torch.manual_seed and the derived seeds take (0 .. 2**64 - 1)
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]
#: a positive normalisation std (images are divided by it)
PositiveStd = Annotated[float, Field(gt=0)]


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

    kind: Literal["fraction", "kfold", "official", "predefined", "centre"] = "fraction"
    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.2, ge=0, lt=1)
    test: float = Field(0.2, ge=0, lt=1)
    k: int = Field(5, ge=2, description="number of folds for kind=kfold")
    fold: int = Field(0, ge=0, description="which fold is the test fold (kfold/official)")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="val carved from train groups (kfold/official/predefined/"
                                                             "centre)")
    test_centres: list[str] = Field(default_factory=list, description="kind=centre: the centres whose images are the "
                                                                     "test split (the others are train and val)")
    folds_csv: Path | None = Field(None, description="official BreakHis Folds.csv (fold,mag,grp,filename)")
    file: Path | None = Field(None, description="a split CSV written by an earlier run, re-used as is")
    seed: Seed | None = Field(None, description="split seed; None means the experiment seed")
    on_empty_class: Literal["error", "warn"] = Field(
        "error", description="a class that has images but none in train, val or test: error (naming the class), "
                             "or warn (one line on stderr) and go on")

    @model_validator(mode="after")
    def _fractions(self) -> "SplitConfig":
        if self.kind == "fraction" and abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"split fractions train+val+test must sum to 1, got {self.train}+{self.val}+{self.test}")
        if (self.kind == "centre") != bool(self.test_centres):
            raise ValueError("split.kind = centre needs split.test_centres (and test_centres needs kind = centre), "
                             f"got kind = {self.kind!r}, test_centres = {self.test_centres}")
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
    seed: Seed = 0
    centres: int = Field(1, ge=1, description="centres (labs) the patients come from, assigned round-robin within "
                                              "each subtype; each centre has its own stain vectors and intensity "
                                              "(centre ids 0..centres-1, for split.kind = centre)")
    centre_stain_sd: float = Field(0.25, ge=0, description="log-normal spread of a centre's stain vectors (per RGB "
                                                           "channel) and of its stain intensity")

    @model_validator(mode="after")
    def _range(self) -> "SyntheticConfig":
        if self.images_per_patient_max is not None and self.images_per_patient_max < self.images_per_patient:
            raise ValueError(f"images_per_patient_max = {self.images_per_patient_max} < images_per_patient = "
                             f"{self.images_per_patient}")
        return self


class StainJitterConfig(Strict):
    """HED stain jitter strengths (Tellez et al. 2019) of ``augment: histology_stain``: per image and
    stain (haematoxylin, eosin, DAB optical densities, ``-log(rgb) @ hed_from_rgb``) ``s' = alpha s + beta``.
    The defaults are Tellez et al.'s HED-light."""

    scale: float = Field(0.05, ge=0, lt=1, description="alpha ~ U(1 - scale, 1 + scale)")
    shift: float = Field(0.05, ge=0, description="beta ~ U(-shift, shift), in optical density")


class StainNormConfig(Strict):
    """Stain normalisation applied once where images are decoded (so the decoded cache holds
    normalised images); the fitted reference goes to the run folder and the exported model."""

    method: Literal["none", "macenko", "reinhard"] = Field(
        "none", description="macenko (stain vectors + 99th-percentile concentrations, Macenko 2009) or "
                            "reinhard (LAB mean and sd per channel, Reinhard 2001); torchstain 1.4.1's computations")
    reference: Path | None = Field(None, description="reference image file; None: a seeded sample of the "
                                                     "training split's images")
    sample: int = Field(16, ge=1, description="reference=None: how many training images the reference is fitted on")
    seed: int = Field(0, description="seed of that sample")


class DataConfig(Strict):
    source: Literal["breakhis", "synthetic", "cifar10", "cifar100", "folder", "csv"] = "synthetic"
    root: Path | None = Field(None, description="data folder (BreaKHis_v1, CIFAR folder, image folder, CSV file)")
    task: Literal["binary", "subtype"] = "binary"
    magnification: Literal["all", "40", "100", "200", "400"] = "all"
    image_size: int = Field(64, ge=8, le=2048)
    augment: Literal["histology", "histology_stain", "cifar", "none"] = "histology"
    stain_jitter: StainJitterConfig = Field(StainJitterConfig(), description="HED jitter strengths of "
                                                                           "augment=histology_stain")
    stain_norm: StainNormConfig = Field(StainNormConfig(), description="Macenko/Reinhard stain normalisation")
    mean: tuple[float, float, float] | None = Field(None, description="None: the source's preset")
    std: tuple[PositiveStd, PositiveStd, PositiveStd] | None = None
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
    unlabeled: str | None = Field(None, description="unlabelled transfer set for the teacher-driven terms: "
                                                     "'train_rest' (the training split's images that are not labelled "
                                                     "shots), a folder of images or a CSV with a 'path' column "
                                                     "(optional 'group'); images of val/test patients are left out")
    unlabeled_batch_size: int = Field(32, ge=1, description="unlabelled images added to every training step's "
                                                            "batch_size labelled ones (with data.unlabeled)")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    num_workers: int = Field(0, ge=0)
    decoded_cache: Literal["none", "memory", "mmap"] = "memory"
    on_bad_file: Literal["error", "skip"] = Field(
        "error", description="an unreadable image (empty, truncated, not an image; BreakHis: a name that does not "
                             "parse): error naming the file, or skip it (counted in the data summary and metrics.json)")
    max_pixels: int = Field(89_478_485, ge=1, description="pixel budget of one image, checked from its header before "
                                                           "decoding (default: PIL's decompression-bomb limit); a "
                                                           "larger image is a bad file (see on_bad_file)")
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
    pretrained: bool | Path = Field(False, description="true: timm's hub weights; a path: a weights file on disk "
                                                        "(.safetensors or a torch state dict) for this architecture, "
                                                        "loaded through timm's pretrained_cfg_overlay (no hub)")
    checkpoint: Path | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the constructor")


class TeacherConfig(ModelConfig):
    """A frozen teacher: a checkpoint from `graftkd train`, or a timm name with pretrained: true."""

    mean: tuple[float, float, float] | None = Field(None, description="input normalisation; None: from checkpoint or data")
    std: tuple[PositiveStd, PositiveStd, PositiveStd] | None = None


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
class MethodConfig(Strict):
    """Base of a method's ``method:`` section. Each method module defines a subclass whose ``name``
    is a one-value Literal (``name: Literal["kd"] = "kd"``) and registers it with its factory
    (``@METHODS.register("kd", config=KDMethod)``, methods/base.py); the ``method`` field of
    ``ExperimentConfig`` is the discriminated union of the registered subclasses."""

    name: str

    @classmethod
    def with_run_steps(cls, section: dict) -> dict:
        """Before-validation of the raw ``method:`` section of a run whose length is ``trainer.steps``:
        clear the defaults of lengths given in epochs (as ``steps_replace_epochs`` does within a
        section), so the resolved config says what the run does and reloads to the same run."""
        return section


class WarmupInSteps(BaseModel):
    """Mixin of method sections with ``warmup_epochs`` and ``warmup_steps`` (an int | None field each,
    declared by the method): ``warmup_steps`` alone clears the epochs default to 0; both is an error."""

    _steps = model_validator(mode="before")(classmethod(lambda cls, d: steps_replace_epochs(
        d, "warmup_steps", "warmup_epochs", 0)))

    @model_validator(mode="after")
    def _one_warmup(self) -> "WarmupInSteps":
        check_one_length(self, "method", "warmup_steps", "warmup_epochs", 0)
        return self


#: method name -> its config class (filled by ``register_method_config``)
METHOD_CONFIGS: Registry[type[MethodConfig]] = Registry("method")


class DivergenceConfig(Strict):
    kind: Literal["kl", "alpha", "alpha_beta"] = "kl"
    alpha: float = 1.0
    beta: float = 0.0
    adaptive: bool = Field(False, description="alpha: per-sample max over {alpha_min, alpha_max}")
    alpha_min: float = -1.0
    alpha_max: float = 1.0
    iw_clip: float = Field(5.0, gt=0)


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


#: the longest run folder name: the name of its set-aside copy (``.<name>.replaced``) must fit in 255 bytes
MAX_RUN_NAME = 255 - len(".") - len(".replaced")


def check_run_name(name: str, key: str) -> str:
    """A run folder name is a relative path that stays inside ``output.dir``: not empty, not
    absolute, no ``.``/``..``/empty/hidden part, every part short enough for its set-aside copy."""
    why = None
    parts = name.split("/")
    if not name.strip():
        why = "is empty"
    elif "\0" in name:
        why = "contains a NUL character"
    elif name.startswith("/"):
        why = "is an absolute path; it must be a folder name inside output.dir"
    elif any(p in (".", "..") for p in parts):
        why = "contains '.' or '..'; the run folder must be a new folder inside output.dir"
    elif any(not p for p in parts):
        why = "has an empty part ('//' or a trailing '/')"
    elif any(p.startswith(".") for p in parts):
        why = "has a part starting with '.' (hidden names are graftkd's own: .cache, .<name>.replaced)"
    elif any(len(p.encode()) > MAX_RUN_NAME for p in parts):
        why = f"has a part longer than {MAX_RUN_NAME} bytes (its set-aside copy .<name>.replaced must fit in 255)"
    if why is not None:
        raise ValueError(f"{key} {why}")
    return name


class OutputConfig(Strict):
    dir: Path = Path("runs")
    name: str | None = Field(None, description="run folder name: a relative path inside output.dir (no '.', '..' "
                                               "or hidden parts); None: the experiment name")
    tensorboard: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return v if v is None else check_run_name(v, "output.name")


class ExperimentConfig(Strict):
    name: str = "experiment"
    seed: Seed = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    teachers: list[TeacherConfig] = Field(default_factory=list)
    fusion: FusionConfig = FusionConfig()
    teacher_cache: CacheConfig = CacheConfig()
    method: MethodConfig = Field(default_factory=lambda: METHOD_CONFIGS.get("supervised")(),
                                 description="one of the registered methods' sections, chosen by method.name")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    trainer: TrainerConfig = TrainerConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _method_lengths_in_steps(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        trainer, method = data.get("trainer"), data.get("method")
        if (isinstance(trainer, dict) and trainer.get("steps") is not None and isinstance(method, dict)
                and isinstance(method.get("name"), str) and method["name"] in METHOD_CONFIGS):
            return {**data, "method": METHOD_CONFIGS.get(method["name"]).with_run_steps(method)}
        return data

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        return check_run_name(v, "the experiment name (the run folder when output.name is null)")

    @property
    def run_dir(self) -> Path:
        return self.output.dir / (self.output.name or self.name)


def register_method_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Add a method's config class and rebuild ``ExperimentConfig.method`` as the discriminated
    union (on ``name``) of every registered class."""
    name = cls.model_fields["name"].default
    if not isinstance(name, str):
        raise TypeError(f"{cls.__name__}.name needs a default: the method's name")
    METHOD_CONFIGS.register(name)(cls)
    classes = tuple(METHOD_CONFIGS.get(n) for n in METHOD_CONFIGS)
    field = ExperimentConfig.model_fields["method"]
    field.annotation = Union[classes] if len(classes) > 1 else classes[0]  # type: ignore[assignment]
    field.discriminator = "name" if len(classes) > 1 else None
    ExperimentConfig.model_rebuild(force=True)
    return cls


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


class DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (safe_load keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKey(
                    None, None, f"duplicate key {key!r} on line {line} (first given on line {seen[key]})",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file, read safely: UTF-8 only, no duplicate keys, no tags; one-line UserError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as "
                        f"UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  a SafeLoader subclass
    except DuplicateKey as e:
        raise UserError(f"{p}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML file (safe_load), apply ``a.b=c`` overrides, validate into ExperimentConfig."""
    raw: dict = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        loaded = read_yaml(p)
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
    if not len(METHOD_CONFIGS):
        raise UserError("no method is registered: `import graftkd.methods` before validating a config "
                        "(it registers every method's config section)")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        methods = {n: METHOD_CONFIGS.get(n) for n in METHOD_CONFIGS}
        raise UserError(format_validation_error(e, raw, source, ExperimentConfig, methods, overrides)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings recursively, everything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

