"""Data: sources (BreakHis, synthetic histology, CIFAR, folder, CSV), group splits, few-shot
sampling, replayable-view datasets with a decoded-image cache. Entry point: ``build_data``.

The names below are imported on first use (PEP 562), so ``graftkd.data.commands`` (the CLI's
argument parsers) loads without torch."""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"build_data": "graftkd.data.build", "few_shot": "graftkd.data.build", "DataBundle": "graftkd.data.types",
          "Record": "graftkd.data.types", "ViewDataset": "graftkd.data.types"}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'graftkd.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
