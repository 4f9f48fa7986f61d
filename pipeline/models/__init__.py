"""Model zoo: builders by name (see :mod:`pipeline.models.registry`)."""

from pipeline.models.registry import ModelSpec, UnknownModel, build_model, get_spec, list_models

__all__ = ["ModelSpec", "UnknownModel", "build_model", "get_spec", "list_models"]
