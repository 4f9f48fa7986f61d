"""Figures of what a CNN learned: first-layer filters and the feature maps of one sample image."""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_PANELS = 32


def first_conv(model: Any) -> tuple[Any, Any, Any] | None:
    """``(conv layer, graph input, tensor feeding the conv's graph)`` of the first Conv2D, walking into backbones.

    Returns None when the model has no convolution.
    """
    import keras

    for layer in model.layers:
        if type(layer).__name__ == "Conv2D":
            return layer, model.input, model.input
        if isinstance(layer, keras.Model):
            inner = first_conv(layer)
            if inner is not None:
                return inner[0], model.input, layer._inbound_nodes[0].input_tensors[0]
    return None


def _grid(n: int) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(n)))
    return int(np.ceil(n / cols)), cols


def _panel_figure(panels: np.ndarray, title: str, cmap: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (i, panel) in zip(axes.ravel(), enumerate(panels), strict=False):
        ax.imshow(panel, cmap=cmap, interpolation="nearest")
        ax.set_title(str(i), fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def filters_figure(model: Any) -> Any | None:
    """The first convolution's kernels (mean over input channels), each scaled to its own range."""
    found = first_conv(model)
    if found is None:
        return None
    conv = found[0]
    kernel = np.asarray(conv.kernel.numpy() if hasattr(conv.kernel, "numpy") else conv.kernel)  # (k, k, in, out)
    panels = kernel.mean(axis=2).transpose(2, 0, 1)[:MAX_PANELS]
    lo, hi = panels.min(axis=(1, 2), keepdims=True), panels.max(axis=(1, 2), keepdims=True)
    panels = (panels - lo) / np.maximum(hi - lo, 1e-12)
    k = kernel.shape[0]
    return _panel_figure(panels, f"{model.name}: first-layer filters ({conv.name}, {k}×{k}, "
                                 f"{kernel.shape[3]} filters)", "gray")


def feature_maps_figure(model: Any, image: np.ndarray) -> Any | None:
    """Feature maps of the first convolution for one image ``(H, W, C)`` in [0, 1]."""
    import keras

    found = first_conv(model)
    if found is None:
        return None
    conv, outer_input, feed = found
    prep = keras.Model(outer_input, feed) if feed is not outer_input else None
    x = image[None].astype(np.float32)
    if prep is not None:  # transfer model: to RGB + the backbone's preprocessing, then the backbone's graph
        x = np.asarray(prep(x, training=False))
        inner = next(m for m in model.layers if isinstance(m, keras.Model) and conv in m.layers)
        maps = np.asarray(keras.Model(inner.input, conv.output)(x, training=False))
    else:
        maps = np.asarray(keras.Model(model.input, conv.output)(x, training=False))
    panels = maps[0].transpose(2, 0, 1)[:MAX_PANELS]
    return _panel_figure(panels, f"{model.name}: feature maps of {conv.name} for one training image", "viridis")
