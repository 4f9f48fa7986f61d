"""Post-hoc calibration of a binary model, folded into its output layer.

A small CNN trained with early stopping on a few hundred patients is often over- or under-confident:
its probabilities are what the clinician sees, what the gate's ECE judges and what label-free monitoring
(CBPE) trusts. Platt scaling fits ``logit p' = a + b·logit p`` on the validation split once training is
over. The output unit is ``p = sigmoid(w·x + c)``, so ``p' = sigmoid(b·w·x + (b·c + a))``: the fit is
written into that layer's kernel and bias. The saved model then outputs calibrated probabilities itself —
serving, ONNX export and every later evaluation see them without any extra step — and the ranking (AUC)
is unchanged because ``b > 0`` (a fit with ``b ≤ 0`` is not applied: validation scores run against the
labels, and folding it would invert the model).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.evaluation.calibration import logit, platt_fit
from pipeline.evaluation.metrics import expected_calibration_error

logger = logging.getLogger(__name__)

OUTPUT_LAYER = "predictions"  # classification_head's name: every zoo builder ends with it


def scores_and_labels(model: Any, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """The model's positive-class scores and the labels, over one pass of ``dataset`` (images, labels)."""
    scores, labels = [], []
    for images, y in dataset:
        scores.append(np.asarray(model(images, training=False), dtype=np.float64).reshape(-1))
        labels.append(np.asarray(y).reshape(-1))
    return np.concatenate(scores), np.concatenate(labels).astype(int)


def fold_platt(model: Any, a: float, b: float) -> None:
    """Write ``logit p' = a + b·logit p`` into the sigmoid output unit's kernel and bias."""
    import keras

    layer = model.get_layer(OUTPUT_LAYER)
    if getattr(layer, "units", None) != 1 or layer.activation is not keras.activations.sigmoid:
        raise ValueError(f"{model.name}: the output layer {OUTPUT_LAYER!r} is not one sigmoid unit; "
                         "Platt scaling cannot be folded into it")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * b, bias * b + a])


def calibrate_binary(model: Any, val_ds: Any, method: str, bins: int = 10) -> dict[str, Any]:
    """Fit ``method`` (``platt`` | ``none``) on the validation pipeline and fold it into ``model``.

    Returns what to record: ``{"method", "a", "b", "val_ece_before", "val_ece_after"}`` (``method`` reads
    ``none`` or ``skipped: <why>`` when nothing was changed).
    """
    p, y = scores_and_labels(model, val_ds)
    before = expected_calibration_error(y, p, bins)
    if method == "none":
        return {"method": "none", "val_ece_before": round(before, 4)}
    fit = platt_fit(y, p)
    if fit is None or fit[1] <= 0:
        why = "no finite fit (one class or separated scores)" if fit is None else "slope <= 0 on validation"
        logger.warning("calibration skipped: %s; the model's own probabilities are kept", why)
        return {"method": f"skipped: {why}", "val_ece_before": round(before, 4)}
    a, b = fit
    fold_platt(model, a, b)
    p_new, _ = scores_and_labels(model, val_ds)
    expected = 1 / (1 + np.exp(-(a + b * logit(p))))
    inside = (p > 1e-5) & (p < 1 - 1e-5)  # logit clips beyond: compare where it does not
    if not np.allclose(p_new[inside], expected[inside], atol=1e-4):
        raise RuntimeError("Platt scaling folded into the output layer does not reproduce the fit "
                           f"(max difference {np.max(np.abs(p_new - expected)[inside]):.2e})")
    after = expected_calibration_error(y, p_new, bins)
    logger.info("calibrated on validation (Platt a=%.3f b=%.3f): ECE %.3f -> %.3f", a, b, before, after)
    return {"method": "platt", "a": round(a, 6), "b": round(b, 6), "val_ece_before": round(before, 4),
            "val_ece_after": round(after, 4)}
