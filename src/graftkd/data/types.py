"""Shared data types: records, datasets with replayable views, the bundle a run trains on."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch


@dataclass(frozen=True)
class Record:
    """One image. ``group`` is the patient for BreakHis (the image itself elsewhere); every split
    is computed on groups. ``path`` is None for in-memory sources (CIFAR: ``meta['index']``)."""

    path: str | None
    label: int
    group: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


class ViewDataset(Protocol):
    """A map-style dataset whose items are ``{"image", "label", "index", "view"}``.

    The augmentation of item i in view v is a pure function of (seed, i, v): ``load_view(i, v)``
    reproduces it exactly (the soft-target cache relies on it). ``set_epoch(e)`` chooses which
    view each item shows in epoch e: view e when ``views`` is None, else one of range(views)
    drawn from (seed, e, i).
    """

    records: list[Record]
    views: int | None

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def load_view(self, i: int, view: int) -> torch.Tensor: ...


@dataclass
class DataBundle:
    """What a run trains and evaluates on."""

    train: ViewDataset
    val: ViewDataset
    test: ViewDataset
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    info: dict[str, Any] = field(default_factory=dict)  # split seed, shots, source summary, ...
    #: writes ``splits.csv`` (every record with its split, before few-shot) into a run folder
    splits_writer: Callable[[Path], Path] | None = field(default=None, repr=False, compare=False)
    #: unlabelled transfer set (``data.unlabeled``): items labelled -1, ``index`` after the training set's
    unlabeled: ViewDataset | None = None
    #: the fitted stain normaliser (``data.stain_norm``), applied to every base image; None: off
    stain: Any = None

    def write_splits(self, run_dir: Path) -> Path | None:
        """Write ``run_dir/splits.csv`` (when the bundle was built without a run folder)."""
        if self.splits_writer is None:
            return None
        path = self.splits_writer(Path(run_dir))
        self.info.setdefault("split", {})["written"] = str(path)
        return path

    @property
    def num_classes(self) -> int:
        return len(self.classes)
