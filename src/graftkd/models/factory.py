"""Create models by name (our CIFAR family first, then any timm model) and save/load model files.

A model file is a graftkd checkpoint (``graftkd.files.save_checkpoint``) holding::

    {"kind": "model", "arch", "num_classes", "classes", "mean", "std", "image_size",
     "state_dict", "extra"}

``arch`` is the canonical name (``_canonical``): our registry names as-is, timm names as-is unless
one of ours shadows them, then ``timm:<name>``. Constructor kwargs needed to rebuild the model are
kept in ``extra["model_kwargs"]``.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from graftkd.files import load_checkpoint, save_checkpoint
from graftkd.errors import UserError
from graftkd.models.cifar import MODELS, count_params
from graftkd.models.staged import GRAFT_PREFIX, GraftedStudent

# timm is imported inside the functions that need it: importing it costs seconds at start-up.
TIMM_PREFIX = "timm:"
MODEL_FILE_NAME = "model.pt"  # inside a run folder


def _canonical(name: str) -> str:
    """``timm:x`` -> ``x`` unless ``x`` is one of ours (then the prefix is needed to reach timm)."""
    if name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX):] not in MODELS:
        return name[len(TIMM_PREFIX):]
    return name


def _unknown(name: str) -> UserError:
    import timm
    known = list(MODELS) + timm.list_models()
    close = difflib.get_close_matches(name.removeprefix(TIMM_PREFIX), known, n=5, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return UserError(f"unknown model '{name}'{hint} (list them with `graftkd models [pattern]`)")


def _build(name: str, num_classes: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm
    if name.startswith(GRAFT_PREFIX):  # a grafted student that kept 1x1 junctions
        return GraftedStudent(_build(name[len(GRAFT_PREFIX):], num_classes, pretrained, kwargs))
    if not name.startswith(TIMM_PREFIX) and name in MODELS:
        if pretrained:
            raise UserError(f"model '{name}' has no pretrained weights; pass a trained model file as checkpoint")
        try:
            return MODELS.get(name)(num_classes=num_classes, **kwargs)
        except TypeError as e:  # unexpected constructor kwargs
            raise UserError(f"model '{name}' (model.kwargs): {e}") from None
    timm_name = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(timm_name):
        raise _unknown(name)
    try:
        return timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as e:  # unexpected constructor kwargs
        raise UserError(f"model '{name}': {e}") from None


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` (ours first, else timm; ``timm:`` forces timm) with ``num_classes`` outputs.

    ``checkpoint``: a model file or a run folder (``<run>/model.pt``); its arch and class count must
    match, and its weights are loaded strictly (``pretrained`` is then ignored).
    """
    if checkpoint is None:
        return _build(name, num_classes, pretrained, kwargs)
    path = _model_file_path(checkpoint)
    state = _read_model_file(path)
    if state["arch"] != _canonical(name):
        raise UserError(f"{path}: holds a '{state['arch']}' model, not '{_canonical(name)}'")
    if int(state["num_classes"]) != num_classes:
        raise UserError(f"{path}: has {state['num_classes']} classes, expected {num_classes}")
    model = _build(name, num_classes, False, kwargs)
    _load_state_dict(model, state["state_dict"], path)
    return model


def _model_file_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MODEL_FILE_NAME if path.is_dir() else path


def _read_model_file(path: Path) -> dict[str, Any]:
    state = load_checkpoint(path)
    if state.get("kind") != "model":
        raise UserError(f"{path}: not a model file (kind={state.get('kind')!r}, expected 'model')")
    missing = [k for k in ("arch", "num_classes", "state_dict") if k not in state]
    if missing:
        raise UserError(f"{path}: model file lacks key '{missing[0]}'")
    return state


def _load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load; UserError names the first missing/unexpected key or shape mismatch."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state_dict:
            raise UserError(f"{path}: state_dict lacks key '{key}' of the model")
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise UserError(
                f"{path}: key '{key}' has shape {tuple(state_dict[key].shape)} in the file, "
                f"{tuple(value.shape)} in the model"
            )
    extra = [k for k in state_dict if k not in own]
    if extra:
        raise UserError(f"{path}: state_dict has key '{extra[0]}' that the model does not have")
    model.load_state_dict(state_dict, strict=True)


def save_model_file(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    num_classes: int,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | Sequence[int],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a model file (see module docstring); tensors are saved on CPU."""
    if len(classes) != num_classes:
        raise UserError(f"{path}: {len(classes)} class names for num_classes={num_classes}")
    state = {
        "kind": "model",
        "arch": _canonical(arch),
        "num_classes": int(num_classes),
        "classes": list(classes),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "image_size": image_size if isinstance(image_size, int) else list(image_size),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    return save_checkpoint(Path(path), state)


def load_model_file(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a model file (or ``<run>/model.pt``) and load its weights.

    Returns ``(model, meta)``; meta is the file's dict without ``state_dict`` and ``format``.
    """
    path = _model_file_path(path)
    state = _read_model_file(path)
    kwargs = dict(state.get("extra", {}).get("model_kwargs", {}))
    model = _build(state["arch"], int(state["num_classes"]), False, kwargs)
    _load_state_dict(model, state["state_dict"], path)
    meta = {k: v for k, v in state.items() if k not in ("state_dict", "format")}
    return model, meta


def list_models(pattern: str = "*") -> list[str]:
    """Our registry names (first, sorted) then timm's (sorted); a timm name shadowed by ours is
    listed as ``timm:<name>``, so every entry is a valid ``create_model`` name and exactly the
    entries in ``MODELS`` are ours."""
    import timm
    ours = MODELS.names(pattern)
    theirs = [TIMM_PREFIX + n if n in MODELS else n for n in timm.list_models(pattern)]
    return ours + theirs


def format_model_table(pattern: str = "*") -> str:
    """Text table for ``graftkd models [pattern]``: name, source, params (ours, at 10 classes)."""
    rows = [("name", "source", "params@10")]
    for name in list_models(pattern):
        if name in MODELS:
            with torch.device("meta"):  # shapes only, no memory, no init cost
                params = f"{count_params(MODELS.get(name)(num_classes=10)) / 1e6:.2f}M"
            rows.append((name, "ours", params))
        else:
            rows.append((name, "timm", "-"))
    if len(rows) == 1:
        return f"no model matches '{pattern}'"
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}".rstrip() for r in rows)
