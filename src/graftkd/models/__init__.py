"""Models: our CIFAR family (``MODELS``), any timm model by name, and model files."""
from graftkd.models.cifar import MODELS, StagedNet, count_params
from graftkd.models.factory import (
    create_model,
    format_model_table,
    list_models,
    load_model_file,
    save_model_file,
)

__all__ = [
    "MODELS",
    "StagedNet",
    "count_params",
    "create_model",
    "format_model_table",
    "list_models",
    "load_model_file",
    "save_model_file",
]
