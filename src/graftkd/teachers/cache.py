"""Soft-target cache: fused teacher targets of V replayable views per training image, paid once.

With the cache, the training set shows one of ``V`` views per image each epoch (``train.views = V``)
and view v of image i is replayed exactly by ``train.load_view(i, v)``; so the fused target of
(i, v) can be computed once, in one batched pass over all teachers, and looked up by the batch's
``index`` and ``view`` afterwards: per-epoch cost no longer depends on the number of teachers.

Storage (``run_dir/cache/``): ``soft_targets.pt`` holds float16 ``[N, V, C]`` probabilities, or,
with ``topk``, the top-k probabilities (float16) and their class ids with the residual mass spread
uniformly over the other classes; ``soft_targets.json`` is the manifest (teachers' checksums and
normalisation, fusion and validation accuracies, temperature, standardisation, the data config that
fixes the augmentation, the data seed, V, image size, class list, training-record hash). The file is
reused when the manifest matches and rebuilt when it does not; both files are written atomically.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from graftkd.data.loaders import eval_loader
from graftkd.errors import UserError
from graftkd.files import atomic_write_json, load_checkpoint, save_checkpoint
from graftkd.runtime import Inference, autocast, to_device
from graftkd.teachers.ensemble import TeacherEnsemble, records_hash

FORMAT = "graftkd-soft-targets-v1"
DATA_FILE, MANIFEST_FILE = "soft_targets.pt", "soft_targets.json"


class _Replay(Dataset):
    """Every (item, view) pair of a ViewDataset, item-major: j -> (j // V, j % V)."""

    def __init__(self, dataset: Any, views: int) -> None:
        self.dataset, self.views = dataset, views

    def __len__(self) -> int:
        return len(self.dataset) * self.views

    def __getitem__(self, j: int) -> dict[str, Any]:
        i, v = divmod(j, self.views)
        return {"image": self.dataset.load_view(i, v), "label": self.dataset.records[i].label, "index": i, "view": v}


def cache_manifest(ensemble: TeacherEnsemble, train_set: Any, *, views: int, temperature: float, standardize: bool,
                   topk: int | None, data_config: dict[str, Any], data_seed: int, image_size: int,
                   classes: list[str]) -> dict[str, Any]:
    """Everything the cached targets depend on, as plain JSON values."""
    manifest = {
        "format": FORMAT,
        "teachers": ensemble.describe(),
        "fusion": ensemble.fusion.model_dump(mode="json"),
        "val_accuracy": [round(a, 8) for a in ensemble.val_acc.tolist()],
        "temperature": float(temperature),
        "standardize": bool(standardize),
        "views": int(views),
        "topk": topk if topk is not None and topk < len(classes) else None,
        "data": data_config,
        "data_seed": int(data_seed),
        "image_size": int(image_size),
        "classes": list(classes),
        "records": records_hash(train_set.records),
        "num_items": len(train_set),
    }
    return json.loads(json.dumps(manifest, default=str))


class SoftTargetCache(nn.Module):
    """Fused targets keyed by (dataset index, view id); ``lookup`` returns float32 ``[B, C]``.

    Tensors are non-persistent buffers: they follow the method to its device but stay out of
    checkpoints (the cache folder is their home).
    """

    def __init__(self, manifest: dict[str, Any], values: torch.Tensor, indices: torch.Tensor | None,
                 built: bool = False, build_seconds: float = 0.0) -> None:
        super().__init__()
        self.manifest = manifest
        self.num_classes = len(manifest["classes"])
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("indices", indices, persistent=False)
        self.built, self.build_seconds = built, build_seconds

    def lookup(self, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """[B, C] target distributions of items ``index`` shown in views ``view``."""
        vals = self.values[index, view].float()
        if self.indices is None:
            return vals / vals.sum(1, keepdim=True)
        k = vals.shape[1]
        residual = (1.0 - vals.sum(1, keepdim=True)).clamp_min(0.0) / (self.num_classes - k)
        out = residual.expand(-1, self.num_classes).clone()
        return out.scatter_(1, self.indices[index, view].long(), vals)

    def save(self, folder: Path) -> None:
        """Write the data file, then the manifest (both atomic: a crash leaves no half cache)."""
        save_checkpoint(folder / DATA_FILE, {"kind": "soft_targets", "manifest": self.manifest,
                                             "values": self.values.cpu(),
                                             "indices": self.indices.cpu() if self.indices is not None else None})
        atomic_write_json(folder / MANIFEST_FILE, self.manifest)

    @classmethod
    def load(cls, folder: Path, manifest: dict[str, Any]) -> "SoftTargetCache | None":
        """The stored cache if its manifest equals ``manifest``, else None."""
        mpath, dpath = folder / MANIFEST_FILE, folder / DATA_FILE
        if not (mpath.is_file() and dpath.is_file()):
            return None
        try:
            if json.loads(mpath.read_text()) != manifest:
                return None
        except json.JSONDecodeError:
            return None
        state = load_checkpoint(dpath)
        if state.get("kind") != "soft_targets" or state.get("manifest") != manifest:
            return None
        return cls(manifest, state["values"], state["indices"])

    @classmethod
    @torch.no_grad()
    def build(cls, ensemble: TeacherEnsemble, train_set: Any, manifest: dict[str, Any],
              run: Inference) -> "SoftTargetCache":
        """One pass over every (item, view): all teachers per batch, fused, stored compactly. Under
        torchrun each rank computes every world_size-th (item, view) and all ranks get the whole."""
        t0 = time.perf_counter()
        n, views, c, topk = len(train_set), manifest["views"], len(manifest["classes"]), manifest["topk"]
        width = topk or c
        device, dist = run.device, run.dist
        values = torch.zeros(n, views, width, dtype=torch.float16)
        indices = torch.zeros(n, views, width, dtype=torch.int16 if c <= 32767 else torch.int32) if topk else None
        replay = _Replay(train_set, views)
        loader = eval_loader(replay, run.batch_size, run.num_workers, dist.rank, dist.world_size)
        ensemble.eval()
        for batch in loader:
            b = to_device(batch, device, False)
            with autocast(device, run.dtype):
                p = ensemble.targets(b["image"], b["label"], manifest["temperature"], manifest["standardize"])
            i, v = batch["index"], batch["view"]
            if topk:
                top, idx = p.topk(topk, dim=1)
                values[i, v], indices[i, v] = top.half().cpu(), idx.to(indices.dtype).cpu()
            else:
                values[i, v] = p.half().cpu()
        for t in (values, indices) if indices is not None else (values,):
            dist.merge_disjoint_(t, device)
        return cls(manifest, values, indices, built=True, build_seconds=time.perf_counter() - t0)

    @classmethod
    def load_or_build(cls, folder: Path | None, ensemble: TeacherEnsemble, train_set: Any, manifest: dict[str, Any],
                      run: Inference, write: bool = True) -> "SoftTargetCache":
        """Reuse ``folder``'s cache when its manifest matches, else build it (and save if ``write``).
        Under torchrun rank 0 decides, a build is split across ranks and rank 0 alone saves."""
        dist = run.dist
        hit = cls.load(folder, manifest) if folder is not None and dist.is_main else None
        if dist.sum([float(hit is not None)], run.device)[0] > 0:
            if not dist.is_main:
                hit = cls.load(folder, manifest) if folder is not None else None
                if hit is None:
                    raise UserError(f"rank {dist.rank}: the soft-target cache in {folder} is missing or stale")
            return hit
        cache = cls.build(ensemble, train_set, manifest, run)
        if folder is not None and write and dist.is_main:
            cache.save(folder)
        dist.barrier()
        return cache
