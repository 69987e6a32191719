"""Distillation methods. Importing this package imports every module in it, and each registers its
method (factory and config class) in ``METHODS``: a new method is one new file here."""
import importlib
import pkgutil

from graftkd.methods.base import METHODS, ExtraOutput, Method, OptimSpec, Phase, StepContext

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "ExtraOutput", "Method", "OptimSpec", "Phase", "StepContext"]
