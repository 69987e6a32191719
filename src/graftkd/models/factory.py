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


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a weights file: safetensors, or a torch file holding a state dict (or
    ``{"state_dict": ...}`` / ``{"model": ...}``, as training scripts save them)."""
    if not path.is_file():
        raise UserError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{path}: not a readable weights file ({str(e).splitlines()[0][:120]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds no state dict of tensors")
    return state


def check_weights(path: Path, state: dict[str, torch.Tensor], model: nn.Module, name: str,
                  skip: tuple[str, ...] = ()) -> None:
    """UserError naming ``path`` and the first key missing, extra or of another shape than in ``model``
    (keys starting with a ``skip`` prefix, a classifier timm re-initialises, are not compared)."""
    own = model.state_dict()
    for key, value in own.items():
        if key.startswith(skip):
            continue
        if key not in state:
            raise UserError(f"{path}: does not fit '{name}': it lacks key '{key}'")
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"{path}: does not fit '{name}': key '{key}' has shape {tuple(state[key].shape)} in the "
                            f"file, {tuple(value.shape)} in the model")
    extra = [k for k in state if k not in own and not k.startswith(skip)]
    if extra:
        raise UserError(f"{path}: does not fit '{name}': it has key '{extra[0]}' that the model does not have")


def _build(name: str, num_classes: int, pretrained: bool | str | Path, kwargs: dict[str, Any]) -> nn.Module:
    import timm
    if name.startswith(GRAFT_PREFIX):  # a grafted student that kept 1x1 junctions
        return GraftedStudent(_build(name[len(GRAFT_PREFIX):], num_classes, pretrained, kwargs))
    local = Path(pretrained) if isinstance(pretrained, (str, Path)) else None
    if not name.startswith(TIMM_PREFIX) and name in MODELS:
        if pretrained is True:
            raise UserError(f"model '{name}' has no pretrained weights; pass a trained model file as checkpoint")
        try:
            model = MODELS.get(name)(num_classes=num_classes, **kwargs)
        except TypeError as e:  # unexpected constructor kwargs
            raise UserError(f"model '{name}' (model.kwargs): {e}") from None
        if local is not None:
            state = read_weights_file(local)
            check_weights(local, state, model, name)
            model.load_state_dict(state)
        return model
    timm_name = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(timm_name):
        raise _unknown(name)
    try:
        if local is None:
            return timm.create_model(timm_name, pretrained=bool(pretrained), num_classes=num_classes, **kwargs)
        # a file on disk through timm's own loader; its classifier is kept when it has num_classes rows
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)
        state = read_weights_file(local)
        clf = timm.models.get_pretrained_cfg(timm_name).classifier if timm.models.get_pretrained_cfg(timm_name) else None
        clf_rows = state[f"{clf}.weight"].shape[0] if clf and f"{clf}.weight" in state else num_classes
        check_weights(local, state, model, name, skip=(f"{clf}.",) if clf and clf_rows != num_classes else ())
        return timm.create_model(timm_name, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay={"file": str(local), "num_classes": int(clf_rows)}, **kwargs)
    except TypeError as e:  # unexpected constructor kwargs
        raise UserError(f"model '{name}': {e}") from None


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool | str | Path = False,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` (ours first, else timm; ``timm:`` forces timm) with ``num_classes`` outputs.

    ``pretrained``: True for timm's hub weights, or a weights file on disk (checked key by key
    against the architecture, then loaded by timm through ``pretrained_cfg_overlay``; for our
    family loaded strictly).

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
    check_finite(state_dict, path)
    model.load_state_dict(state_dict, strict=True)


def check_finite(state_dict: dict[str, torch.Tensor], path: Path | str) -> None:
    """Refuse weights with NaN or inf, naming the first such tensor: no model is built, scored,
    exported or used as a teacher from them."""
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            n = int((~torch.isfinite(value)).sum())
            raise UserError(f"{path}: tensor '{key}' has {n} non-finite value(s) (NaN or inf) of {value.numel()}; "
                            f"a model with non-finite weights is refused")


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


def model_index() -> dict[str, Any]:
    """Every model name ``graftkd models`` lists, for the installed timm: ``{"timm": version, "ours":
    [...], "timm_models": [...]}`` (``list_models`` order). Stored as ``models/index.json`` so that
    listing imports neither torch nor timm; ``python -m graftkd.models.factory`` rewrites it and a
    test keeps it equal to this."""
    import timm

    ours = MODELS.names("*")
    return {"timm": timm.__version__, "ours": ours, "timm_models": [n for n in list_models("*") if n not in ours]}


def format_model_table(pattern: str = "*", params: bool = False, names: list[str] | None = None,
                       ours: set[str] | None = None) -> str:
    """Text table for ``graftkd models [pattern]``: name, source and, with ``params``, the parameter
    count of ours at 10 classes (built on the meta device). ``names``/``ours`` skip the registry
    lookups (the stored index)."""
    if names is None:
        names = list_models(pattern)
        ours = set(MODELS.names(pattern))
    ours = ours or set()
    rows = [("name", "source") + (("params@10",) if params else ())]
    for name in names:
        if name in ours:
            row: tuple[str, ...] = (name, "ours")
            if params:
                with torch.device("meta"):  # shapes only, no memory, no init cost
                    row += (f"{count_params(MODELS.get(name)(num_classes=10)) / 1e6:.2f}M",)
        else:
            row = (name, "timm") + (("-",) if params else ())
        rows.append(row)
    if len(rows) == 1:
        return f"no model matches '{pattern}'"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(f"{c:>{w}}" if i == 2 else f"{c:<{w}}" for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


if __name__ == "__main__":  # python -m graftkd.models.factory: rewrite models/index.json
    import json

    target = Path(__file__).resolve().parent / "index.json"
    target.write_text(json.dumps(model_index(), indent=0) + "\n")
    print(f"wrote {target}")
