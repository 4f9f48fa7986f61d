"""Performance per subgroup (site, manufacturer, view, sex, age band) with patient-level bootstrap CIs.

Pure numpy/pandas; no I/O. A subgroup *attribute* names a manifest column (``site`` reads the
``site`` column, else ``source``); absent columns are skipped and said so. Categories with fewer
than ``min_patients`` test patients are pooled into ``other`` (its members are counted, never
named); missing values form ``unknown``. Group values are category labels only: no patient or
image identifier reaches the output.

Each group's intervals resample that group's *patients* (:func:`~pipeline.evaluation.metrics.patient_weights`)
and every metric of all resamples is computed at once from the ``(R, n)`` weight matrix
(:func:`batched_binary_metrics`), so a table of ~20 groups × 500 resamples takes well under a second.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluation.calibration import calibration_intercept, calibration_slope
from pipeline.evaluation.metrics import batched_confusion, patient_weights, percentile_interval

# attribute → manifest columns it is read from, first present wins
SUBGROUP_COLUMNS: dict[str, tuple[str, ...]] = {
    "site": ("site", "source"),
    "manufacturer": ("manufacturer",),
    "view": ("view_position",),
    "sex": ("sex",),
    "age_band": ("age_band",),
}
SUBGROUP_ATTRIBUTES = tuple(SUBGROUP_COLUMNS)
OTHER, UNKNOWN = "other", "unknown"
SUBGROUP_METRICS = ("auc", "sensitivity", "specificity", "ppv", "npv", "ece", "brier", "calibration_slope",
                    "calibration_intercept")


# --------------------------------------------------------------------------- metrics over many resamples at once


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.full_like(a, np.nan, dtype=float), where=b > 0)


def batched_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted ROC-AUC (ties count ½) for each row of ``w`` (``(R, n)`` → ``(R,)``; NaN with one class)."""
    order = np.argsort(p, kind="mergesort")
    ps, pos = np.asarray(p, dtype=float)[order], np.asarray(y)[order] == 1
    ws = w[:, order]
    _, start, counts = np.unique(ps, return_index=True, return_counts=True)
    block = np.repeat(np.arange(len(start)), counts)
    neg_cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(ws * ~pos, axis=1)], axis=1)
    below = neg_cum[:, start[block]]  # negative weight strictly below each image's score
    tied = neg_cum[:, (start + counts)[block]] - below
    w_pos, w_neg = (ws * pos).sum(axis=1), (ws * ~pos).sum(axis=1)
    num = (ws * pos * (below + 0.5 * tied)).sum(axis=1)
    return _ratio(num, w_pos * w_neg)


def batched_ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width-bin ECE per row of ``w`` (the bins of ``metrics.expected_calibration_error``)."""
    edges = np.linspace(0, 1, bins + 1)
    onehot = np.eye(bins)[np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)]
    gap = np.abs((w * y) @ onehot - (w * p) @ onehot).sum(axis=1)
    return _ratio(gap, w.sum(axis=1))


def batched_binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray,
                           bins: int = 10) -> dict[str, np.ndarray]:
    """The subgroup metrics (:data:`SUBGROUP_METRICS`) at ``threshold`` for each row of the weights ``w``."""
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    w = np.atleast_2d(np.asarray(w, dtype=float))
    c = batched_confusion(y, p >= threshold, w)
    tp, fn, tn, fp = c["tp"], c["fn"], c["tn"], c["fp"]
    return {
        "auc": batched_auc(y, p, w),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "ece": batched_ece(y, p, w, bins),
        "brier": _ratio(w @ (p - y) ** 2, w.sum(axis=1)),
        "calibration_slope": calibration_slope(y, p, w),
        "calibration_intercept": calibration_intercept(y, p, w),
    }


# --------------------------------------------------------------------------- grouping


def attribute_column(frame: pd.DataFrame, attribute: str) -> str | None:
    """The manifest column ``attribute`` is read from: the first of its columns with a value (None: none has)."""
    return next((c for c in SUBGROUP_COLUMNS[attribute] if c in frame.columns and frame[c].notna().any()), None)


def group_labels(frame: pd.DataFrame, column: str, min_patients: int) -> tuple[np.ndarray, int]:
    """Per-image group label of ``column``: its category, ``unknown`` when missing, ``other`` when the
    category has fewer than ``min_patients`` patients. Returns the labels and how many categories were pooled."""
    values = frame[column].astype("string").fillna(UNKNOWN).replace("", UNKNOWN).astype(str).to_numpy()
    patients = frame.groupby(values)["patient_id"].nunique()
    small = set(patients[patients < min_patients].index)
    labels = np.array([OTHER if v in small else v for v in values], dtype=object)
    return labels, len(small)


@dataclass(frozen=True)
class SubgroupSpec:
    """How the table is built (from ``settings.evaluate``)."""

    attributes: Sequence[str]
    min_patients: int
    n_resamples: int
    seed: int
    level: float
    bins: int = 10


def _round(v: float) -> float | None:
    return round(float(v), 4) if np.isfinite(v) else None


def _group_row(attribute: str, label: str, y: np.ndarray, p: np.ndarray, patients: np.ndarray, threshold: float,
               spec: SubgroupSpec, pooled: int) -> dict[str, Any]:
    point = batched_binary_metrics(y, p, threshold, np.ones((1, len(y))), spec.bins)
    resampled = batched_binary_metrics(y, p, threshold, patient_weights(patients, spec.n_resamples, spec.seed),
                                       spec.bins)
    return {
        "attribute": attribute, "group": label, "patients": int(len(np.unique(patients))), "images": int(len(y)),
        "positives": int((y == 1).sum()), "pooled_categories": pooled if label == OTHER else 0,
        "metrics": {k: _round(v[0]) for k, v in point.items()},
        "ci": {k: [_round(x) for x in percentile_interval(v, spec.level)] for k, v in resampled.items()},
    }


def subgroup_table(frame: pd.DataFrame, y: np.ndarray, p: np.ndarray, threshold: float,
                   spec: SubgroupSpec) -> dict[str, Any]:
    """Binary metrics with patient-level bootstrap CIs per group of each attribute in ``spec``.

    Returns:
        ``{"min_patients", "ci_level", "resamples", "groups": [row, …], "attributes": {attribute: {"column",
        "groups", "pooled_categories"} or {"skipped": why}}}``; a row holds ``attribute``, ``group`` (a category
        label, ``other`` or ``unknown``), ``patients``, ``images``, ``positives``, ``metrics`` and ``ci``.
    """
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    patients = frame["patient_id"].astype(str).to_numpy()
    rows: list[dict[str, Any]] = []
    attributes: dict[str, Any] = {}
    for attribute in spec.attributes:
        column = attribute_column(frame, attribute)
        if column is None:
            attributes[attribute] = {"skipped": f"no {' or '.join(SUBGROUP_COLUMNS[attribute])} column in the manifest"}
            continue
        labels, pooled = group_labels(frame, column, spec.min_patients)
        names = sorted(set(labels), key=lambda v: (v in (OTHER, UNKNOWN), v))
        for label in names:
            idx = np.flatnonzero(labels == label)
            rows.append(_group_row(attribute, label, y[idx], p[idx], patients[idx], threshold, spec, pooled))
        attributes[attribute] = {"column": column, "groups": len(names), "pooled_categories": pooled}
    return {"min_patients": spec.min_patients, "ci_level": spec.level, "resamples": spec.n_resamples,
            "attributes": attributes, "groups": rows}


def subgroup_auc(frame: pd.DataFrame, y: np.ndarray, p: np.ndarray, attribute: str,
                 min_patients: int) -> dict[str, float | None]:
    """Point AUC per group of ``attribute`` (grouped as :func:`subgroup_table` does), e.g. for a re-scored champion."""
    column = attribute_column(frame, attribute)
    if column is None:
        return {}
    labels, _ = group_labels(frame, column, min_patients)
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    out: dict[str, float | None] = {}
    for label in sorted(set(labels)):
        m = labels == label
        out[str(label)] = _round(batched_auc(y[m], p[m], np.ones((1, int(m.sum()))))[0])
    return out


def rows_of(table: Mapping[str, Any] | None, attribute: str) -> list[dict[str, Any]]:
    """The rows of ``attribute`` in a :func:`subgroup_table` result (``[]`` when absent)."""
    return [r for r in (table or {}).get("groups", []) if r.get("attribute") == attribute]


def eligible(rows: Iterable[Mapping[str, Any]], min_patients: int) -> list[Mapping[str, Any]]:
    """Rows with at least ``min_patients`` patients."""
    return [r for r in rows if r.get("patients", 0) >= min_patients]
