"""Data: sources (BreakHis, synthetic histology, CIFAR, folder, CSV), group splits, few-shot
sampling, replayable-view datasets with a decoded-image cache. Entry point: ``build_data``."""
from graftkd.data.build import build_data, few_shot
from graftkd.data.types import DataBundle, Record, ViewDataset

__all__ = ["build_data", "few_shot", "DataBundle", "Record", "ViewDataset"]
