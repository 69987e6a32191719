"""torchvision transforms v2 presets on uint8 CxHxW tensors, and the replayable-view seed.

``histology``: random resized crop, flips, 90-degree rotations, light colour jitter, normalise.
``histology_stain``: ``histology`` plus HED stain jitter (``HEDJitter``, Tellez et al. 2019).
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


#: skimage.color's stain matrix (Ruifrok & Johnston 2001): rows are the RGB optical densities of
#: haematoxylin, eosin and DAB; ``rgb2hed`` multiplies optical density by its inverse
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def hed_jitter_matrices(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The jitter of HED stains ``s' = alpha * s + beta`` (per image, per stain; ``alpha``, ``beta``
    [B, 3]) as one affine map of optical density ``d = -log(rgb)`` (rows [.., 3]): ``d' = d @ M + t``
    with ``M = hed_from_rgb diag(alpha) rgb_from_hed`` [B, 3, 3] and ``t = beta @ rgb_from_hed`` [B, 3]."""
    a, b = alpha.double(), beta.double()
    m = HED_FROM_RGB[None] * a[:, None, :] @ RGB_FROM_HED[None]
    return m.float(), (b @ RGB_FROM_HED).float()


def hed_jitter(img: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Tellez et al. (2019) HED augmentation of uint8 images ([3, H, W] or [B, 3, H, W]): each
    image's haematoxylin, eosin and DAB channels ``s = -log(rgb) @ hed_from_rgb`` (skimage's
    ``rgb2hed`` as Tellez et al. used it: optical density, before skimage 0.19 divided it by
    -log(1e-6); rgb in [1e-6, 1]) become ``alpha * s + beta``, then back to RGB (``exp(-s @
    rgb_from_hed)``), rounded to uint8. ``alpha``, ``beta``: [3] or [B, 3]. Batched: a 256-entry
    log table, one 3x3 matmul per image, one exp. No clip of negative stains (skimage's ``rgb2hed``
    clips them to 0), so alpha = 1, beta = 0 is the identity."""
    single = img.dim() == 3
    x = img[None] if single else img
    if x.dtype != torch.uint8 or x.shape[1] != 3:
        raise ValueError(f"hed_jitter needs uint8 RGB images, got {x.dtype} {tuple(x.shape)}")
    b, _, h, w = x.shape
    m, t = hed_jitter_matrices(alpha.reshape(-1, 3).expand(b, 3), beta.reshape(-1, 3).expand(b, 3))
    d = _OD_TABLE[x.reshape(b, 3, h * w).long()]  # [B, 3, HW]: -log(max(v / 255, 1e-6))
    d = m.transpose(1, 2) @ d + t[:, :, None]
    out = torch.exp(d.neg_()).mul_(255.0).clamp_(0, 255).round_().to(torch.uint8).view(b, 3, h, w)
    return out[0] if single else out


_OD_TABLE = (-torch.log(torch.clamp(torch.arange(256, dtype=torch.float64) / 255, min=1e-6))).float()


class HEDJitter(nn.Module):
    """HED stain jitter (Tellez et al. 2019) of a uint8 image: per stain, ``alpha ~ U(1 - scale,
    1 + scale)`` and ``beta ~ U(-shift, shift)`` drawn from torch's global RNG (which a replayable
    view seeds, so view v of item i is the same image every time it is replayed)."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = float(scale), float(shift)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        u = torch.rand(2, 3)
        alpha = 1 + self.scale * (2 * u[0] - 1)
        beta = self.shift * (2 * u[1] - 1)
        return hed_jitter(img, alpha, beta)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, shift={self.shift}"


def _normalise(mean: tuple[float, float, float], std: tuple[float, float, float]) -> list[nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_transform(image_size: int, mean: tuple[float, float, float], std: tuple[float, float, float]) -> v2.Compose:
    """Deterministic: resize the short side to image_size, centre crop a square, normalise."""
    return v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), *_normalise(mean, std)])


def train_transform(preset: str, image_size: int, mean: tuple[float, float, float],
                    std: tuple[float, float, float], stain_scale: float = 0.05,
                    stain_shift: float = 0.05) -> v2.Compose:
    """Training augmentation preset (``histology``, ``histology_stain``, ``cifar`` or ``none``);
    ``stain_scale``/``stain_shift``: the HED jitter strengths of ``histology_stain``."""
    if preset in ("histology", "histology_stain"):
        stain = [HEDJitter(stain_scale, stain_shift)] if preset == "histology_stain" else []
        return v2.Compose([
            v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90(), *stain,
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),  # no hue: HSV round trip costs 5x the rest
            *_normalise(mean, std),
        ])
    if preset == "cifar":
        return v2.Compose([v2.Resize(image_size, antialias=True), v2.RandomCrop(image_size, padding=4),
                           v2.RandomHorizontalFlip(), *_normalise(mean, std)])
    if preset == "none":
        return eval_transform(image_size, mean, std)
    raise ValueError(f"unknown augmentation preset {preset!r}")
