"""Clinical metrics, operating points and patient-level bootstrap confidence intervals.

Pure numpy/scikit-learn; no I/O. The bootstrap resamples *patients*, not images: images
of one patient are correlated, so an image-level bootstrap understates uncertainty.
Resamples are expressed as per-image weights (how often the image's patient was drawn),
which keeps every resample a cheap weighted metric evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]
# a metric evaluated once per row of ``(R, n)`` weights: ``(y, p, w) -> (R,)``
BatchedMetric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- binary metrics


def _auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    mask = w > 0
    if len(np.unique(y[mask])) < 2:
        return float("nan")
    return float(roc_auc_score(y[mask], p[mask], sample_weight=w[mask]))


def _pr_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    mask = w > 0
    if y[mask].sum() == 0:
        return float("nan")
    return float(average_precision_score(y[mask], p[mask], sample_weight=w[mask]))


def confusion_cells(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of the four binary confusion cells (``tp``, ``fn``, ``tn``, ``fp``).

    The one definition of the cells: every count below (scalar, weighted, batched) sums over these masks.
    """
    y, pred = np.asarray(y), np.asarray(pred)
    return {"tp": (y == 1) & (pred == 1), "fn": (y == 1) & (pred == 0),
            "tn": (y == 0) & (pred == 0), "fp": (y == 0) & (pred == 1)}


def confusion(y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None) -> dict[str, float]:
    """(Weighted) counts of the binary confusion cells."""
    w = np.ones_like(y, dtype=float) if w is None else w
    return {cell: float(w[mask].sum()) for cell, mask in confusion_cells(y, pred).items()}


def batched_confusion(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`confusion` for each row of the weights ``w`` at once (``(R, n)`` → ``(R,)`` per cell)."""
    return {cell: w @ mask for cell, mask in confusion_cells(y, pred).items()}


def confusion_counts(y: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """Unweighted binary confusion counts as integers."""
    return {cell: int(v) for cell, v in confusion(y, pred).items()}


def confusion_array(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """``k × k`` integer counts, rows = true class, columns = predicted class."""
    m = np.zeros((k, k), int)
    np.add.at(m, (np.asarray(y).astype(int), np.asarray(pred).astype(int)), 1)
    return m


def confusion_matrix(y: np.ndarray, pred: np.ndarray, k: int) -> list[list[int]]:
    """:func:`confusion_array` as nested lists (for JSON and MLflow)."""
    return confusion_array(y, pred, k).tolist()


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10, w: np.ndarray | None = None) -> float:
    """ECE with equal-width bins (weighted by bin mass)."""
    w = np.ones_like(p, dtype=float) if w is None else w
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    total = w.sum()
    ece = 0.0
    for b in range(bins):
        m = (idx == b) & (w > 0)
        if m.any():
            wb = w[m]
            ece += wb.sum() / total * abs(np.average(y[m], weights=wb) - np.average(p[m], weights=wb))
    return float(ece)


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float, *, bins: int = 10,
                   w: np.ndarray | None = None) -> dict[str, float]:
    """Headline binary metrics at ``threshold`` (optionally weighted, for the bootstrap)."""
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=float)
    w = np.ones_like(p) if w is None else np.asarray(w, dtype=float)
    pred = (p >= threshold).astype(int)
    c = confusion(y, pred, w)
    sens, spec = _ratio(c["tp"], c["tp"] + c["fn"]), _ratio(c["tn"], c["tn"] + c["fp"])
    ppv, npv = _ratio(c["tp"], c["tp"] + c["fp"]), _ratio(c["tn"], c["tn"] + c["fn"])
    return {
        "auc": _auc(y, p, w),
        "pr_auc": _pr_auc(y, p, w),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": npv,
        "f1": _ratio(2 * ppv * sens, ppv + sens) if ppv == ppv and sens == sens else float("nan"),
        "accuracy": _ratio(c["tp"] + c["tn"], sum(c.values())),
        "brier": float(np.average((p - y) ** 2, weights=w)) if w.sum() > 0 else float("nan"),
        "ece": expected_calibration_error(y, p, bins, w),
    }


def multiclass_metrics(y: np.ndarray, proba: np.ndarray, w: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class recall (``recall_<k>``)."""
    from sklearn.metrics import f1_score, recall_score

    y = np.asarray(y, dtype=int)
    pred = proba.argmax(axis=1)
    w = np.ones(len(y)) if w is None else w
    labels = np.arange(proba.shape[1])
    recalls = recall_score(y, pred, labels=labels, average=None, sample_weight=w, zero_division=0)
    out = {
        "accuracy": float(np.average(pred == y, weights=w)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", sample_weight=w, zero_division=0)),
    }
    out.update({f"recall_{k}": float(r) for k, r in zip(labels, recalls, strict=True)})
    return out


# --------------------------------------------------------------------------- operating point


def choose_threshold(y: np.ndarray, p: np.ndarray, policy: str, *, sensitivity_floor: float = 0.9,
                     fixed: float = 0.5) -> dict[str, Any]:
    """Pick the operating threshold on validation data.

    Policies: ``sensitivity_floor`` (highest threshold whose sensitivity ≥ floor, which
    maximises specificity under the floor), ``youden`` (max sensitivity + specificity − 1),
    ``fixed``.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y, dtype=int)
    if policy == "fixed" or len(np.unique(y)) < 2:
        thr = float(fixed)
        reason = "fixed" if policy == "fixed" else "validation split has one class; fell back to fixed"
    else:
        fpr, tpr, thresholds = roc_curve(y, p)
        thresholds = np.clip(thresholds, 0.0, 1.0)
        if policy == "youden":
            i = int(np.argmax(tpr - fpr))
            reason = "max Youden J"
        else:
            ok = np.flatnonzero(tpr >= sensitivity_floor)
            i = int(ok[np.argmin(fpr[ok])]) if len(ok) else len(tpr) - 1
            reason = f"max specificity with sensitivity >= {sensitivity_floor}"
        thr = _margin_threshold(np.asarray(p, dtype=float), float(thresholds[i]))
    m = binary_metrics(y, p, thr)
    return {"policy": policy, "threshold": thr, "reason": reason,
            "val_sensitivity": m["sensitivity"], "val_specificity": m["specificity"]}


def _margin_threshold(p: np.ndarray, roc_threshold: float) -> float:
    """Midpoint between the ROC threshold and the next lower score.

    Every threshold in that gap gives the same validation confusion matrix; the ROC
    curve reports its upper edge, which puts the cut right at the lowest detected
    positive. The midpoint keeps the validation operating point and leaves a margin for
    unseen cases.
    """
    below = p[p < roc_threshold]
    return float((roc_threshold + below.max()) / 2) if len(below) else roc_threshold


# --------------------------------------------------------------------------- bootstrap


def patient_weights(patients: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n_images)`` weights: how often each image's patient was drawn."""
    uniq, inverse = np.unique(np.asarray(patients), return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(n_resamples, len(uniq)))
    counts = np.zeros((n_resamples, len(uniq)))
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1)
    return counts[:, inverse]


def bootstrap_ci(stat: Callable[[np.ndarray], dict[str, float]], weights: np.ndarray,
                 level: float) -> dict[str, list[float]]:
    """Percentile intervals of every metric ``stat(w)`` returns over the resample weights."""
    samples: dict[str, list[float]] = {}
    for w in weights:
        for k, v in stat(w).items():
            samples.setdefault(k, []).append(v)
    return {k: percentile_interval(vals, level) for k, vals in samples.items()}


def percentile_interval(samples: Any, level: float) -> list[float]:
    """Central percentile interval (numpy's default linear quantiles) of the finite ``samples``;
    ``[nan, nan]`` when none is finite."""
    arr = np.asarray(samples, dtype=float)
    arr = arr[np.isfinite(arr)]
    if not len(arr):
        return [float("nan"), float("nan")]
    alpha = (1 - level) / 2
    return [float(np.quantile(arr, alpha)), float(np.quantile(arr, 1 - alpha))]


def batched_paired_delta(metric: BatchedMetric, y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray,
                         weights: np.ndarray, level: float) -> dict[str, Any]:
    """``metric`` new − old on the same images, point and per resample of the ``(R, n)`` ``weights``.

    Returns ``{"new", "old": point values, "delta": new − old, "ci": percentile interval of the finite
    resampled deltas, "resamples": how many were finite}``.
    """
    ones = np.ones((1, len(y)))
    new, old = metric(y, p_new, ones)[0], metric(y, p_old, ones)[0]
    deltas = np.asarray(metric(y, p_new, weights) - metric(y, p_old, weights), dtype=float)
    return {"new": float(new), "old": float(old), "delta": float(new - old),
            "ci": percentile_interval(deltas, level), "resamples": int(np.isfinite(deltas).sum())}


def _rowwise(metric: Metric) -> BatchedMetric:
    """A scalar ``metric`` as a :data:`BatchedMetric`: evaluated once per weight row."""
    return lambda y, p, w: np.array([metric(y, p, row) for row in w])


def paired_delta(metric: Metric, name: str, y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray,
                 patients: np.ndarray, *, n_resamples: int, seed: int, level: float) -> dict[str, Any]:
    """``metric`` new − old on the same images, with a paired patient-level bootstrap CI.

    Returns ``{"delta_<name>": point estimate, "ci": [lo, hi], "resamples": finite resamples used}``.
    """
    out = batched_paired_delta(_rowwise(metric), np.asarray(y, dtype=int), p_new, p_old,
                               patient_weights(patients, n_resamples, seed), level)
    return {f"delta_{name}": out["delta"], "ci": out["ci"], "resamples": out["resamples"]}


def _top1_accuracy(y: np.ndarray, proba: np.ndarray, w: np.ndarray) -> float:
    return float(w @ (np.asarray(proba).argmax(1) == y).astype(float)) / float(w.sum())


def paired_delta_auc(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, patients: np.ndarray, *,
                     n_resamples: int, seed: int, level: float) -> dict[str, Any]:
    """ΔAUC (new − old) on the same images with a paired patient-level bootstrap CI."""
    return paired_delta(_auc, "auc", y, p_new, p_old, patients, n_resamples=n_resamples, seed=seed, level=level)


def paired_delta_accuracy(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, patients: np.ndarray, *,
                          n_resamples: int, seed: int, level: float) -> dict[str, Any]:
    """Δaccuracy (arg-max; new − old) on the same images with a paired patient-level bootstrap CI."""
    return paired_delta(_top1_accuracy, "accuracy", y, p_new, p_old, patients, n_resamples=n_resamples,
                        seed=seed, level=level)
