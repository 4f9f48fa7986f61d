"""Grad-CAM for every zoo model, and its sanity check by model-parameter randomisation.

Grad-CAM (Selvaraju et al. 2017): the gradient of the class score with respect to the last
convolutional feature map, averaged over space, weights that map's channels; the ReLU of the
weighted sum, upsampled to the input, is the heatmap.

The target layer is found, not configured: the last convolution of the model, searched
recursively through nested sub-models. When it sits directly in the model, the norm /
activation layers right after it are included (``conv → norm → relu``); when it sits inside
a nested backbone (``keras.applications`` transfer models), the backbone's 4-D output is
used — for EfficientNet/ResNet/DenseNet that is exactly the conventional Grad-CAM layer.
Mixed precision works: float16 feature maps and gradients are cast to float32.

Sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps"): the heatmaps of the
trained model and of the same architecture with randomised weights must differ. The score is
the mean absolute Spearman rank correlation between the two models' raw class-activation maps
(before the ReLU, at feature-map resolution) over a set of images; a map that survives
randomisation explains the image, not the model.
"""

from __future__ import annotations

import io
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import GradCamError
from pipeline.evaluation.metrics import confusion_cells

logger = logging.getLogger(__name__)

_PASS_THROUGH = ("BatchNormalization", "GroupNormalization", "LayerNormalization", "Activation", "ReLU",
                 "LeakyReLU", "ELU", "PReLU", "Softmax")
_CACHE: weakref.WeakKeyDictionary[Any, GradCam] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _conv_types() -> tuple[type, ...]:
    from keras import layers

    return (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D, layers.Conv2DTranspose)


def _last_conv_path(model: Any) -> list[Any] | None:
    """``[outer layer, …, conv layer]`` of the last convolution, descending into sub-models."""
    for layer in reversed(model.layers):
        if isinstance(layer, _conv_types()):
            return [layer]
        if hasattr(layer, "layers") and layer.layers:
            inner = _last_conv_path(layer)
            if inner:
                return [layer, *inner]
    return None


def find_target_layer(model: Any) -> tuple[Any, list[str]]:
    """The layer whose output Grad-CAM differentiates, and the path of names to the last conv.

    Raises:
        GradCamError: no convolution, or the last one is hidden inside a sub-model that pools.
    """
    path = _last_conv_path(model)
    names = [layer.name for layer in path or []]
    if not path:
        raise GradCamError(f"model {model.name!r} has no convolutional layer: Grad-CAM needs a CNN "
                           "(dense-only models cannot be explained this way)")
    outer = path[0]
    if len(path) == 1:
        outer = _absorb_norm_and_activation(model, outer)
    shape = tuple(outer.compute_output_spec(outer.input).shape) if len(path) > 1 else tuple(outer.output.shape)
    if len(shape) != 4:
        raise GradCamError(f"the last convolution {'/'.join(names)} is inside {outer.name!r}, whose output "
                           f"{shape} is not a feature map; build the backbone with pooling=None and pool "
                           "in the outer model")
    return outer, names


def _absorb_norm_and_activation(model: Any, conv: Any) -> Any:
    """Move from ``conv`` to the last directly following norm/activation layer of the same shape."""
    layers = list(model.layers)
    target = conv
    for layer in layers[layers.index(conv) + 1:]:
        if type(layer).__name__ not in _PASS_THROUGH or tuple(layer.output.shape) != tuple(target.output.shape):
            break
        inbound = [t._keras_history.operation for t in _flat(layer.input)]
        if inbound != [target]:
            break
        target = layer
    return target


def _sigmoid_head(model: Any) -> Any:
    """The output layer when it is one sigmoid unit named ``predictions`` (the zoo's binary head), else None."""
    import keras

    try:
        head = model.get_layer("predictions")
    except ValueError:
        return None
    if getattr(head, "units", None) == 1 and head.activation is keras.activations.sigmoid:
        return head
    return None


def _grad_model(model: Any, target: Any) -> Any:
    """``model.inputs → [target's feature map, model.output, the binary head's input (or the output again)]``.

    A nested sub-model's ``.output`` is its *inner* output tensor; the feature map in this
    graph is the output of the node where the outer model calls it, so try its call nodes.
    """
    import keras

    head = _sigmoid_head(model)
    head_input = head.input if head is not None else model.output
    candidates = [t for node in target._inbound_nodes for t in _flat(node.output_tensors)]
    for tensor in reversed(candidates):
        try:
            return keras.Model(model.inputs, [tensor, model.output, head_input])
        except ValueError:
            continue
    raise GradCamError(f"layer {target.name!r} is not connected to the inputs of {model.name!r}")


def _flat(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


@dataclass
class GradCam:
    """A compiled Grad-CAM for one model (build with :func:`grad_cam_for`)."""

    layer: str
    conv_path: list[str]
    _step: Any

    def maps(self, images: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw class-activation maps ``(n, h, w)`` (before ReLU) and the model outputs.

        Binary models explain the positive class; multi-class models ``class_index`` or, when
        None, each image's predicted class.
        """
        import tensorflow as tf

        idx = tf.constant(-1 if class_index is None else int(class_index), tf.int32)
        cam, out = self._step(tf.convert_to_tensor(np.asarray(images, np.float32)), idx)
        return cam.numpy(), out.numpy()

    def heatmaps(self, images: np.ndarray, class_index: int | None = None) -> np.ndarray:
        """Grad-CAM heatmaps ``(n, H, W)`` in [0, 1] at the input resolution."""
        cam, _ = self.maps(images, class_index)
        return upsample(normalise(cam), tuple(np.asarray(images).shape[1:3]))


def grad_cam_for(model: Any) -> GradCam:
    """The (cached) :class:`GradCam` of ``model``."""
    with _CACHE_LOCK:
        if model not in _CACHE:
            _CACHE[model] = _build(model)
        return _CACHE[model]


def _build(model: Any) -> GradCam:
    import tensorflow as tf

    target, path = find_target_layer(model)
    grad_model = _grad_model(model, target)
    head = _sigmoid_head(model)

    @tf.function(reduce_retracing=True)
    def step(images: Any, class_index: Any) -> tuple[Any, Any]:
        with tf.GradientTape() as tape:
            feats, out, head_input = grad_model(images, training=False)
            out = tf.cast(out, tf.float32)
            if head is not None:  # binary: the logit, not the probability, whose gradient vanishes when it saturates
                score = (tf.matmul(tf.cast(head_input, tf.float32), tf.cast(head.kernel, tf.float32))
                         + tf.cast(head.bias, tf.float32))[:, 0]
            elif out.shape[-1] == 1:
                score = out[:, 0]
            else:
                chosen = tf.where(class_index < 0, tf.argmax(out, axis=-1, output_type=tf.int32),
                                  tf.fill([tf.shape(out)[0]], class_index))
                score = tf.gather(out, chosen, axis=1, batch_dims=1)
        grads = tape.gradient(score, feats)
        if grads is None:  # raised while tracing, i.e. on the first call
            raise GradCamError(f"the output of {model.name!r} does not depend differentiably on {target.name!r}: "
                               "no gradient for Grad-CAM")
        grads = tf.cast(grads, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2))
        cam = tf.einsum("nhwc,nc->nhw", tf.cast(feats, tf.float32), weights)
        return cam, out

    logger.debug("Grad-CAM layer of %s: %s (last conv %s)", model.name, target.name, "/".join(path))
    return GradCam(target.name, path, step)


def normalise(cam: np.ndarray) -> np.ndarray:
    """ReLU, then scale each map to [0, 1] (an all-zero map stays zero)."""
    cam = np.maximum(np.asarray(cam, np.float32), 0.0)
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(n, h, w)`` maps to ``size``."""
    import tensorflow as tf

    out = tf.image.resize(np.asarray(maps, np.float32)[..., None], size, method="bilinear").numpy()[..., 0]
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------- images


def _jet(x: np.ndarray) -> np.ndarray:
    """Jet colour map of values in [0, 1] → RGB in [0, 1] (no matplotlib needed when serving)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.concatenate([r, g, b], axis=-1)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``uint8 (H, W, 3)``: the image in grey with the heatmap blended in where it is hot."""
    img = np.asarray(image, np.float32)
    grey = img.mean(axis=-1) if img.ndim == 3 else img
    grey = (grey - grey.min()) / max(float(np.ptp(grey)), 1e-6)
    weight = alpha * np.asarray(heatmap, np.float32)[..., None]
    rgb = (1 - weight) * grey[..., None] + weight * _jet(heatmap)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def gradcam(model: Any, image_batch: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, bytes]:
    """Grad-CAM of a preprocessed batch ``(n, H, W, C)`` (the model's input, values in [0, 1]).

    Returns:
        ``heatmap``: float32 ``(n, H, W)`` in [0, 1]; ``overlay_png_bytes``: one PNG — the
        overlay of the image, or for ``n > 1`` the overlays side by side.
    """
    batch = np.asarray(image_batch, np.float32)
    if batch.ndim == 3:
        batch = batch[None]
    heat = grad_cam_for(model).heatmaps(batch, class_index)
    strip = np.concatenate([overlay(img, h) for img, h in zip(batch, heat, strict=True)], axis=1)
    return heat, png_bytes(strip)


# --------------------------------------------------------------------------- sanity check


def randomised_copy(model: Any, seed: int) -> Any:
    """The same architecture with every weight matrix/kernel redrawn (same scale, seeded).

    1-D parameters (biases, norm scales/offsets) and non-trainable statistics are kept, so
    activations stay in range and only what the model *learned* is destroyed.
    """
    import keras

    try:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
    except (ValueError, TypeError, NotImplementedError) as exc:  # e.g. a custom layer without get_config()
        raise GradCamError(f"cannot copy {model.name!r} for the Grad-CAM sanity check "
                           f"({type(exc).__name__}: {exc})") from None
    rng = np.random.default_rng(seed)
    for var in clone.trainable_weights:
        if len(var.shape) < 2:
            continue
        value = np.asarray(var.numpy(), np.float32)
        std = float(value.std()) or float(np.sqrt(2.0 / max(1, int(np.prod(value.shape[:-1])))))
        var.assign(rng.normal(0.0, std, size=value.shape).astype(value.dtype))
    return clone


def rank_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (nan for a constant map)."""
    from scipy.stats import spearmanr

    out = []
    for x, y in zip(a.reshape(len(a), -1), b.reshape(len(b), -1), strict=True):
        out.append(np.nan if np.ptp(x) == 0 or np.ptp(y) == 0 else float(spearmanr(x, y).statistic))
    return np.asarray(out, dtype=float)


def sanity_check(model: Any, images: np.ndarray, *, max_rank_corr: float, seed: int) -> dict[str, Any]:
    """Model-parameter randomisation test of Grad-CAM on ``images``.

    Returns:
        ``rank_corr`` (mean |Spearman| trained vs randomised), ``threshold``, ``passed``,
        ``layer``, ``n_images`` and the per-image correlations.
    """
    trained = grad_cam_for(model)
    cam_trained, _ = trained.maps(images)
    cam_random, _ = grad_cam_for(randomised_copy(model, seed)).maps(images)
    rho = rank_correlations(cam_trained, cam_random)
    finite = np.abs(rho[np.isfinite(rho)])
    score = float(finite.mean()) if len(finite) else float("nan")
    return {"rank_corr": round(score, 4) if score == score else None, "threshold": max_rank_corr,
            "passed": bool(score == score and score <= max_rank_corr), "layer": trained.layer,
            "conv_path": "/".join(trained.conv_path), "n_images": int(len(images)),
            "per_image": [round(float(r), 4) if r == r else None for r in rho]}


# --------------------------------------------------------------------------- evaluation examples

CELLS = ("TP", "FP", "TN", "FN")


def select_examples(y: np.ndarray, proba: np.ndarray, threshold: float | None, per_cell: int) -> dict[str, list[int]]:
    """Test-set indices per confusion cell, most confident first.

    Binary: TP/FP by highest probability, TN/FN by lowest. Multi-class: ``correct`` and
    ``wrong`` by highest top-class probability.
    """
    y = np.asarray(y, int)
    proba = np.asarray(proba, float)
    if proba.ndim == 1:
        cells = confusion_cells(y, (proba >= (0.5 if threshold is None else threshold)).astype(int))
        masks = {cell: cells[cell.lower()] for cell in CELLS}
        order = {"TP": -proba, "FP": -proba, "TN": proba, "FN": proba}
    else:
        pred, top = proba.argmax(1), proba.max(1)
        masks = {"correct": pred == y, "wrong": pred != y}
        order = {"correct": -top, "wrong": -top}
    out = {}
    for cell, mask in masks.items():
        idx = np.flatnonzero(mask)
        out[cell] = [int(i) for i in idx[np.argsort(order[cell][idx], kind="stable")][:per_cell]]
    return out
