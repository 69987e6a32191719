"""K frozen teachers with their own input normalisation, and their fused soft targets.

A teacher is a model file written by ``graftkd train`` (``checkpoint``) or a timm name with
``pretrained: true``. Batches arrive normalised with the data's mean/std; a teacher trained with
other statistics gets them re-normalised on the fly (``x * data_std / t_std + (data_mean - t_mean) /
t_std``, as timm's DistillationTeacher does). Teachers are frozen (``requires_grad`` False), kept in
eval mode, run under ``torch.no_grad()``, never given to an optimiser nor synchronised
across ranks.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from graftkd.config import FusionConfig, TeacherConfig
from graftkd.data.loaders import eval_loader
from graftkd.errors import UserError
from graftkd.files import atomic_write_json
from graftkd.runtime import Inference, predict
from graftkd.teachers import fusion

Stats = tuple[float, float, float]


def state_checksum(model: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes), independent of device."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def records_hash(records: Sequence[Any]) -> str:
    """sha256 of a record list (path, label, group, in-memory row): the identity of a split."""
    rows = [[r.path, int(r.label), r.group, r.meta.get("index")] for r in records]
    return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()


def stack_logits(teachers: Iterable[nn.Module], x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every teacher's float32 logits for images x, stacked along ``dim`` ([K, B, C] by default)."""
    return torch.stack([t(x).float() for t in teachers], dim)


class Teacher(nn.Module):
    """One frozen teacher: re-normalises batches from the data's statistics to its own."""

    def __init__(self, model: nn.Module, name: str, source: str, mean: Stats, std: Stats,
                 data_mean: Stats, data_std: Stats) -> None:
        super().__init__()
        self.model = model
        self.name, self.source = name, source
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.renormalise = (self.mean, self.std) != (tuple(data_mean), tuple(data_std))
        d_mean, d_std = torch.tensor(data_mean).view(1, 3, 1, 1), torch.tensor(data_std).view(1, 3, 1, 1)
        t_mean, t_std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        self.register_buffer("scale", d_std / t_std, persistent=False)
        self.register_buffer("shift", (d_mean - t_mean) / t_std, persistent=False)
        self.model.requires_grad_(False)
        self.model.eval()
        self.checksum = state_checksum(self.model)

    def renormalised(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the data's normalisation, in the teacher's."""
        if self.renormalise:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.renormalised(x))

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint": self.source, "mean": list(self.mean), "std": list(self.std),
                "checksum": self.checksum}


class TeacherEnsemble(nn.Module):
    """K frozen teachers plus the fusion rule that turns their logits into one target."""

    def __init__(self, teachers: Sequence[Teacher], fusion_cfg: FusionConfig, val_acc: torch.Tensor) -> None:
        super().__init__()
        if not teachers:
            raise UserError("distillation needs at least one teacher (the `teachers:` list is empty)")
        self.teachers = nn.ModuleList(teachers)
        self.fusion = fusion_cfg
        self.register_buffer("val_acc", val_acc.float().clone(), persistent=False)

    def __len__(self) -> int:
        return len(self.teachers)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)

    def weights(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """[B, K] fusion weights for teacher logits [K, B, C]."""
        return fusion.weights(self.fusion.strategy, logits, labels, self.val_acc, self.fusion.tau)

    def targets(self, x: torch.Tensor, y: torch.Tensor | None, temperature: float,
                standardize: bool = False) -> torch.Tensor:
        """[B, C] fused soft target ``sum_k w_k softmax(z_k / T)`` for images x and labels y."""
        with torch.no_grad():  # not inference_mode: on CPU its convolutions ran ~15% slower (issue 25)
            z = stack_logits(self.teachers, x)
            return fusion.fuse(z, self.weights(z, y), temperature, standardize)

    def fused_logits(self, x: torch.Tensor, y: torch.Tensor | None, how: str, temperature: float) -> torch.Tensor:
        """[B, C] fused logit vector (``fusion.fuse_logits``) for images x and labels y."""
        with torch.no_grad():
            z = torch.stack([t(x).float() for t in self.teachers])
            return fusion.fuse_logits(z, self.weights(z, y), how, temperature)

    def global_weights(self) -> list[float] | None:
        """Per-teacher weights of a global strategy (mean, accuracy, best), else None."""
        if self.fusion.strategy not in fusion.GLOBAL_STRATEGIES:
            return None
        return fusion.global_weights(self.fusion.strategy, self.val_acc.cpu(), self.fusion.tau).tolist()

    def eval_strategy(self) -> str:
        """The strategy used to score the ensemble as a classifier: labels are unknown at test
        time, so ``confidence`` (which needs them) is scored with ``mean`` weights."""
        return "mean" if self.fusion.strategy == "confidence" else self.fusion.strategy

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the fused distribution at T = 1 (label-free weights): the ensemble as a classifier."""
        z = stack_logits(self.teachers, x)
        w = fusion.weights(self.eval_strategy(), z, None, self.val_acc, self.fusion.tau)
        return fusion.fuse(z, w, 1.0, False).clamp_min(torch.finfo(torch.float32).tiny).log()

    def describe(self) -> list[dict[str, Any]]:
        return [t.describe() for t in self.teachers]


# -------------------------------------------------------------------------------------- loading
def load_teacher(cfg: TeacherConfig, i: int, classes: list[str], data_mean: Stats, data_std: Stats) -> Teacher:
    """Teacher i from its config: a `graftkd train` model file or a timm pretrained model, class list checked."""
    from graftkd.models import create_model, load_model_file

    if cfg.checkpoint is not None:
        model, meta = load_model_file(cfg.checkpoint)
        label = f"teacher {i} ({meta['arch']}, {cfg.checkpoint})"
        if "name" in cfg.model_fields_set and cfg.name.removeprefix("timm:") != meta["arch"]:
            raise UserError(f"{label}: the config names it '{cfg.name}' but the file holds a '{meta['arch']}'")
        file_classes = list(meta.get("classes") or [])
        if file_classes != list(classes):
            raise UserError(f"{label}: its classes {file_classes} ({len(file_classes)}) differ from the data's "
                            f"{list(classes)} ({len(classes)}); teachers must be trained on the same class list")
        mean, std, name, source = meta.get("mean"), meta.get("std"), str(meta["arch"]), str(cfg.checkpoint)
    elif isinstance(cfg.pretrained, Path):
        from graftkd.models.factory import read_weights_file

        model = create_model(cfg.name, num_classes=len(classes), pretrained=cfg.pretrained, **cfg.kwargs)
        state = read_weights_file(cfg.pretrained)
        clf = model.get_classifier() if hasattr(model, "get_classifier") else None
        key = next((n for n, p in model.named_parameters() if clf is not None and p is getattr(clf, "weight", None)), "")
        if key and (key not in state or state[key].shape != clf.weight.shape):
            raise UserError(f"teacher {i} ({cfg.name}, {cfg.pretrained}): its classifier does not have "
                            f"{len(classes)} outputs for the data's classes {list(classes)}; fine-tune it with "
                            f"`graftkd train` and pass the model file as checkpoint")
        mean, std, name, source = None, None, cfg.name, str(cfg.pretrained)
    elif cfg.pretrained:
        import timm

        timm_name = cfg.name.removeprefix("timm:")
        pcfg = timm.models.get_pretrained_cfg(timm_name)
        label = f"teacher {i} ({cfg.name}, timm pretrained)"
        if pcfg is None:
            raise UserError(f"{label}: timm has no pretrained weights for '{timm_name}'")
        if pcfg.num_classes != len(classes):
            raise UserError(f"{label}: its pretrained head has {pcfg.num_classes} classes, the data has "
                            f"{len(classes)} {list(classes)}; fine-tune it with `graftkd train` and pass the "
                            f"model file as checkpoint")
        if pcfg.label_names is not None and list(pcfg.label_names) != list(classes):
            raise UserError(f"{label}: its classes {list(pcfg.label_names)} differ from the data's {list(classes)}")
        model = create_model(cfg.name, num_classes=len(classes), pretrained=True, **cfg.kwargs)
        mean, std, name, source = pcfg.mean, pcfg.std, cfg.name, f"timm:{timm_name} (pretrained)"
    else:
        raise UserError(f"teacher {i} ({cfg.name}) has no weights: give `checkpoint:` (a `graftkd train` "
                        f"model file) or `pretrained: true` (a timm model)")
    mean = cfg.mean or (tuple(mean) if mean else data_mean)
    std = cfg.std or (tuple(std) if std else data_std)
    return Teacher(model, name, source, mean, std, data_mean, data_std)


def measure_val_accuracy(teachers: Sequence[Teacher], val_set: Any, run: Inference) -> torch.Tensor:
    """[K] accuracy of each teacher on ``val_set`` (one pass, all teachers per batch; one process)."""
    if len(val_set) == 0:
        raise UserError("teacher fusion needs a validation split to measure teacher accuracy, and it is empty")
    out = predict(lambda x: stack_logits(teachers, x, dim=1), eval_loader(val_set, run.batch_size, run.num_workers),
                  run.device, run.dtype)
    return (out["logits"].argmax(-1) == out["labels"][:, None]).float().mean(0)


def _stain(data: Any) -> Any:
    """The stain normalisation the validation images pass through (part of what a teacher sees)."""
    stain = getattr(data, "stain", None)
    return stain.describe() if stain is not None else None


def _read_json(path: Path | None) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}


def load_teachers(cfgs: Sequence[TeacherConfig], data: Any, fusion_cfg: FusionConfig, run: Inference,
                  run_dir: Path | None = None) -> TeacherEnsemble:
    """Load, freeze and score (with ``run``'s settings) the teachers of a run; fused with ``fusion_cfg``.

    Validation accuracies are measured once and kept in ``run_dir/cache/teacher_val.json`` (keyed
    by the teachers' checksums, normalisation and the validation records), so a resumed run reuses them.
    """
    if not cfgs:
        raise UserError("this method needs teachers: add a `teachers:` list to the config")
    teachers = [load_teacher(c, i, list(data.classes), tuple(data.mean), tuple(data.std)) for i, c in enumerate(cfgs)]
    for t in teachers:
        t.to(run.device)
    key = hashlib.sha256(json.dumps([[t.describe() for t in teachers], records_hash(data.val.records),
                                     data.image_size, str(run.dtype), _stain(data)], default=str).encode()).hexdigest()
    path = run_dir / "cache" / "teacher_val.json" if run_dir is not None else None
    # the runs of a study share their parent folder: one measurement serves them all
    shared = run_dir.parent / ".cache" / "teacher_val" / f"{key[:40]}.json" if run_dir is not None else None
    stored = next((s for s in (_read_json(p) for p in (path, shared)) if s.get("key") == key), None)
    if stored is not None:
        acc = torch.tensor(stored["val_accuracy"])
    else:
        acc = measure_val_accuracy(teachers, data.val, run)
    if path is not None:
        record = {"key": key, "teachers": [t.describe() for t in teachers], "val_accuracy": acc.tolist()}
        for p in (path, shared):
            if _read_json(p).get("key") != key:
                atomic_write_json(p, record)
    return TeacherEnsemble(teachers, fusion_cfg, acc).to(run.device)
