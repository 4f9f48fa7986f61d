"""The zoo's registry: :class:`ModelSpec` and :func:`register` (name → spec).

Only declarations live here; :mod:`pipeline.training.models.catalogue` registers every model
and :mod:`pipeline.training.models.zoo` (the entry point) imports the catalogue before answering.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.name] = spec
    return spec
