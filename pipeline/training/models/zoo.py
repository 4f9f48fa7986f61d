"""Registry of zoo models: name → builder, default input, family.

Builders take ``(input_shape, num_classes, options)`` and return an uncompiled
``keras.Model`` whose head is float32 (safe under mixed precision): one sigmoid unit for
two classes, softmax otherwise. Keras is imported only when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from pipeline.errors import UnknownModel  # noqa: F401 (re-exported)

Builder = Callable[..., Any]


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry."""

    name: str
    builder: str  # "module:function", imported lazily
    image_size: int
    channels: int
    family: str  # seed | classic | xray | transfer
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    # (features, the seed's code, its error) when the seed hard-coded a wrong flatten size
    seed_flatten: tuple[int, str, str] | None = None
    num_classes: int = 2  # the task it was written for (default of `xrayops model describe`)

    def load_builder(self) -> Builder:
        import importlib

        module, func = self.builder.split(":")
        return getattr(importlib.import_module(module), func)


_ZOO: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _ZOO[spec.name] = spec
    return spec


def register_custom_objects() -> None:
    """Make the zoo's custom layers known to Keras (call before loading a saved model)."""
    import pipeline.training.models.layers  # noqa: F401


def _load_all() -> None:
    # Importing the catalogue registers every spec (no Keras import happens here).
    from pipeline.training.models import catalogue  # noqa: F401


def list_models() -> list[ModelSpec]:
    _load_all()
    return sorted(_ZOO.values(), key=lambda s: (s.family, s.name))


def get_spec(name: str) -> ModelSpec:
    _load_all()
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
