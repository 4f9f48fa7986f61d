"""Pixel attributions beside Grad-CAM: Integrated Gradients and vanilla-gradient / SmoothGrad saliency,
each with the parameter-randomisation sanity check and the share of attribution inside the lung fields.

* Integrated Gradients (Sundararajan et al. 2017): ``(x − b) · ∫₀¹ ∂f(b + α(x − b))/∂x dα`` with a black
  (all-zero) or blurred baseline ``b``, the integral by the trapezoid rule over ``steps`` intervals. The
  attributions sum to ``f(x) − f(b)`` (completeness); :func:`integrated_gradients` reports the relative
  error of that identity, which shrinks as ``steps`` grows.
* Saliency (Simonyan et al. 2014) / SmoothGrad (Smilkov et al. 2017): ``|∂f/∂x|``, averaged over
  ``samples`` copies of the image with Gaussian noise of ``sigma`` × the image's value range
  (``samples = 0`` or ``sigma = 0``: the vanilla gradient).

``f`` is the model's output for the explained class (the positive-class probability of a binary model,
else the given class or each image's predicted class), exactly what Grad-CAM differentiates. Gradients
come from ``tf.GradientTape`` through the Keras model, in chunks of ``batch_size`` images (interpolation
steps and noise samples are batched; memory is bounded by the chunk, not by ``steps`` or ``samples``).

Lung-field mass: the share of a map's (non-negative) mass inside :func:`lung_field_mask`, a fixed
anatomical prior for a PA/AP chest film (two ellipses), not a segmentation; its area is reported beside
it as the chance level of a map that ignores anatomy.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import GradCamError
from pipeline.evaluation.explain import (
    grad_cam_for,
    overlay,
    png_bytes,
    randomised_copy,
    rank_correlations,
    select_examples,
)
from pipeline.evaluation.explain import sanity_check as gradcam_sanity_check

METHODS = ("gradcam", "integrated_gradients", "smoothgrad")
METHOD_TITLES = {"gradcam": "Grad-CAM", "integrated_gradients": "Integrated Gradients", "smoothgrad": "SmoothGrad"}
BASELINES = ("black", "blur")
_GRADS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_GRADS_LOCK = threading.Lock()


@dataclass(frozen=True)
class AttributionOptions:
    """How IG and SmoothGrad are computed (``evaluate.ig_*`` / ``evaluate.smoothgrad_*`` in params.yaml)."""

    ig_steps: int = 32
    ig_baseline: str = "black"
    smoothgrad_samples: int = 16
    smoothgrad_sigma: float = 0.15
    batch_size: int = 32
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any, seed: int = 0) -> AttributionOptions:
        return cls(cfg.ig_steps, cfg.ig_baseline, cfg.smoothgrad_samples, cfg.smoothgrad_sigma,
                   cfg.explain_batch_size, seed)


# --------------------------------------------------------------------------- lung fields


def lung_field_mask(height: int, width: int) -> np.ndarray:
    """Boolean ``(height, width)`` prior of the lung fields on a frontal chest film.

    Two ellipses centred 18 % of the width either side of the midline at 49 % of the height, with
    semi-axes of 15 % of the width and 31 % of the height, leaving the mediastinum (the middle 6 %)
    out; the synthetic cohorts' lungs and typical adult PA films, after the square resize, mostly fall inside.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = (yy + 0.5) / height, (xx + 0.5) / width
    mask = np.zeros((height, width), bool)
    for cx in (0.32, 0.68):
        mask |= ((x - cx) / 0.15) ** 2 + ((y - 0.49) / 0.31) ** 2 < 1
    return mask


def lung_mass(maps: np.ndarray) -> dict[str, Any]:
    """Share of each map's mass inside the lung fields (maps are made non-negative first).

    Returns:
        ``mean``, ``per_image`` (None for an all-zero map) and ``lung_area`` (the chance level).
    """
    maps = np.maximum(np.asarray(maps, np.float64), 0.0)
    mask = lung_field_mask(*maps.shape[1:3])
    total = maps.reshape(len(maps), -1).sum(axis=1)
    inside = (maps * mask).reshape(len(maps), -1).sum(axis=1)
    share = [float(i / t) if t > 0 else None for i, t in zip(inside, total, strict=True)]
    finite = [s for s in share if s is not None]
    return {"mean": round(float(np.mean(finite)), 4) if finite else None,
            "per_image": [None if s is None else round(s, 4) for s in share],
            "lung_area": round(float(mask.mean()), 4)}


# --------------------------------------------------------------------------- gradients


def _gradient_step(model: Any) -> Callable[[Any, Any], tuple[Any, Any]]:
    """Cached compiled ``(images, class per image) → (∂score/∂images, score)`` for ``model``."""
    import tensorflow as tf

    with _GRADS_LOCK:
        if model in _GRADS:
            return _GRADS[model]

        ref = weakref.ref(model)  # the cache must not keep the model (e.g. a randomised copy) alive

        @tf.function(reduce_retracing=True)
        def step(images: Any, classes: Any) -> tuple[Any, Any]:
            net = ref()
            with tf.GradientTape() as tape:
                tape.watch(images)
                out = tf.cast(net(images, training=False), tf.float32)
                score = out[:, 0] if out.shape[-1] == 1 else tf.gather(out, classes, axis=1, batch_dims=1)
            grads = tape.gradient(score, images)
            if grads is None:  # raised while tracing, i.e. on the first call
                raise GradCamError(f"the output of {net.name!r} has no gradient with respect to its input")
            return tf.cast(grads, tf.float32), score

        _GRADS[model] = step
        return step


def _gradients(model: Any, images: np.ndarray, classes: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradients and scores of ``images`` in chunks of ``batch_size``."""
    import tensorflow as tf

    step = _gradient_step(model)
    grads, scores = [], []
    for start in range(0, len(images), batch_size):
        g, s = step(tf.convert_to_tensor(images[start:start + batch_size], tf.float32),
                    tf.convert_to_tensor(classes[start:start + batch_size], tf.int32))
        grads.append(g.numpy())
        scores.append(s.numpy())
    return np.concatenate(grads), np.concatenate(scores)


def explained_classes(model: Any, images: np.ndarray, class_index: int | None = None) -> np.ndarray:
    """The class each image is explained for (0 for binary models, whose one output is explained)."""
    if class_index is not None:
        return np.full(len(images), int(class_index), np.int32)
    out = np.asarray(model(images, training=False))
    return np.zeros(len(images), np.int32) if out.shape[-1] == 1 else out.argmax(-1).astype(np.int32)


def baseline_for(images: np.ndarray, kind: str) -> np.ndarray:
    """The IG baseline: zeros (``black``) or each image under a strong Gaussian blur (σ = side / 10)."""
    if kind == "black":
        return np.zeros_like(images)
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        sigma = max(images.shape[1:3]) / 10
        return np.stack([gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest") for img in images])
    raise ValueError(f"IG baseline {kind!r} is not one of {', '.join(BASELINES)} (evaluate.ig_baseline)")


@dataclass
class IntegratedGradients:
    attributions: np.ndarray  # (n, H, W, C) signed
    delta: np.ndarray  # f(x) − f(baseline) per image
    relative_error: np.ndarray  # |Σ attributions − delta| / |delta| per image (nan when delta ≈ 0)

    def maps(self) -> np.ndarray:
        """``(n, H, W)``: the absolute per-pixel attribution (channels summed first)."""
        return np.abs(self.attributions.sum(axis=-1))


def integrated_gradients(model: Any, images: np.ndarray, *, steps: int = 32, baseline: str = "black",
                         class_index: int | None = None, batch_size: int = 32) -> IntegratedGradients:
    """Integrated Gradients of ``images`` ``(n, H, W, C)`` with the completeness check."""
    images = np.asarray(images, np.float32)
    base = baseline_for(images, baseline)
    classes = explained_classes(model, images, class_index)
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    weights = np.full(steps + 1, 1.0 / steps, np.float32)
    weights[[0, -1]] /= 2  # trapezoid rule
    attributions, delta = np.empty_like(images), np.empty(len(images))
    for i, (x, b) in enumerate(zip(images, base, strict=True)):
        path = b[None] + alphas[:, None, None, None] * (x - b)[None]
        grads, scores = _gradients(model, path, np.full(len(path), classes[i], np.int32), batch_size)
        attributions[i] = (x - b) * np.tensordot(weights, grads, axes=1)
        delta[i] = float(scores[-1] - scores[0])
    total = attributions.reshape(len(images), -1).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(delta) > 1e-6, np.abs(total - delta) / np.abs(delta), np.nan)
    return IntegratedGradients(attributions, delta, rel)


def saliency(model: Any, images: np.ndarray, *, samples: int = 16, sigma: float = 0.15,
             class_index: int | None = None, batch_size: int = 32, seed: int = 0) -> np.ndarray:
    """SmoothGrad maps ``(n, H, W)``: ``Σ_c |mean over noisy copies of ∂f/∂x|``; vanilla when samples or σ is 0."""
    images = np.asarray(images, np.float32)
    classes = explained_classes(model, images, class_index)
    if samples <= 0 or sigma <= 0:
        grads, _ = _gradients(model, images, classes, batch_size)
        return np.abs(grads).sum(axis=-1)
    rng = np.random.default_rng(seed)
    out = np.empty(images.shape[:3], np.float32)
    for i, x in enumerate(images):
        scale = sigma * max(float(np.ptp(x)), 1e-6)
        noisy = x[None] + rng.normal(0.0, scale, size=(samples, *x.shape)).astype(np.float32)
        grads, _ = _gradients(model, noisy, np.full(samples, classes[i], np.int32), batch_size)
        out[i] = np.abs(grads.mean(axis=0)).sum(axis=-1)
    return out


# --------------------------------------------------------------------------- one interface for all methods


def raw_maps(model: Any, images: np.ndarray, method: str, options: AttributionOptions,
             class_index: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Non-negative maps ``(n, H, W)`` at the input resolution and method-specific figures.

    Raises:
        ValueError: unknown method (the message lists the valid ones).
    """
    images = np.asarray(images, np.float32)
    if method == "gradcam":
        return grad_cam_for(model).heatmaps(images, class_index), {}
    if method == "integrated_gradients":
        ig = integrated_gradients(model, images, steps=options.ig_steps, baseline=options.ig_baseline,
                                  class_index=class_index, batch_size=options.batch_size)
        return ig.maps(), {"completeness": completeness_summary(ig)}
    if method == "smoothgrad":
        return saliency(model, images, samples=options.smoothgrad_samples, sigma=options.smoothgrad_sigma,
                        class_index=class_index, batch_size=options.batch_size, seed=options.seed), {}
    raise ValueError(unknown_method_message(method))


def unknown_method_message(method: str) -> str:
    return f"unknown explanation method {method!r}: use one of {', '.join(METHODS)}"


def completeness_summary(ig: IntegratedGradients) -> dict[str, Any]:
    rel = ig.relative_error[np.isfinite(ig.relative_error)]
    return {"max_relative_error": round(float(rel.max()), 5) if len(rel) else None,
            "mean_relative_error": round(float(rel.mean()), 5) if len(rel) else None,
            "delta": [round(float(d), 5) for d in ig.delta]}


def to_heatmaps(maps: np.ndarray) -> np.ndarray:
    """Each map scaled by its 99th percentile and clipped to [0, 1] (gradient maps are spiky)."""
    maps = np.maximum(np.asarray(maps, np.float32), 0.0)
    peak = np.percentile(maps.reshape(len(maps), -1), 99, axis=1).reshape(-1, 1, 1)
    peak = np.where(peak > 0, peak, maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1))
    return np.clip(np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0), 0.0, 1.0)


def explain(model: Any, image_batch: np.ndarray, method: str = "gradcam", options: AttributionOptions | None = None,
            class_index: int | None = None) -> tuple[np.ndarray, bytes]:
    """Heatmaps ``(n, H, W)`` in [0, 1] and one overlay PNG (side by side for n > 1) for any of :data:`METHODS`."""
    batch = np.asarray(image_batch, np.float32)
    if batch.ndim == 3:
        batch = batch[None]
    maps, _ = raw_maps(model, batch, method, options or AttributionOptions(), class_index)
    heat = maps if method == "gradcam" else to_heatmaps(maps)
    strip = np.concatenate([overlay(img, h) for img, h in zip(batch, heat, strict=True)], axis=1)
    return heat, png_bytes(strip)


def sanity_check(model: Any, images: np.ndarray, method: str, options: AttributionOptions, *,
                 max_rank_corr: float, seed: int) -> dict[str, Any]:
    """Model-parameter randomisation test of ``method``: mean |Spearman| of trained vs randomised maps."""
    trained, _ = raw_maps(model, images, method, options)
    randomised, _ = raw_maps(randomised_copy(model, seed), images, method, options)
    rho = rank_correlations(trained, randomised)
    finite = np.abs(rho[np.isfinite(rho)])
    score = float(finite.mean()) if len(finite) else float("nan")
    return {"rank_corr": round(score, 4) if score == score else None, "threshold": max_rank_corr,
            "passed": bool(score == score and score <= max_rank_corr), "n_images": int(len(images)),
            "per_image": [round(float(r), 4) if r == r else None for r in rho]}


# --------------------------------------------------------------------------- evaluation examples


@dataclass
class MethodExamples:
    """One method's overlays of the selected test images, its sanity check and lung-field mass."""

    cells: dict[str, list[dict[str, Any]]]  # cell → [{"overlay": uint8 (H, W, 3), "proba": float, "label": int}]
    sanity: dict[str, Any]
    lung_mass: dict[str, Any]
    extra: dict[str, Any]  # e.g. IG completeness

    def summary(self) -> dict[str, Any]:
        return {"status": "pass" if self.sanity["passed"] else "fail", "sanity": self.sanity,
                "lung_mass": self.lung_mass, **self.extra}


def explain_examples_by_method(model: Any, load: Callable[[list[int]], np.ndarray], y: np.ndarray,
                               proba: np.ndarray, threshold: float | None, *, per_cell: int,
                               methods: dict[str, float], options: AttributionOptions,
                               seed: int) -> dict[str, MethodExamples]:
    """Overlays, sanity check and lung mass of each method on the same selected test images.

    Args:
        load: returns the preprocessed images of the given test indices (only those are read).
        methods: method → its sanity threshold (max rank correlation trained vs randomised).
    """
    chosen = select_examples(y, proba, threshold, per_cell)
    flat = sorted({i for idx in chosen.values() for i in idx})
    if len(flat) < 4:  # too few examples: run the sanity check on more images
        flat = sorted(set(flat) | set(range(min(len(y), 8))))
    images = np.asarray(load(flat), np.float32)
    pos = {i: k for k, i in enumerate(flat)}
    proba = np.asarray(proba, float)
    top = proba.max(axis=1) if proba.ndim > 1 else proba
    out = {}
    for method, max_rank_corr in methods.items():
        maps, extra = raw_maps(model, images, method, options)
        heat = maps if method == "gradcam" else to_heatmaps(maps)
        cells = {cell: [{"overlay": overlay(images[pos[i]], heat[pos[i]]), "proba": float(top[i]),
                         "label": int(y[i])} for i in idx] for cell, idx in chosen.items()}
        if method == "gradcam":  # Grad-CAM's check compares raw maps at feature-map resolution
            sanity = gradcam_sanity_check(model, images, max_rank_corr=max_rank_corr, seed=seed)
        else:
            sanity = sanity_check(model, images, method, options, max_rank_corr=max_rank_corr, seed=seed)
        out[method] = MethodExamples(cells, sanity, lung_mass(maps), extra)
    return out


def sanity_thresholds(cfg: Any) -> dict[str, float]:
    """``evaluate.explain_methods`` → each method's max rank correlation (``evaluate.*_sanity_max_rank_corr``)."""
    limits = {"gradcam": cfg.gradcam_sanity_max_rank_corr, "integrated_gradients": cfg.ig_sanity_max_rank_corr,
              "smoothgrad": cfg.smoothgrad_sanity_max_rank_corr}
    return {method: float(limits[method]) for method in cfg.explain_methods}
