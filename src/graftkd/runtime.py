"""Where and how tensors run: device, precision (autocast), seeding, threads, moving batches,
running a network over a loader, and the settings of such a pass (``Inference``). Ground floor:
imports only torch, numpy, the config and the distributed context.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from graftkd.config import ExperimentConfig, TrainerConfig
from graftkd.distributed import DistContext
from graftkd.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device = 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_native_bf16() -> bool:
    """Whether torch reports native bf16 arithmetic on this CPU (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(cfg: ExperimentConfig, device: torch.device) -> tuple[str, str]:
    """``(what runs, why)``: ``"bf16"`` (autocast) or ``"fp32"``. ``trainer.precision: auto`` is bf16 on
    CUDA with bf16 and on CPUs with native bf16, fp32 elsewhere, and fp32 for a method that
    standardises logits: bf16 rounds close logits to a tie and Z() divides by their spread."""
    asked = cfg.trainer.precision
    if asked != "auto":
        return asked, "trainer.precision"
    if getattr(cfg.method, "standardize", False):
        return "fp32", "auto: method.standardize (Z() of bf16-rounded logits can divide by a zero spread)"
    if device.type == "cuda":
        return ("bf16", "auto: CUDA with bf16") if torch.cuda.is_bf16_supported() else ("fp32", "auto: CUDA without bf16")
    if device.type == "cpu" and cpu_native_bf16():
        return "bf16", f"auto: CPU with native bf16 (capability {torch.backends.cpu.get_cpu_capability()})"
    return "fp32", f"auto: {device.type} without native bf16 (capability {torch.backends.cpu.get_cpu_capability()})"


def autocast_dtype(cfg: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``resolve_precision`` picks: bf16, or None (fp32)."""
    return torch.bfloat16 if resolve_precision(cfg, device)[0] == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_torch(cfg: TrainerConfig) -> None:
    """Process-wide settings of ``trainer``: intra-op threads and cuDNN determinism."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "image" and channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


@torch.no_grad()  # not inference_mode: on CPU its convolutions ran ~15% slower (issue 25)
def predict(fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[dict[str, Any]], device: torch.device,
            dtype: torch.dtype | None = None, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Run ``fn`` over a loader: float32 logits, labels and dataset indices, on CPU, in loader order."""
    logits, labels, index = [], [], []
    for batch in loader:
        b = to_device(batch, device, channels_last)
        with autocast(device, dtype):
            out = fn(b["image"])
        logits.append(out.float().cpu())
        labels.append(batch["label"].cpu())
        index.append(batch["index"].cpu())
    return {"logits": torch.cat(logits), "labels": torch.cat(labels), "index": torch.cat(index)}


@dataclass(frozen=True)
class Inference:
    """How frozen networks are run over a dataset (teacher scoring, the soft-target cache): the
    device, the batch, loader workers, the autocast dtype (None: fp32) and the ranks sharing it."""

    device: torch.device
    batch_size: int
    num_workers: int = 0
    dtype: torch.dtype | None = None
    dist: DistContext = field(default_factory=DistContext)

    @classmethod
    def of(cls, cfg: ExperimentConfig, device: torch.device, dist: DistContext) -> "Inference":
        """The run's settings: ``data.eval_batch_size``, ``data.num_workers``, the resolved precision."""
        return cls(device, cfg.data.eval_batch_size, cfg.data.num_workers, autocast_dtype(cfg, device), dist)


def code_revision() -> dict[str, str]:
    """``commit``: ``git rev-parse HEAD`` of the checkout graftkd is imported from; ``code``: the git
    tree of the package source at HEAD (what reuse keys on: commits that change only benchmarks,
    configs, docs or tests leave it unchanged). Both get ``+dirty.<hash>`` when the package source
    differs from HEAD; outside a git checkout both are the package version."""
    pkg = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        tree = git("rev-parse", f"HEAD:{git('rev-parse', '--show-prefix').strip()}").strip()
        status = git("status", "--porcelain", "--untracked-files=all", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = f"graftkd-{version('graftkd')}"
        except PackageNotFoundError:
            v = "unknown"
        return {"commit": v, "code": v}
    if not status.strip():
        return {"commit": head, "code": tree}
    h = hashlib.sha256(git("diff", "HEAD", "--", ".").encode())
    for line in sorted(status.splitlines()):
        if line.startswith("??"):
            f = Path(git("rev-parse", "--show-toplevel").strip()) / line[3:]
            h.update(f.read_bytes() if f.is_file() else b"")
    dirty = f"+dirty.{h.hexdigest()[:12]}"
    return {"commit": head + dirty, "code": tree + dirty}
