"""Loaders: the seeded, rank-sharded epoch sampler, the training loader and the one evaluation
loader (dataset order, every item once), and a network's predictions on a split."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from graftkd.config import ExperimentConfig
from graftkd.runtime import autocast_dtype, derived_seed, predict


class EpochSampler(Sampler[int]):
    """Seeded permutation per (seed, phase, epoch), sharded across ranks: rank r takes items
    r, r + W, r + 2W, ... so a step's local batches together are one contiguous global batch of the
    permutation (the same samples as one process with the global batch). Training shards are padded
    to equal length (every rank makes the same number of steps); evaluation shards (``pad=False``)
    are not, so every item is scored exactly once."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1,
                 pad: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.pad = n, seed, shuffle, pad
        self.rank, self.world_size = rank, world_size
        self.key = (0, 0)

    def set_epoch(self, phase: int, epoch: int, *sub: int) -> None:
        self.key = (phase, epoch, *sub)

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derived_seed(self.seed, *self.key))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world_size > 1:
            if self.pad:
                per = math.ceil(self.n / self.world_size)
                order = order + order[: per * self.world_size - self.n]
            order = order[self.rank:: self.world_size]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self._order())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))


def make_loader(dataset: Any, batch_size: int, sampler: Sampler, num_workers: int, drop_last: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())


class UnlabeledStream:
    """Batches of the unlabelled transfer set, as many as the labelled loop asks for.

    In labelled epoch ``(phase, epoch)`` the stream walks seeded permutations of the unlabelled set,
    pass k keyed ``(phase, epoch, k)`` (sharded across ranks like ``EpochSampler``); item i of pass k
    shows view ``global_epoch * 1024 + k`` (or one of the cache's V views). So the unlabelled images
    of a step depend only on (seed, phase, epoch, step), and resume at an epoch boundary is exact.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, num_workers: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), seed, shuffle=True, rank=rank, world_size=world_size)
        self.batch_size = min(batch_size, len(self.sampler)) or 1
        self.num_workers = num_workers
        self.key = (0, 0, 0)
        self._it: Iterator | None = None

    def start(self, phase: int, epoch: int, global_epoch: int) -> None:
        self.key = (phase, epoch, global_epoch)
        self._pass = 0
        self._it = None

    def _open(self) -> Iterator:
        phase, epoch, global_epoch = self.key
        self.sampler.set_epoch(phase, epoch, self._pass)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(global_epoch * 1024 + self._pass)
        self._pass += 1
        return iter(make_loader(self.dataset, self.batch_size, self.sampler, self.num_workers, drop_last=True))

    def next(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._open()
        try:
            return next(self._it)
        except StopIteration:
            self._it = self._open()
            return next(self._it)


def join_batches(labelled: dict[str, Any], unlabelled: dict[str, Any]) -> dict[str, Any]:
    """One training batch: the labelled images first, then the unlabelled ones, whose label is -1
    whatever their dataset holds (no label leaks); ``labeled`` marks which are which."""
    out = {k: torch.cat([labelled[k], unlabelled[k]]) for k in ("image", "index", "view")}
    out["label"] = torch.cat([labelled["label"], torch.full_like(unlabelled["label"], -1)])
    out["labeled"] = torch.cat([torch.ones(len(labelled["label"]), dtype=torch.bool),
                                torch.zeros(len(unlabelled["label"]), dtype=torch.bool)])
    return out


def eval_loader(dataset: Any, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """The evaluation loader: dataset order, no shuffling, no padding (each item once); under
    torchrun rank r gets items r, r + W, ... (possibly none: ``len(loader.sampler) == 0``)."""
    sampler = EpochSampler(len(dataset), 0, shuffle=False, rank=rank, world_size=world_size, pad=False)
    return make_loader(dataset, batch_size, sampler, num_workers, False)


def predict_split(fn: Callable[[torch.Tensor], torch.Tensor], dataset: Any, cfg: ExperimentConfig,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """``fn``'s logits on a whole split with the run's eval batch, workers and precision (one process)."""
    loader = eval_loader(dataset, cfg.data.eval_batch_size, cfg.data.num_workers)
    return predict(fn, loader, device, autocast_dtype(cfg, device), cfg.trainer.channels_last)
