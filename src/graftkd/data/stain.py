"""Stain normalisation of H&E images (uint8 CxHxW), fitted to a reference: Macenko (2009) and
Reinhard (2001).

The computations are those of torchstain 1.4.1's torch backend (MIT; Macenko after Macenko et
al.'s reference code, Reinhard after HistomicsTK/StainTools), ported here rather than depended on:
torchstain's wheel also installs a top-level ``tests`` package into site-packages, which shadows
this project's ``tests`` package. ``tests/data/test_stain.py`` checks both against the papers'
definitions.

- ``macenko``: optical density ``OD = -log((I + 1) / Io)``; pixels with ``OD >= beta`` in every
  channel are tissue; the plane of the two largest eigenvectors of their OD covariance holds the
  stains, whose vectors are the ``alpha``-th and ``100 - alpha``-th percentile angles in it
  (haematoxylin first: the larger red component); concentrations by least squares, and their 99th
  percentiles. An image is normalised by scaling its concentrations to the reference's percentiles
  and recomposing them with the reference's stain matrix (``Io = 240``, ``alpha = 1``, ``beta =
  0.15``, the paper's values). An image with fewer than ``MIN_TISSUE`` tissue pixels has no stain
  estimate and is kept as it is.
- ``reinhard``: per LAB channel (CIE-LAB of sRGB, D65, OpenCV scaling), ``(x - mean) / sd`` of the
  image, times the reference's sd plus its mean.

A fitted normaliser is plain JSON (``describe``/``from_description``): the run folder's
``stain_reference.json``, the model file and the exported card hold it, so ``predict`` normalises
new images as training did.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from graftkd.errors import UserError

IO, ALPHA, BETA = 240, 1, 0.15
#: the fitted normaliser in a run folder, and its key in model files (``extra``) and model cards
STAIN_FILE, STAIN_KEY = "stain_reference.json", "stain_normalization"
MIN_TISSUE = 64


# --------------------------------------------------------------------------------------- Macenko
def percentile(t: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of a 1-D tensor, nearest rank (``1 + round(q/100 (n - 1))``-th smallest)."""
    k = 1 + round(0.01 * float(q) * (t.numel() - 1))
    return t.reshape(-1).kthvalue(k).values


def optical_density(img: torch.Tensor) -> torch.Tensor:
    """[N, 3] optical density ``-log((I + 1) / Io)`` of a uint8 [3, ...] image's pixels."""
    return -torch.log((img.reshape(3, -1).T.float() + 1) / IO)


def tissue_pixels(img: torch.Tensor) -> int:
    """Pixels Macenko estimates stains from: optical density >= beta in every channel."""
    return int((optical_density(img) >= BETA).all(1).sum())


def macenko_stains(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stain matrix [3, 2] (haematoxylin, eosin), concentrations [2, N] and their 99th percentiles [2]."""
    od = optical_density(img)
    tissue = od[(od >= BETA).all(1)]
    centred = tissue.T - tissue.T.mean(1, keepdim=True)
    _, eigvecs = torch.linalg.eigh(centred @ centred.T / (tissue.shape[0] - 1))
    plane = eigvecs[:, [1, 2]]
    proj = tissue @ plane
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    lo, hi = percentile(phi, ALPHA), percentile(phi, 100 - ALPHA)
    v_lo = (plane @ torch.stack((torch.cos(lo), torch.sin(lo))))[:, None]
    v_hi = (plane @ torch.stack((torch.cos(hi), torch.sin(hi))))[:, None]
    he = torch.cat((v_lo, v_hi), 1) if v_lo[0] > v_hi[0] else torch.cat((v_hi, v_lo), 1)
    conc = torch.linalg.lstsq(he, od.T).solution
    return he, conc, torch.stack([percentile(conc[0], 99), percentile(conc[1], 99)])


# -------------------------------------------------------------------------------------- Reinhard
_RGB2XYZ = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def rgb2lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE-LAB (D65) of an sRGB float image [3, ...] in [0, 1], OpenCV scaling: L * 2.55, a + 128, b + 128."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.tensordot(_RGB2XYZ, lin, dims=([1], [0])) / _WHITE.view(3, *([1] * (rgb.dim() - 1)))
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([(116 * f[1] - 16) * 2.55, 500 * (f[0] - f[1]) + 128, 200 * (f[1] - f[2]) + 128])


def lab2rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb2lab``, clipped to [0, 1]; [3, ...]."""
    y = (lab[0] / 2.55 + 16) / 116
    f = torch.stack([(lab[1] - 128) / 500 + y, y, y - (lab[2] - 128) / 200])
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787) * _WHITE.view(3, *([1] * (lab.dim() - 1)))
    lin = torch.tensordot(torch.linalg.inv(_RGB2XYZ), xyz, dims=([1], [0]))
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0) ** (1 / 2.4) - 0.055, lin * 12.92)
    return rgb.clamp(0, 1)


def lab_stats(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd (unbiased) per channel of a uint8 image in LAB units (L 0-100, a and b centred)."""
    lab = rgb2lab(img.float() / 255).reshape(3, -1)
    lab = lab - torch.tensor([0.0, 128.0, 128.0])[:, None]
    lab[0] /= 2.55
    return lab.mean(1), lab.std(1)


# ------------------------------------------------------------------------------------ normaliser
class StainNormalizer:
    """A fitted normaliser: ``__call__(uint8 [3, H, W]) -> uint8 [3, H, W]``."""

    def __init__(self, method: str, params: dict[str, list], fitted_on: dict[str, Any]) -> None:
        if method not in ("macenko", "reinhard"):
            raise ValueError(f"unknown stain normalisation {method!r}")
        self.method, self.params, self.fitted_on = method, params, fitted_on
        if method == "macenko":
            self.he_ref = torch.tensor(params["stain_matrix"], dtype=torch.float32)
            self.max_c_ref = torch.tensor(params["max_concentrations"], dtype=torch.float32)
        else:
            self.mean_ref = torch.tensor(params["lab_mean"], dtype=torch.float32)
            self.std_ref = torch.tensor(params["lab_std"], dtype=torch.float32)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"stain normalisation needs a uint8 [3, H, W] image, got {img.dtype} {tuple(img.shape)}")
        if self.method == "macenko":
            if tissue_pixels(img) < MIN_TISSUE:
                return img
            _, conc, max_c = macenko_stains(img)
            out = IO * torch.exp(-self.he_ref @ (conc * (self.max_c_ref / max_c)[:, None]))
            return out.clamp(max=255).to(torch.uint8).reshape(img.shape)  # truncation, as the reference code
        mean, std = lab_stats(img)
        lab = rgb2lab(img.float() / 255)
        scale = torch.tensor([2.55, 1.0, 1.0]).view(3, 1, 1)
        shift = torch.tensor([0.0, 128.0, 128.0]).view(3, 1, 1)
        x = (lab - shift) / scale  # L 0-100, a, b centred
        x = (x - mean.view(3, 1, 1)) / std.view(3, 1, 1) * self.std_ref.view(3, 1, 1) + self.mean_ref.view(3, 1, 1)
        return (lab2rgb(x * scale + shift) * 255).to(torch.uint8)

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description (method, fitted parameters, what it was fitted on)."""
        return {"method": self.method, "params": self.params, "fitted_on": self.fitted_on,
                **({"Io": IO, "alpha": ALPHA, "beta": BETA, "min_tissue_pixels": MIN_TISSUE}
                   if self.method == "macenko" else {})}

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps([self.method, self.params], sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> "StainNormalizer":
        return cls(d["method"], d["params"], d.get("fitted_on", {}))


def fit_normalizer(method: str, images: Sequence[torch.Tensor], fitted_on: dict[str, Any]) -> StainNormalizer:
    """Fit ``method`` to the pixels of ``images`` (uint8 [3, H, W] each) taken together."""
    if not images:
        raise UserError("data.stain_norm: no reference image to fit on")
    pixels = torch.cat([im.reshape(3, -1) for im in images], 1)  # [3, N]: one reference image
    if method == "macenko":
        if tissue_pixels(pixels) < MIN_TISSUE:
            raise UserError(f"data.stain_norm: the reference ({fitted_on}) has fewer than {MIN_TISSUE} stained pixels "
                            f"(optical density >= {BETA}); choose a reference with tissue")
        he, _, max_c = macenko_stains(pixels)
        params = {"stain_matrix": he.tolist(), "max_concentrations": max_c.tolist()}
    else:
        mean, std = lab_stats(pixels)
        params = {"lab_mean": mean.tolist(), "lab_std": std.tolist()}
    return StainNormalizer(method, params, fitted_on)


def reference_images(reference: Path | None, paths: Sequence[str], sample: int, seed: int,
                     load: Any) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The images a normaliser is fitted on: the ``reference`` file, else a seeded sample of
    ``sample`` of ``paths`` (the training split), each read by ``load(path)``."""
    import numpy as np

    if reference is not None:
        if not Path(reference).is_file():
            raise UserError(f"data.stain_norm.reference not found: {reference}")
        return [load(str(reference))], {"reference": str(reference)}
    order = np.random.default_rng([seed, 0x57A1]).permutation(len(paths))[:sample]
    chosen = sorted(paths[int(i)] for i in order)
    return [load(p) for p in chosen], {"training_sample": len(chosen), "seed": seed, "images": chosen}
