"""Model zoo: builders by name (see :mod:`pipeline.training.models.zoo`)."""

from pipeline.errors import UnknownModel
from pipeline.training.models.zoo import ModelSpec, build_model, get_spec, list_models

__all__ = ["ModelSpec", "UnknownModel", "build_model", "get_spec", "list_models"]
