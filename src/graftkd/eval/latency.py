"""Size and speed of a network or of several run together (an ensemble): parameters, MACs,
safetensors bytes on disk, and CPU latency (median over repeats, warm-up excluded; several networks
are measured interleaved, ``profile_interleaved``)."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from graftkd.models import count_params


def _as_list(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


def _forward_all(models: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run every network on ``x``; several are fused as the mean of their softmax (the ensemble)."""
    if len(models) == 1:
        return models[0](x)
    return torch.stack([m(x).softmax(-1) for m in models]).mean(0)


def count_macs(model: nn.Module | Sequence[nn.Module], image_size: int, channels: int = 3) -> int:
    """Multiply-accumulates of one image (FLOPs counted by torch's FlopCounterMode, / 2)."""
    models = _as_list(model)
    x = torch.zeros(1, channels, image_size, image_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        _forward_all(models, x)
    return int(counter.get_total_flops()) // 2


def size_on_disk(model: nn.Module | Sequence[nn.Module]) -> int:
    """Bytes of the safetensors file(s) holding the weights (buffers included)."""
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, m in enumerate(_as_list(model)):
            path = Path(tmp) / f"{i}.safetensors"
            save_model(m, str(path))
            total += path.stat().st_size
    return total


def measure_latency(model: nn.Module | Sequence[nn.Module], image_size: int, batch_size: int, repeats: int = 20,
                    warmup: int = 3, channels: int = 3) -> float:
    """Median wall time in milliseconds of one forward pass on CPU (inference mode, eval mode)."""
    models = _as_list(model)
    x = torch.randn(batch_size, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            _forward_all(models, x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def profile_model(model: nn.Module | Sequence[nn.Module], image_size: int, batch_sizes: Sequence[int] = (1, 64),
                  repeats: int = 20, warmup: int = 3) -> dict[str, float | int]:
    """Params, MACs, safetensors size and CPU latency ``ms_b<batch>`` of a network or an ensemble.

    The networks are moved to CPU and put in eval mode (their training flag is restored after)."""
    models = _as_list(model)
    states = [m.training for m in models]
    devices = [next(m.parameters(), torch.zeros(())).device for m in models]
    for m in models:
        m.cpu().eval()
    try:
        out: dict[str, float | int] = {
            "networks": len(models),
            "params": count_params(models),
            "macs": count_macs(models, image_size),
            "size_bytes": size_on_disk(models),
            "image_size": image_size,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
        }
        for b in batch_sizes:
            out[f"ms_b{b}"] = round(measure_latency(models, image_size, b, repeats, warmup), 3)
        if 1 in batch_sizes:
            out["img_s_b1"] = round(1000.0 / out["ms_b1"], 1)
        return out
    finally:
        for m, training, dev in zip(models, states, devices):
            m.to(dev).train(training)


def _static(models: list[nn.Module], image_size: int, repeats: int) -> dict[str, float | int]:
    return {"networks": len(models), "params": count_params(models), "macs": count_macs(models, image_size),
            "size_bytes": size_on_disk(models), "image_size": image_size, "threads": torch.get_num_threads(),
            "repeats": repeats}


def profile_interleaved(networks: Mapping[str, nn.Module | Sequence[nn.Module]], image_size: int,
                        batch_sizes: Sequence[int] = (1, 64), repeats: int = 20, warmup: int = 3,
                        reference: str | None = None, channels: int = 3) -> dict[str, dict[str, Any]]:
    """``profile_model`` of several networks measured together, fairly on a shared machine: in each
    of ``warmup + repeats`` rounds every network runs one forward pass, in an order that rotates from
    round to round, so a burst of load hits them alike; ``ms_b<batch>`` is each network's median
    over the timed rounds. With ``reference`` (a key of ``networks``), ``speedup_b<batch>`` is the
    median over rounds of the per-round ratio reference time / network time (two copies of one
    architecture then agree within noise, where two medians measured one after the other did not)."""
    names = list(networks)
    models = {n: _as_list(m) for n, m in networks.items()}
    everything = list({id(m): m for ms in models.values() for m in ms}.values())
    states = [m.training for m in everything]
    devices = [next(m.parameters(), torch.zeros(())).device for m in everything]
    for m in everything:
        m.cpu().eval()
    try:
        out: dict[str, dict[str, Any]] = {n: _static(models[n], image_size, repeats) for n in names}
        for b in batch_sizes:
            x = torch.randn(b, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
            times: dict[str, list[float]] = {n: [] for n in names}
            with torch.inference_mode():
                for r in range(warmup + repeats):
                    k = r % len(names)
                    for n in names[k:] + names[:k]:
                        t0 = time.perf_counter()
                        _forward_all(models[n], x)
                        if r >= warmup:
                            times[n].append(time.perf_counter() - t0)
            for n in names:
                out[n][f"ms_b{b}"] = round(statistics.median(times[n]) * 1000.0, 3)
                if reference is not None:
                    out[n][f"speedup_b{b}"] = round(statistics.median(
                        t_ref / t for t_ref, t in zip(times[reference], times[n])), 3)
            if b == 1:
                for n in names:
                    out[n]["img_s_b1"] = round(1000.0 / out[n]["ms_b1"], 1)
        for n in names:
            out[n]["measured"] = "interleaved"
            if reference is not None:
                out[n]["speedup_reference"] = reference
        return out
    finally:
        for m, training, dev in zip(everything, states, devices):
            m.to(dev).train(training)


def latency_entry(student: nn.Module, teachers: Sequence[tuple[str, nn.Module]], image_size: int,
                  repeats: int = 20) -> dict[str, Any]:
    """The ``latency`` entry of metrics.json: the student, each teacher and the teachers run together
    (the ensemble), measured interleaved (``profile_interleaved``); with teachers, each entry's
    ``speedup_b<batch>`` is against the ensemble."""
    nets: dict[str, nn.Module | list[nn.Module]] = {"student": student}
    for k, (_, m) in enumerate(teachers):
        nets[f"teacher {k}"] = m
    if teachers:
        nets["ensemble"] = [m for _, m in teachers]
    prof = profile_interleaved(nets, image_size, repeats=repeats, reference="ensemble" if teachers else None)
    out: dict[str, Any] = {"student": prof["student"]}
    if teachers:
        out["teachers"] = [{"name": name, **prof[f"teacher {k}"]} for k, (name, _) in enumerate(teachers)]
        out["ensemble"] = prof["ensemble"]
    return out
