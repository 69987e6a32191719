"""Ship a run's student: ``student.safetensors`` + ``model_card.json`` and ``student.onnx``.

The ONNX file has a dynamic batch axis and is checked against PyTorch with onnxruntime on a batch
(max abs difference < ``ONNX_TOLERANCE``) before it is written; a mismatch is a loud UserError.
``load_exported`` rebuilds a callable model from the exported files alone (no run folder).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from graftkd.files import FolderLock, atomic_write_bytes, atomic_write_json, default_file_mode
from graftkd.errors import UserError

FORMATS = ("safetensors", "onnx")
CARD_NAME = "model_card.json"
SAFETENSORS_NAME = "student.safetensors"
ONNX_NAME = "student.onnx"
CARD_FORMAT = "graftkd-model-card-v1"
STAIN_KEY = "stain_normalization"  # as graftkd.data.stain.STAIN_KEY (export does not import data)
ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4
ONNX_CHECK_BATCH = 5  # differs from the export batch (2), so the dynamic axis is exercised
PREPROCESS = "decode RGB, resize the short side to image_size, centre crop, scale to [0, 1], (x - mean) / std"

Predictor = Callable[[torch.Tensor], torch.Tensor]


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``image_size`` of a model file or card as (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _model_path(run_or_model: Path) -> Path:
    path = Path(run_or_model)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path} not found: pass a run folder (with model.pt) or a model file")
    return path


def build_card(meta: dict[str, Any], model: nn.Module, run_dir: Path | None) -> dict[str, Any]:
    """The model card: architecture, classes, normalisation, input, metrics, config hash, params."""
    h, w = image_hw(meta["image_size"])
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "arch": meta["arch"],
        "model_kwargs": dict(meta.get("extra", {}).get("model_kwargs", {})),
        "num_classes": int(meta["num_classes"]),
        "classes": list(meta["classes"]),
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "image_size": meta["image_size"],
        "input": {"name": "input", "shape": ["batch", 3, h, w], "dtype": "float32", "layout": "NCHW",
                  "preprocess": PREPROCESS},
        "output": {"name": "logits", "shape": ["batch", int(meta["num_classes"])]},
        "params": sum(p.numel() for p in model.parameters()),
        "metrics": {},
        "config_sha256": None,
        "source": {k: v for k, v in meta.get("extra", {}).items() if k not in ("model_kwargs", STAIN_KEY)},
        # the fitted stain normaliser (data.stain_norm): predict applies it to every decoded image
        STAIN_KEY: meta.get("extra", {}).get(STAIN_KEY),
    }
    if run_dir is not None:
        cfg = run_dir / "config.yaml"
        if cfg.is_file():
            card["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
        mpath = run_dir / "metrics.json"
        if mpath.is_file():
            metrics = json.loads(mpath.read_text())
            keys = ("n", "accuracy", "balanced_accuracy", "roc_auc", "patient_recognition_rate", "n_patients")
            card["metrics"] = {split: {k: metrics[split][k] for k in keys if k in metrics[split]}
                               for split in ("val", "test") if isinstance(metrics.get(split), dict)}
    return card


def write_safetensors(model: nn.Module, path: Path) -> Path:
    """Atomically write the weights (shared tensors stored once) as safetensors."""
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_model(model, tmp)
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 -> the mode of every other output
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"writing {path} failed ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def onnx_bytes(model: nn.Module, hw: tuple[int, int], exporter: str = "dynamo") -> bytes:
    """Export to ONNX (opset ``ONNX_OPSET``, dynamic batch axis named ``batch``).

    ``exporter``: ``dynamo`` (torch.export based, the maintained one) or ``legacy`` (TorchScript
    tracing, deprecated but much faster to run); both are verified the same way."""
    import onnx

    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(model, (x,), input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        opset_version=ONNX_OPSET, dynamo=True, verbose=False)
            onnx.save_model(program.model_proto, buf)
        elif exporter == "legacy":
            torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=ONNX_OPSET, dynamo=False)
        else:
            raise UserError(f"unknown ONNX exporter '{exporter}' (dynamo or legacy)")
    return buf.getvalue()


def onnx_session(data: bytes | str | Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = data if isinstance(data, bytes) else str(data)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def verify_onnx(data: bytes, model: nn.Module, hw: tuple[int, int], batch: int = ONNX_CHECK_BATCH) -> float:
    """Max abs difference between onnxruntime and PyTorch logits on a random batch; UserError
    when it is not below ``ONNX_TOLERANCE`` (or the shapes differ)."""
    x = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(x).float()
    got = torch.from_numpy(onnx_session(data).run(None, {"input": x.numpy()})[0])
    if got.shape != ref.shape:
        raise UserError(f"ONNX export check failed: onnxruntime output shape {tuple(got.shape)} != "
                        f"PyTorch {tuple(ref.shape)} at batch {batch}; student.onnx was not written")
    diff = float((got - ref).abs().max())
    if not diff < ONNX_TOLERANCE:
        raise UserError(f"ONNX export check failed: max |onnxruntime - PyTorch| = {diff:.3g} >= {ONNX_TOLERANCE} "
                        f"on a batch of {batch}; student.onnx was not written")
    return diff


def export_model(run_or_model: str | Path, formats: Sequence[str] = FORMATS, out_dir: str | Path | None = None,
                 exporter: str = "dynamo") -> dict[str, Path]:
    """Export ``<run>/model.pt`` (or a model file) to ``out_dir`` (default: beside the model file).
    Returns the written paths by kind (``safetensors``, ``onnx``, ``card``)."""
    from graftkd.models import load_model_file

    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"export --format: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    path = _model_path(Path(run_or_model))
    model, meta = load_model_file(path)
    model.eval()
    run_dir = path.parent
    out = Path(out_dir) if out_dir is not None else run_dir
    card = build_card(meta, model, run_dir)
    hw = image_hw(meta["image_size"])
    with FolderLock(out):  # one writer: not into a run folder a run is still writing
        return _export_into(model, formats, out, card, hw, exporter)


def _export_into(model: nn.Module, formats: Sequence[str], out: Path, card: dict[str, Any], hw: Any,
                 exporter: str) -> dict[str, Path]:
    files: dict[str, str] = {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    except OSError as e:
        raise UserError(f"cannot write the export to {out}: {e.strerror or e}") from None
    try:  # every file is made in a temporary folder first: an export is complete or absent
        if "safetensors" in formats:
            write_safetensors(model, stage / SAFETENSORS_NAME)
            files["safetensors"] = SAFETENSORS_NAME
        if "onnx" in formats:
            data = onnx_bytes(model, hw, exporter)
            card["onnx_check"] = {"batch": ONNX_CHECK_BATCH, "max_abs_diff": verify_onnx(data, model, hw),
                                  "tolerance": ONNX_TOLERANCE, "opset": ONNX_OPSET, "exporter": exporter}
            atomic_write_bytes(stage / ONNX_NAME, data)
            files["onnx"] = ONNX_NAME
        card["files"] = files
        atomic_write_json(stage / CARD_NAME, card)
        written: dict[str, Path] = {}
        for kind, name in [*files.items(), ("card", CARD_NAME)]:  # the card last: it names the files
            os.replace(stage / name, out / name)
            written[kind] = out / name
    except OSError as e:
        raise UserError(f"cannot write the export to {out}: {e.strerror or e}") from None
    finally:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
    return written


def _card_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("arch", "num_classes", "classes", "mean", "std", "image_size")
    return {**{k: meta[k] for k in keys}, "model_kwargs": dict(meta.get("extra", {}).get("model_kwargs", {})),
            STAIN_KEY: meta.get("extra", {}).get(STAIN_KEY)}


def _read_card(folder: Path) -> dict[str, Any]:
    path = folder / CARD_NAME
    if not path.is_file():
        raise UserError(f"{folder} has no {CARD_NAME}: export it with `graftkd export RUN`")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    missing = [k for k in ("arch", "num_classes", "classes", "mean", "std", "image_size") if k not in card]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}")
    return card


def load_exported(path: str | Path, backend: str = "auto") -> tuple[Predictor, dict[str, Any]]:
    """A logits function of normalised NCHW float32 images, and the model card, from an export
    folder, a ``.safetensors``/``.onnx`` file beside its card, or a graftkd model file (``.pt``).

    ``backend``: ``torch`` (safetensors), ``onnx`` (onnxruntime) or ``auto`` (safetensors if present)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    run_folder = path.is_dir() and (path / "model.pt").is_file() and not (path / CARD_NAME).is_file()
    if (path.is_file() and path.suffix == ".pt") or run_folder:
        from graftkd.models import load_model_file

        model, meta = load_model_file(path)
        return _torch_predictor(model.eval()), _card_from_meta(meta)
    folder = path if path.is_dir() else path.parent
    card = _read_card(folder)
    st, ox = folder / SAFETENSORS_NAME, folder / ONNX_NAME
    if path.is_file():
        st, ox = (path, None) if path.suffix == ".safetensors" else (None, path)
    use_torch = backend == "torch" or (backend == "auto" and st is not None and st.is_file())
    if use_torch:
        if st is None or not st.is_file():
            raise UserError(f"{folder}: no {SAFETENSORS_NAME} for backend=torch")
        from safetensors.torch import load_model

        from graftkd.models import create_model

        model = create_model(card["arch"], int(card["num_classes"]), **card.get("model_kwargs", {}))
        try:
            load_model(model, str(st), strict=True)
        except (RuntimeError, OSError) as e:
            raise UserError(f"{st}: weights do not fit {card['arch']} ({str(e).splitlines()[0][:200]})") from None
        from graftkd.models.factory import check_finite

        check_finite(model.state_dict(), st)
        return _torch_predictor(model.eval()), card
    if ox is None or not ox.is_file():
        raise UserError(f"{folder}: neither {SAFETENSORS_NAME} nor {ONNX_NAME} found")
    session = onnx_session(ox)
    name = session.get_inputs()[0].name

    def run_onnx(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().float().cpu().numpy()})[0])

    return run_onnx, card


def _torch_predictor(model: nn.Module) -> Predictor:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x).float()

    return run
