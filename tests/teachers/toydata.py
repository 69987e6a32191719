"""A small in-memory image task with replayable views, and helpers to build a DataBundle and
teacher model files from it (no data package or real images needed)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graftkd.data.types import DataBundle, Record
from graftkd.runtime import derived_seed

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class ToyImages(torch.utils.data.Dataset):
    """``n`` normalised 3 x size x size images of ``classes`` classes: a class template (fixed
    smooth pattern) scaled by ``signal`` plus a random smooth nuisance pattern and pixel noise.
    View v of item i is a seeded flip + roll of up to 2 px (replayable: ``load_view``)."""

    def __init__(self, n: int, seed: int, classes: int = 3, size: int = 16, signal: float = 0.6,
                 augment: bool = True, task_seed: int = 1234) -> None:
        task = torch.Generator().manual_seed(task_seed)
        templates = nn.functional.avg_pool2d(torch.randn(classes, 3, size, size, generator=task), 5, 1, 2) * 3
        nuisance = nn.functional.avg_pool2d(torch.randn(8, 3, size, size, generator=task), 5, 1, 2) * 3
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % classes
        coef = torch.randn(n, 8, generator=g)
        x = signal * templates[self.y] + torch.einsum("nk,kchw->nchw", coef, nuisance) / 8 ** 0.5
        self.x = x + 0.5 * torch.randn(x.shape, generator=g)
        self.records = [Record(None, int(self.y[i]), f"g{seed}_{i}", {"index": i}) for i in range(n)]
        self.augment, self.seed, self.views, self.epoch = augment, seed, None, 0

    def __len__(self) -> int:
        return len(self.y)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_of(self, i: int) -> int:
        if not self.augment:
            return 0
        return self.epoch if self.views is None else derived_seed(self.seed, self.epoch, i) % self.views

    def load_view(self, i: int, view: int) -> torch.Tensor:
        img = self.x[i]
        if not self.augment:
            return img.clone()
        h = derived_seed(self.seed, i, view, 7)
        if h % 2:
            img = img.flip(-1)
        return torch.roll(img, shifts=((h >> 1) % 5 - 2, (h >> 4) % 5 - 2), dims=(-2, -1))

    def __getitem__(self, i: int) -> dict:
        v = self.view_of(i)
        return {"image": self.load_view(i, v), "label": int(self.y[i]), "index": i, "view": v}


def toy_bundle(n_train: int = 48, n_val: int = 30, n_test: int = 30, seed: int = 0, classes: int = 3,
               size: int = 16) -> DataBundle:
    return DataBundle(train=ToyImages(n_train, seed, classes, size),
                      val=ToyImages(n_val, seed + 1000, classes, size, augment=False),
                      test=ToyImages(n_test, seed + 2000, classes, size, augment=False),
                      classes=[f"c{k}" for k in range(classes)], mean=MEAN, std=STD, image_size=size)


def save_teacher(path: Path, model: nn.Module, arch: str, classes: list[str], mean=MEAN, std=STD) -> Path:
    from graftkd.models import save_model_file

    return save_model_file(path, model, arch=arch, num_classes=len(classes), classes=classes, mean=mean, std=std,
                           image_size=16)
