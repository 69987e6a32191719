"""Process-group context: one process by default, torchrun (env://) when WORLD_SIZE > 1.

Trainable modules are kept in sync without wrapping them in ``DistributedDataParallel``:

* at the start of every phase, rank 0 broadcasts the phase's trainable parameters and the
  normalisation buffers (what DDP does at construction);
* after backward, the gradients of the phase's optimiser parameters are averaged across ranks in
  flat, per-dtype buckets (what DDP does during backward). A parameter that got no gradient on any
  rank keeps ``grad=None``, so the optimiser skips it exactly as in a single process; one that got
  a gradient on some ranks only counts as zero on the others (DDP's ``find_unused_parameters``);
* after every training epoch, the running statistics of BatchNorm layers in training mode are
  averaged across ranks. The running mean is then exactly the single-process running mean for the
  same global batch (it is linear in the batch means); the running variance misses the
  between-rank spread of the means. Batch statistics in the forward pass stay per rank (plain
  BatchNorm: ``SyncBatchNorm`` does not run on CPU).

Any method's forward (grafting hybrids, ATF's two networks, DML peers) works unchanged, and frozen
teachers, never in an optimiser, are never synchronised.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

#: gradient elements per all-reduce bucket (16 MiB of float32)
BUCKET_NUMEL = 1 << 22


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.enabled else None

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of ``params`` over ranks (see the module docstring)."""
        if not self.enabled or not params:
            return
        device = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        dist.all_reduce(has)
        live = [p for p, h in zip(params, has.tolist()) if h > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in live]):
            _average(bucket, self.world_size)

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values."""
        if not self.enabled:
            return
        with torch.no_grad():
            for bucket in _buckets([t.data for t in tensors]):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.broadcast(flat, src=0)
                _unflatten(flat, bucket)

    def average_norm_buffers_(self, module: nn.Module) -> None:
        """Average the running mean/var of normalisation layers in training mode over ranks."""
        if not self.enabled:
            return
        bufs = [b for m in norm_layers(module) if m.training
                for b in (m.running_mean, m.running_var) if b is not None]
        with torch.no_grad():
            for bucket in _buckets(bufs):
                _average(bucket, self.world_size)

    def merge_disjoint_(self, t: torch.Tensor, device: torch.device) -> None:
        """Give every rank all of ``t`` when each element was written by exactly one rank and is zero
        on the others (a byte-wise sum, exact for any dtype). ``device``: where the collective runs."""
        if not self.enabled:
            return
        flat = t.view(torch.uint8)  # t is contiguous: a byte view of the same memory
        buf = flat.to(device)
        dist.all_reduce(buf)
        if buf is not flat:
            flat.copy_(buf)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def norm_layers(module: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    """BatchNorm/InstanceNorm layers of ``module`` that track running statistics."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Group tensors by (device, dtype) into buckets of at most ``BUCKET_NUMEL`` elements."""
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    for t in tensors:
        if t.is_sparse:
            raise TypeError("sparse gradients are not supported under torchrun")
        key = (t.device, t.dtype)
        lists = groups.setdefault(key, [[]])
        if lists[-1] and sizes.get(key, 0) + t.numel() > BUCKET_NUMEL:
            lists.append([])
            sizes[key] = 0
        lists[-1].append(t)
        sizes[key] = sizes.get(key, 0) + t.numel()
    return [b for lists in groups.values() for b in lists if b]


def _average(bucket: list[torch.Tensor], world_size: int) -> None:
    """All-reduce-mean a bucket of floating tensors in place; 16-bit floats are summed in float32."""
    dtype = bucket[0].dtype
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    flat = torch.cat([t.reshape(-1).to(wide) for t in bucket])
    dist.all_reduce(flat)
    flat /= world_size
    _unflatten(flat, bucket)


def _unflatten(flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t))
        offset += n


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))
