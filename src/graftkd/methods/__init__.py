"""Distillation methods; importing this package registers them in ``METHODS``."""
from graftkd.methods import supervised  # noqa: F401
from graftkd.methods import atf  # noqa: F401
from graftkd.methods import kd  # noqa: F401
from graftkd.methods import dkd  # noqa: F401
from graftkd.methods import dml  # noqa: F401
from graftkd.methods import graft  # noqa: F401
from graftkd.methods.base import METHODS, ExtraOutput, Method, OptimSpec, Phase, StepContext

__all__ = ["METHODS", "ExtraOutput", "Method", "OptimSpec", "Phase", "StepContext"]
