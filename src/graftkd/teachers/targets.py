"""Where a distillation method gets its target: the live ensemble or the soft-target cache.

Also the teachers' part of ``metrics.json``: each teacher's and the fused ensemble's metrics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from graftkd.config import ExperimentConfig
from graftkd.data.datasets import ConcatViews
from graftkd.distributed import DistContext
from graftkd.runtime import Inference
from graftkd.teachers.cache import SoftTargetCache, cache_manifest
from graftkd.teachers.ensemble import TeacherEnsemble, load_teachers, state_checksum

#: data config fields that do not change any training view (loader and storage settings)
_VIEW_NEUTRAL = ("batch_size", "eval_batch_size", "num_workers", "decoded_cache", "on_bad_file", "unlabeled_batch_size")

class Score(Protocol):
    """``score(fn, split, key=None)``: every metric of logits function ``fn`` on "val" or "test". A
    ``key`` (JSON) says what ``fn`` is, content included (a frozen teacher's weight checksum): runs
    that share the key, split and evaluation settings may share one scoring (the study's score memo)."""

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], split: str, key: Any = None) -> dict[str, Any]: ...


class TeacherTargets(nn.Module):
    """Fused soft targets for a training batch: looked up by (index, view) in the cache when there
    is one, else computed by the frozen ensemble. Both give ``sum_k w_k softmax(z_k / T)``."""

    def __init__(self, ensemble: TeacherEnsemble, temperature: float, standardize: bool,
                 cache: SoftTargetCache | None = None) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.temperature, self.standardize = temperature, standardize
        self.cache = cache

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.lookup(batch["index"], batch["view"])
        return self.ensemble.targets(batch["image"], batch["label"], self.temperature, self.standardize)

    def train(self, mode: bool = True) -> "TeacherTargets":
        return super().train(False)


def build_teacher_targets(cfg: ExperimentConfig, data: Any, run_dir: Path | None, device: torch.device,
                          dist: DistContext, temperature: float, standardize: bool) -> TeacherTargets:
    """Load the run's teachers and, with ``teacher_cache.enabled``, the soft-target cache.

    The cache switches the training set (and the unlabelled set, ``data.unlabeled``, whose items
    follow the training set's in the cache) to ``teacher_cache.views`` replayable views per image.
    Under torchrun the build is split across ranks (rank 0 saves ``run_dir/cache``); a cache rank 0
    finds valid is read by every rank.
    """
    run = Inference.of(cfg, device, dist)
    ensemble = load_teachers(cfg.teachers, data, cfg.fusion, run, run_dir if dist.is_main else None)
    cache = None
    cc = cfg.teacher_cache
    if cc.enabled:
        data.train.views = cc.views
        covered = data.train
        if getattr(data, "unlabeled", None) is not None:
            data.unlabeled.views = cc.views
            covered = ConcatViews(data.train, data.unlabeled)
        data_config = cfg.data.model_dump(mode="json", exclude=set(_VIEW_NEUTRAL))
        manifest = cache_manifest(ensemble, covered, views=cc.views, temperature=temperature,
                                  standardize=standardize, topk=cc.topk, data_config=data_config,
                                  data_seed=getattr(data.train, "seed", cfg.seed), image_size=data.image_size,
                                  classes=list(data.classes))
        folder = run_dir / "cache" if run_dir is not None else None
        cache = SoftTargetCache.load_or_build(folder, ensemble, covered, manifest, run)
    return TeacherTargets(ensemble, temperature, standardize, cache).to(device)


def teachers_report(ensemble: TeacherEnsemble, score: Score) -> dict[str, Any]:
    """``teachers`` (each one on val and test, with its fusion accuracy and weight), ``ensemble``
    (the fused classifier on val and test) and ``fusion`` entries of metrics.json."""
    from graftkd.models import count_params

    weights = ensemble.global_weights()
    teachers = []
    # what each scored network is, by content (checksums of the weights now): the score memo's key
    keys = [{"teacher": state_checksum(t.model), "mean": t.mean, "std": t.std} for t in ensemble.teachers]
    fused = {"ensemble": keys, "strategy": ensemble.eval_strategy(), "tau": ensemble.fusion.tau,
             "val_accuracy": [float(a) for a in ensemble.val_acc.tolist()]}
    for k, t in enumerate(ensemble.teachers):
        teachers.append({"name": t.name, "checkpoint": t.source,
                         "val_accuracy_used_for_fusion": float(ensemble.val_acc[k]),
                         "weight": weights[k] if weights is not None else None,
                         "params": count_params(t.model), "val": score(t, "val", keys[k]),
                         "test": score(t, "test", keys[k])})
    return {
        "teachers": teachers,
        "ensemble": {"fusion": ensemble.eval_strategy(), "val": score(ensemble.predict_logits, "val", fused),
                     "test": score(ensemble.predict_logits, "test", fused)},
        "fusion": {"strategy": ensemble.fusion.strategy, "tau": ensemble.fusion.tau, "weights": weights},
    }
