"""Stain normalisation of H&E images (uint8 CxHxW), fitted to a reference: Macenko (2009) and
Reinhard (2001), computed by torchstain (MIT).

- ``macenko``: the reference's stain matrix (two unit optical-density vectors, haematoxylin first)
  and the 99th percentiles of its stain concentrations; an image's own stain matrix and
  concentrations are found the same way, its concentrations scaled to the reference percentiles
  and recomposed with the reference matrix (``Io = 240``, ``alpha = 1``, ``beta = 0.15``, the
  paper's and torchstain's defaults). An image with fewer than ``MIN_TISSUE`` tissue pixels (optical
  density >= beta in every channel) has no stain estimate and is kept as it is.
- ``reinhard``: per LAB channel (torchstain's CIE-LAB in OpenCV scaling), ``(x - mean) / sd``
  of the image, times the reference's sd plus its mean.

A fitted normaliser is plain JSON (``describe``/``from_description``): the run folder's
``stain_reference.json``, the model file and the exported card hold it, so ``predict`` normalises
new images as training did.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from graftkd.errors import UserError

IO, ALPHA, BETA = 240, 1, 0.15
#: the fitted normaliser in a run folder, and its key in model files (``extra``) and model cards
STAIN_FILE, STAIN_KEY = "stain_reference.json", "stain_normalization"
MIN_TISSUE = 64


def _torchstain(method: str) -> Any:
    try:
        from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer
    except ImportError:  # pragma: no cover - a dependency of the package
        raise UserError("data.stain_norm needs the torchstain package (pip install torchstain==1.4.1)") from None
    return TorchMacenkoNormalizer() if method == "macenko" else TorchReinhardNormalizer()


def tissue_pixels(img: torch.Tensor) -> int:
    """Pixels Macenko estimates stains from: optical density ``-log((I + 1) / Io) >= beta`` in every channel."""
    od = -torch.log((img.reshape(3, -1).float() + 1) / IO)
    return int((od >= BETA).all(0).sum())


class StainNormalizer:
    """A fitted normaliser: ``__call__(uint8 [3, H, W]) -> uint8 [3, H, W]``."""

    def __init__(self, method: str, params: dict[str, list], fitted_on: dict[str, Any]) -> None:
        if method not in ("macenko", "reinhard"):
            raise ValueError(f"unknown stain normalisation {method!r}")
        self.method, self.params, self.fitted_on = method, params, fitted_on
        self.impl = _torchstain(method)
        if method == "macenko":
            self.impl.HERef = torch.tensor(params["stain_matrix"], dtype=torch.float32)
            self.impl.maxCRef = torch.tensor(params["max_concentrations"], dtype=torch.float32)
        else:
            self.impl.target_means = torch.tensor(params["lab_mean"], dtype=torch.float32)
            self.impl.target_stds = torch.tensor(params["lab_std"], dtype=torch.float32)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"stain normalisation needs a uint8 [3, H, W] image, got {img.dtype} {tuple(img.shape)}")
        if self.method == "macenko":
            if tissue_pixels(img) < MIN_TISSUE:
                return img
            out, _, _ = self.impl.normalize(img, Io=IO, alpha=ALPHA, beta=BETA, stains=False)
            return out.clamp(0, 255).to(torch.uint8).permute(2, 0, 1).contiguous()
        return self.impl.normalize(img).permute(2, 0, 1).contiguous()  # torchstain returns H x W x C

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description (method, fitted parameters, what it was fitted on)."""
        return {"method": self.method, "params": self.params, "fitted_on": self.fitted_on,
                **({"Io": IO, "alpha": ALPHA, "beta": BETA, "min_tissue_pixels": MIN_TISSUE}
                   if self.method == "macenko" else {})}

    def fingerprint(self) -> str:
        import hashlib
        import json

        return hashlib.sha1(json.dumps([self.method, self.params], sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> "StainNormalizer":
        return cls(d["method"], d["params"], d.get("fitted_on", {}))


def fit_normalizer(method: str, images: Sequence[torch.Tensor], fitted_on: dict[str, Any]) -> StainNormalizer:
    """Fit ``method`` to the pixels of ``images`` (uint8 [3, H, W] each) taken together."""
    if not images:
        raise UserError("data.stain_norm: no reference image to fit on")
    pixels = torch.cat([im.reshape(3, -1) for im in images], 1)[:, None, :]  # [3, 1, N]: one reference image
    impl = _torchstain(method)
    if method == "macenko":
        if tissue_pixels(pixels) < MIN_TISSUE:
            raise UserError(f"data.stain_norm: the reference ({fitted_on}) has fewer than {MIN_TISSUE} stained pixels "
                            f"(optical density >= {BETA}); choose a reference with tissue")
        impl.fit(pixels, Io=IO, alpha=ALPHA, beta=BETA)
        params = {"stain_matrix": impl.HERef.tolist(), "max_concentrations": impl.maxCRef.tolist()}
    else:
        impl.fit(pixels)
        params = {"lab_mean": impl.target_means.tolist(), "lab_std": impl.target_stds.tolist()}
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
