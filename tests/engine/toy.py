"""A tiny in-memory ViewDataset and network for engine tests (no data or models package needed)."""
from __future__ import annotations

import torch
from torch import nn

from graftkd.data.types import Record
from graftkd.runtime import derived_seed


class ToyViews(torch.utils.data.Dataset):
    """N random 3x8x8 images, label = sign of the mean of channel 0; view v flips by a seeded coin."""

    def __init__(self, n: int = 48, seed: int = 0, augment: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = (self.x[:, 0].mean((1, 2)) > 0).long()
        self.records = [Record(None, int(self.y[i]), f"p{i // 4}", {"index": i}) for i in range(n)]
        self.augment, self.seed, self.views, self.epoch = augment, seed, None, 0

    def __len__(self) -> int:
        return len(self.y)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load_view(self, i: int, view: int) -> torch.Tensor:
        img = self.x[i]
        if self.augment and derived_seed(self.seed, i, view) % 2:
            img = img.flip(-1)
        return img

    def __getitem__(self, i: int) -> dict:
        return {"image": self.load_view(i, self.epoch), "label": int(self.y[i]), "index": i, "view": self.epoch}


class ToyNet(nn.Module):
    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Dropout(0.3))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))
