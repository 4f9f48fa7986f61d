"""Transfer-learning helpers shared by the backbone builders."""

from __future__ import annotations

from typing import Any


def unfreeze_top(model: Any, n_layers: int) -> bool:
    """Unfreeze the top ``n_layers`` of the model's backbone (BatchNorm stays frozen).

    Returns False when the model has no frozen backbone (nothing to fine-tune).
    """
    from keras import layers

    backbone = next((l for l in model.layers if getattr(l, "_xrayops_backbone", False)), None)
    if backbone is None:
        return False
    backbone.trainable = True
    inner = backbone.layers
    cut = max(0, len(inner) - n_layers)
    for i, layer in enumerate(inner):
        layer.trainable = i >= cut and not isinstance(layer, layers.BatchNormalization)
    return True
