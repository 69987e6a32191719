"""Map-style datasets with replayable views, image decoding, and the decoded-image cache.

Every item starts from a *base image*: the decoded file resized (aspect kept, never enlarged) so
its short side is ``base_side(image_size)``. The cache only memoises base images, so a dataset
gives identical views with ``decoded_cache`` none, memory or mmap.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from graftkd.data import pixels
from graftkd.data.pixels import DEFAULT_MAX_PIXELS, Refused, decode_bytes
from graftkd.data.verify import _Worker, content_hash, verify_images  # noqa: F401  (re-exported)
from graftkd.data.transforms import mix_seed
from graftkd.data.types import Record
from graftkd.files import atomic_write_json
from graftkd.errors import UserError

CACHE_VERSION = 1


def decode_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode an image file to uint8 RGB CxHxW by the rule of ``graftkd.data.pixels`` (PIL only).

    Raises UserError naming the file when it is empty, damaged, over the pixel budget or not an
    image. Files reach this only after ``verify_images`` decoded them in a worker process.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror or e}") from None
    try:
        arr = decode_bytes(data, max_pixels)
    except Refused as e:
        raise UserError(f"cannot decode image {path}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def verify_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | str:
    """(width, height) of a **fully decoded** image, or the reason it cannot be decoded (in this
    process: ``verify_images`` runs the same check in worker processes)."""
    result = pixels.verify(path, max_pixels)
    return result if isinstance(result, str) else (result[0], result[1])


def base_shape(width: int, height: int, side: int) -> tuple[int, int]:
    """(height, width) of the base image: short side ``side``, aspect kept, never enlarged."""
    short = min(width, height)
    if short <= side:
        return height, width
    scale = side / short
    return max(1, round(height * scale)), max(1, round(width * scale))


class DecodedCache:
    """Base images of N files in one flat uint8 buffer (RAM or a memory-mapped file) plus fill flags.

    ``memory`` lives in the process (workers fill their own copy); ``mmap`` is a file shared by
    DataLoader workers and re-used by later runs on the same files (key = paths, sizes, mtimes,
    base side).
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], mode: str, cache_dir: Path | None, key_parts: list) -> None:
        self.shapes = [tuple(s) for s in shapes]
        sizes = np.array([3 * h * w for h, w in self.shapes], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        total = max(int(self.offsets[-1]), 1)
        self.mode = mode
        if mode == "memory":
            self.data: Any = np.empty(total, dtype=np.uint8)
            self.filled: Any = np.zeros(len(self.shapes), dtype=np.uint8)
            self.location = None
            return
        if cache_dir is None:
            raise ValueError("mmap cache needs a folder")
        key = hashlib.sha1(json.dumps([CACHE_VERSION, key_parts, self.shapes]).encode()).hexdigest()[:16]
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            data_path, flag_path = cache_dir / f"decoded-{key}.u8", cache_dir / f"decoded-{key}.flags"
            fresh = not (data_path.exists() and flag_path.exists()
                         and data_path.stat().st_size == total and flag_path.stat().st_size == len(self.shapes))
            if fresh:
                for p, n in ((data_path, total), (flag_path, len(self.shapes))):
                    with open(p, "wb") as f:
                        f.truncate(n)
                atomic_write_json(cache_dir / f"decoded-{key}.json",
                                  {"version": CACHE_VERSION, "items": len(self.shapes), "bytes": total,
                                   "first": str(key_parts[0][0]) if key_parts else None})
            self.data = np.memmap(data_path, dtype=np.uint8, mode="r+", shape=(total,))
            self.filled = np.memmap(flag_path, dtype=np.uint8, mode="r+", shape=(len(self.shapes),))
        except OSError as e:
            raise UserError(f"cannot write the decoded-image cache in {cache_dir}: {e.strerror or e} "
                            f"(set data.decoded_cache=memory or none)") from None
        self.location = data_path

    def get(self, i: int) -> torch.Tensor | None:
        if not self.filled[i]:
            return None
        h, w = self.shapes[i]
        a, b = self.offsets[i], self.offsets[i + 1]
        return torch.from_numpy(np.array(self.data[a:b])).view(3, h, w)

    def put(self, i: int, img: torch.Tensor) -> None:
        a, b = self.offsets[i], self.offsets[i + 1]
        self.data[a:b] = img.contiguous().view(-1).numpy()
        self.filled[i] = 1


class ViewDatasetBase(torch.utils.data.Dataset, abc.ABC):
    """Replayable views over base images (see ``graftkd.data.types.ViewDataset``).

    Training datasets (``augment`` given) show view ``v`` of item ``i`` as the augmentation run
    under ``torch.manual_seed(mix_seed(seed, i, v))`` inside a forked RNG, so the result does not
    depend on the caller's RNG, on DataLoader workers or on order. ``set_epoch(e)`` picks view ``e``
    (``views`` None) or ``mix_seed(seed, e, i) % views``. Eval datasets are deterministic: view 0.
    """

    #: added to the ``index`` of every item (an unlabelled set's items follow the training set's in
    #: the soft-target cache: ``index = len(train) + i``)
    index_offset: int = 0

    def __init__(self, records: Sequence[Record], augment: Callable | None, eval_tf: Callable, seed: int,
                 views: int | None = None) -> None:
        self.records = list(records)
        self.augment = augment
        self.eval_tf = eval_tf
        self.seed = int(seed)
        self.views = views
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    @abc.abstractmethod
    def base(self, i: int) -> torch.Tensor:
        """uint8 CxHxW base image of item i."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def view_of(self, i: int) -> int:
        """The view item i shows in the current epoch."""
        if self.augment is None:
            return 0
        if self.views is None:
            return self.epoch
        return mix_seed(self.seed, self.epoch, i) % self.views

    def load_view(self, i: int, view: int) -> torch.Tensor:
        """The normalised float32 image of item i in view ``view`` (pure function of seed, i, view)."""
        img = self.base(i)
        if self.augment is None:
            return self.eval_tf(img)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also seeds (lazily, with a stack trace) every
            # accelerator backend, ~1 ms per call on a CUDA build without a GPU
            torch.default_generator.manual_seed(mix_seed(self.seed, i, view))
            return self.augment(img)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v = self.view_of(i)
        return {"image": self.load_view(i, v), "label": self.records[i].label, "index": self.index_offset + i,
                "view": v}


class ConcatViews(torch.utils.data.Dataset):
    """Training set and unlabelled set as one index space (the soft-target cache's): item j < len(a)
    is a's item j, the others b's item j - len(a) (b's ``index_offset`` is len(a))."""

    def __init__(self, a: Any, b: Any) -> None:
        self.parts = (a, b)
        self.records = list(a.records) + list(b.records)
        self.seed = a.seed

    def __len__(self) -> int:
        return len(self.parts[0]) + len(self.parts[1])

    def load_view(self, j: int, view: int) -> torch.Tensor:
        a, b = self.parts
        return a.load_view(j, view) if j < len(a) else b.load_view(j - len(a), view)


def base_image(path: str, side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The decoded file resized to the base image (short side ``side``, never enlarged)."""
    img = decode_file(path, max_pixels)
    h, w = base_shape(img.shape[2], img.shape[1], side)
    if (h, w) != tuple(img.shape[1:]):
        img = F.resize(img, [h, w], antialias=True)
    return img


class FileDataset(ViewDatasetBase):
    """Images read from files; base images optionally stain-normalised (``stain``, applied once per
    decode) and cached (``memory`` or ``mmap``), so the cache holds normalised base images."""

    def __init__(self, records: Sequence[Record], augment: Callable | None, eval_tf: Callable, seed: int,
                 side: int, sizes: Sequence[tuple[int, int]] | None = None, cache: str = "none",
                 cache_dir: Path | None = None, stain: Any = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 content_keys: dict[str, str] | None = None) -> None:
        super().__init__(records, augment, eval_tf, seed)
        self.side, self.max_pixels = side, max_pixels
        self.stain = stain
        self.cache: DecodedCache | None = None
        if cache != "none" and self.records:
            if sizes is None:
                sizes = [_verified_or_raise(r.path, max_pixels) for r in self.records]
            shapes = [base_shape(w, h, side) for w, h in sizes]
            # the mmap cache is keyed by each file's content hash when the scan gave it (size and mtime
            # otherwise): a file changed in place never serves its old pixels
            key_parts = [[r.path, content_keys[r.path]] if content_keys and r.path in content_keys
                         else [r.path, *_stat(r.path)] for r in self.records] + [side]
            if stain is not None:
                key_parts.append(["stain", stain.fingerprint()])
            self.cache = DecodedCache(shapes, cache, cache_dir, key_parts)

    def base(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            hit = self.cache.get(i)
            if hit is not None:
                return hit
        path = self.records[i].path
        assert path is not None
        img = base_image(path, self.side, self.max_pixels)
        h, w = img.shape[1:]
        if self.stain is not None:
            img = self.stain(img)
        if self.cache is not None:
            if (h, w) != self.cache.shapes[i]:
                raise UserError(f"image {path} changed size since the data was scanned (its base image is now {w}x{h})")
            self.cache.put(i, img)
        return img


class ArrayDataset(ViewDatasetBase):
    """Images held in memory as a uint8 NxHxWx3 array (CIFAR); ``records[i].meta['index']`` rows."""

    def __init__(self, records: Sequence[Record], augment: Callable | None, eval_tf: Callable, seed: int,
                 array: np.ndarray) -> None:
        super().__init__(records, augment, eval_tf, seed)
        self.array = array
        self.rows = np.array([r.meta["index"] for r in self.records], dtype=np.int64)

    def base(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[self.rows[i]])).permute(2, 0, 1).contiguous()


def _verified_or_raise(path: str | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    size = verify_images([str(path)], max_pixels=max_pixels)[str(path)]
    if isinstance(size, str):
        raise UserError(f"cannot read image {path}: {size}")
    return size


def _stat(path: str | None) -> tuple[int, int]:
    st = os.stat(str(path))
    return st.st_size, st.st_mtime_ns
