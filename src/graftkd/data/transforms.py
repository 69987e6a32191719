"""torchvision transforms v2 presets on uint8 CxHxW tensors, and the replayable-view seed.

``histology``: random resized crop, flips, 90-degree rotations, light colour jitter, normalise.
``cifar``: random crop with 4 px padding, horizontal flip, normalise.
``eval`` (also ``none`` for training): resize the short side, centre crop, normalise.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Stable 63-bit hash of integers (splitmix64 chain): the seed of view (seed, item, view)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def base_side(image_size: int) -> int:
    """Short side of the decoded base image (and of the decoded cache): a bit larger than image_size."""
    return math.ceil(image_size * 8 / 7)


class RandomRot90(nn.Module):
    """Rotate by k * 90 degrees, k uniform in {0, 1, 2, 3} (torch global RNG, so replayable)."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()).item())
        return torch.rot90(img, k, dims=(-2, -1)) if k else img


def _normalise(mean: tuple[float, float, float], std: tuple[float, float, float]) -> list[nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_transform(image_size: int, mean: tuple[float, float, float], std: tuple[float, float, float]) -> v2.Compose:
    """Deterministic: resize the short side to image_size, centre crop a square, normalise."""
    return v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), *_normalise(mean, std)])


def train_transform(preset: str, image_size: int, mean: tuple[float, float, float],
                    std: tuple[float, float, float]) -> v2.Compose:
    """Training augmentation preset (``histology``, ``cifar`` or ``none``)."""
    if preset == "histology":
        return v2.Compose([
            v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90(),
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),  # no hue: HSV round trip costs 5x the rest
            *_normalise(mean, std),
        ])
    if preset == "cifar":
        return v2.Compose([v2.Resize(image_size, antialias=True), v2.RandomCrop(image_size, padding=4),
                           v2.RandomHorizontalFlip(), *_normalise(mean, std)])
    if preset == "none":
        return eval_transform(image_size, mean, std)
    raise ValueError(f"unknown augmentation preset {preset!r}")
