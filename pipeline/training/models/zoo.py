"""The zoo by name: list, look up and build models (specs declared in ``catalogue``, registered in ``spec``).

Builders take ``(input_shape, num_classes, options)`` and return an uncompiled
``keras.Model`` whose head is float32 (safe under mixed precision): one sigmoid unit for
two classes, softmax otherwise. Keras is imported only when a model is built.
"""

from __future__ import annotations

from typing import Any

# Importing the catalogue registers every spec (no Keras import happens there).
import pipeline.training.models.catalogue  # noqa: F401
from pipeline.errors import UnknownModel
from pipeline.training.models.spec import REGISTRY as _ZOO
from pipeline.training.models.spec import Builder, ModelSpec, register  # noqa: F401 (re-exported)


def register_custom_objects() -> None:
    """Make the zoo's custom layers known to Keras (call before loading a saved model)."""
    import pipeline.training.models.layers  # noqa: F401


def list_models() -> list[ModelSpec]:
    return sorted(_ZOO.values(), key=lambda s: (s.family, s.name))


def get_spec(name: str) -> ModelSpec:
    if name not in _ZOO:
        raise UnknownModel(f"unknown model {name!r}; choose one of: {', '.join(sorted(_ZOO))} "
                           "(see `xrayops model list`)")
    return _ZOO[name]


def build_model(name: str, *, image_size: int | None = None, channels: int | None = None,
                num_classes: int = 2, **options: Any) -> Any:
    """Build zoo model ``name`` for ``num_classes`` classes at the given (or default) input size."""
    spec = get_spec(name)
    shape = (image_size or spec.image_size, image_size or spec.image_size, channels or spec.channels)
    return spec.load_builder()(shape, num_classes, **{**spec.options, **options})
