"""Failure analysis of one evaluated version: confident errors, error rates by subgroup and image quality, and a
shortcut test (performance when a region that may hold a spurious cue is masked or shuffled).

- **Confident errors**: the ``top_k`` false positives with the highest and false negatives with the lowest
  probability, each identified only by the manifest's ``image_id`` (a content-hash prefix; never a path or patient
  id), with its label, subgroup values (grouped and pooled as :mod:`pipeline.evaluation.subgroups` does, so a rare
  category shows as ``other``) and image-quality features.
- **Error rates**: FP rate among negatives and FN rate among positives, per subgroup and per quantile bin of each
  quality feature, with patient-level bootstrap CIs; bins with fewer than ``min_patients`` patients are merged
  with a neighbour (bins stay contiguous intervals).
- **Shortcut test**: each mask (rectangles in relative ``[x0, y0, x1, y1]`` coordinates) is filled with the
  test set's median pixel of that region (one constant for every image, so no information is left in it) and the
  test set is re-scored once; ``shuffle_within_site`` also swaps the region's content between images of the same
  site (re-scored once more). ΔAUC (masked − original) gets a paired patient-level bootstrap CI; a shortcut is
  flagged when the drop is larger than ``auc_drop_alert`` *and* the interval lies below zero (on a small test set
  a point drop alone is often noise; the report keeps every ΔAUC and its interval either way).

Pure numpy/pandas; the model enters only as a ``predict(images) -> probabilities`` callable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Settings
from pipeline.evaluation.metrics import batched_confusion, batched_paired_delta, patient_weights, percentile_interval
from pipeline.evaluation.subgroups import UNKNOWN, attribute_column, batched_auc, group_labels
from pipeline.registry.contract import FAILURE_ANALYSIS_ARTIFACT

logger = logging.getLogger(__name__)

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 relative to the image side
Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FailureSpec:
    """How the analysis is run (from ``settings.evaluate``)."""

    top_k: int
    attributes: Sequence[str]
    quality_features: Sequence[str]
    quality_bins: int
    min_patients: int
    n_resamples: int
    seed: int
    level: float
    masks: Mapping[str, Sequence[Rect]]
    shuffle_within_site: bool = True
    auc_drop_alert: float = 0.05

    @classmethod
    def from_settings(cls, settings: Settings) -> FailureSpec:
        cfg = settings.evaluate
        return cls(cfg.failure_top_k, cfg.subgroup_attributes, cfg.quality_features, cfg.quality_bins,
                   cfg.subgroup_min_patients, cfg.bootstrap_resamples, settings.base.seed, cfg.ci_level,
                   cfg.shortcut_masks, cfg.shortcut_shuffle_within_site, cfg.shortcut_auc_drop_alert)


def _r(v: Any) -> float | None:
    v = float(v)
    return round(v, 4) if np.isfinite(v) else None


def _pooled_attributes(frame: pd.DataFrame, attributes: Sequence[str], min_patients: int) -> dict[str, np.ndarray]:
    """Per-image group label of each attribute present in ``frame`` (small categories → ``other``)."""
    out = {}
    for attribute in attributes:
        column = attribute_column(frame, attribute)
        if column is not None:
            out[attribute] = group_labels(frame, column, min_patients)[0]
    return out


# --------------------------------------------------------------------------- confident errors


def confident_errors(frame: pd.DataFrame, y: np.ndarray, p: np.ndarray, threshold: float,
                     spec: FailureSpec) -> dict[str, list[dict[str, Any]]]:
    """The ``top_k`` most confident false positives (highest probability first) and false negatives (lowest first).

    Returns:
        ``{"false_positives": [row, …], "false_negatives": [row, …]}``; a row holds ``image_id``, ``probability``,
        ``label``, ``subgroups`` and ``quality`` — nothing else that could identify an image or a patient.
    """
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    groups = _pooled_attributes(frame, spec.attributes, spec.min_patients)
    features = [f for f in spec.quality_features if f in frame]
    labels = frame["label"].astype(str).to_numpy() if "label" in frame else y.astype(str)
    ids = frame["image_id"].astype(str).to_numpy()

    def row(i: int) -> dict[str, Any]:
        return {"image_id": ids[i], "probability": _r(p[i]), "label": labels[i],
                "subgroups": {a: str(g[i]) for a, g in groups.items()},
                "quality": {f: _r(frame[f].iloc[i]) for f in features}}

    fp = np.flatnonzero((y == 0) & (p >= threshold))
    fn = np.flatnonzero((y == 1) & (p < threshold))
    fp = fp[np.argsort(-p[fp], kind="mergesort")][: spec.top_k]
    fn = fn[np.argsort(p[fn], kind="mergesort")][: spec.top_k]
    return {"false_positives": [row(int(i)) for i in fp], "false_negatives": [row(int(i)) for i in fn]}


# --------------------------------------------------------------------------- error rates


def quality_bins(values: np.ndarray, patients: np.ndarray, bins: int, min_patients: int) -> tuple[np.ndarray, int]:
    """Quantile-bin labels (``"[lo, hi]"``, ``unknown`` when missing) of one quality feature.

    Bins with fewer than ``min_patients`` patients are merged with their smaller neighbour until none is left
    (or one bin remains). Returns the labels and how many merges were made.
    """
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    labels = np.full(len(values), UNKNOWN, dtype=object)
    if not finite.any():
        return labels, 0
    edges = np.unique(np.quantile(values[finite], np.linspace(0, 1, bins + 1)))
    index = np.clip(np.searchsorted(edges[1:-1], values, side="right"), 0, max(len(edges) - 2, 0))
    spans = [[b, b] for b in range(max(len(edges) - 1, 1))]  # bins as ranges of elementary bins

    def n_patients(span: list[int]) -> int:
        return int(pd.unique(patients[finite & (index >= span[0]) & (index <= span[1])]).size)

    merges = 0
    while len(spans) > 1:
        counts = [n_patients(s) for s in spans]
        small = int(np.argmin(counts))
        if counts[small] >= min_patients:
            break
        neighbours = [j for j in (small - 1, small + 1) if 0 <= j < len(spans)]
        other = min(neighbours, key=lambda j: counts[j])
        lo, hi = sorted((small, other))
        spans[lo:hi + 1] = [[spans[lo][0], spans[hi][1]]]
        merges += 1
    hi_edges = edges if len(edges) > 1 else np.repeat(edges, 2)
    for lo, hi in spans:
        inside = finite & (index >= lo) & (index <= hi)
        labels[inside] = f"[{hi_edges[lo]:.4g}, {hi_edges[hi + 1]:.4g}]"
    return labels, merges


def _rate_row(attribute: str, group: str, y: np.ndarray, pred: np.ndarray, patients: np.ndarray,
              spec: FailureSpec) -> dict[str, Any]:
    """FP rate among negatives and FN rate among positives of one group, with patient-level CIs."""
    w = np.vstack([np.ones(len(y)), patient_weights(patients, spec.n_resamples, spec.seed)])
    c = batched_confusion(y, pred, w)  # row 0: the plain counts; then one row per resample
    with np.errstate(invalid="ignore", divide="ignore"):
        fp_rate = c["fp"] / (c["fp"] + c["tn"])
        fn_rate = c["fn"] / (c["fn"] + c["tp"])
    return {"attribute": attribute, "group": group, "patients": int(pd.unique(patients).size),
            "images": int(len(y)), "negatives": int(c["fp"][0] + c["tn"][0]), "positives": int(c["fn"][0] + c["tp"][0]),
            "false_positives": int(c["fp"][0]), "false_negatives": int(c["fn"][0]),
            "fp_rate": _r(fp_rate[0]), "fp_rate_ci": [_r(v) for v in percentile_interval(fp_rate[1:], spec.level)],
            "fn_rate": _r(fn_rate[0]), "fn_rate_ci": [_r(v) for v in percentile_interval(fn_rate[1:], spec.level)]}


def error_rates(frame: pd.DataFrame, y: np.ndarray, p: np.ndarray, threshold: float,
                spec: FailureSpec) -> dict[str, Any]:
    """Error rates overall, per subgroup and per quality-feature bin.

    Returns:
        ``{"overall": row, "subgroups": [row, …], "quality": [row, …], "quality_merges": {feature: n}}``; a row
        holds ``attribute``, ``group``, counts, ``fp_rate``/``fn_rate`` and their ``_ci``.
    """
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    pred = (p >= threshold).astype(int)
    patients = frame["patient_id"].astype(str).to_numpy()

    def rows(attribute: str, labels: np.ndarray) -> list[dict[str, Any]]:
        names = sorted(set(labels), key=lambda v: (v in ("other", UNKNOWN), v))
        return [_rate_row(attribute, str(g), y[m], pred[m], patients[m], spec)
                for g in names for m in [labels == g]]

    subgroups = [r for a, labels in _pooled_attributes(frame, spec.attributes, spec.min_patients).items()
                 for r in rows(a, labels)]
    quality, merges = [], {}
    for feature in (f for f in spec.quality_features if f in frame):
        labels, merges[feature] = quality_bins(frame[feature].to_numpy(), patients, spec.quality_bins,
                                               spec.min_patients)
        quality += sorted(rows(feature, labels), key=lambda r: _bin_start(r["group"]))
    return {"overall": _rate_row("all", "all", y, pred, patients, spec), "subgroups": subgroups,
            "quality": quality, "quality_merges": merges}


def _bin_start(label: str) -> float:
    return float(label[1:].split(",")[0]) if label.startswith("[") else float("inf")


# --------------------------------------------------------------------------- shortcut test


def region_mask(height: int, width: int, rects: Sequence[Rect]) -> np.ndarray:
    """Boolean ``(height, width)`` mask of the union of relative rectangles ``[x0, y0, x1, y1]``."""
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in rects:
        r0, r1 = int(np.floor(y0 * height)), int(np.ceil(y1 * height))
        c0, c1 = int(np.floor(x0 * width)), int(np.ceil(x1 * width))
        mask[r0:r1, c0:c1] = True
    return mask


def _shuffle_order(groups: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of the images that only moves an image within its group."""
    rng, order = np.random.default_rng(seed), np.arange(len(groups))
    for g in pd.unique(groups):
        idx = np.flatnonzero(groups == g)
        order[idx] = rng.permutation(idx)
    return order


def _rescored(y: np.ndarray, p: np.ndarray, p_new: np.ndarray, threshold: float, weights: np.ndarray,
              spec: FailureSpec) -> dict[str, Any]:
    paired = batched_paired_delta(batched_auc, y, p_new, p, weights, spec.level)
    delta, ci = paired["delta"], paired["ci"]
    pos = y == 1
    return {"auc": _r(paired["new"]), "sensitivity": _r((p_new[pos] >= threshold).mean()) if pos.any() else None,
            "delta_auc": _r(delta), "delta_auc_ci": [_r(v) for v in ci],
            "delta_sensitivity": _r((p_new[pos] >= threshold).mean() - (p[pos] >= threshold).mean())
            if pos.any() else None,
            "mean_abs_score_change": _r(np.abs(p_new - p).mean()),
            "flagged": bool(np.isfinite(delta) and delta < -spec.auc_drop_alert and ci[1] < 0)}


def shortcut_test(predict: Predict, images: np.ndarray, frame: pd.DataFrame, y: np.ndarray, p: np.ndarray,
                  threshold: float, spec: FailureSpec) -> dict[str, Any]:
    """Re-score the test images once per mask (and once more per mask for the within-site shuffle).

    ``images`` is ``(n, h, w, c)``; it is modified in place during each re-scoring and restored afterwards.

    Returns:
        ``{"auc", "sensitivity", "alert_drop", "flagged": [mask/variant, …], "masks": {name: {"pixels_share",
        "mask": {...}, "shuffle_within_site": {...}}}}``; each variant holds ``auc``, ``sensitivity``,
        ``delta_auc`` (masked − original) and its ``delta_auc_ci``, ``delta_sensitivity``, ``flagged``.
    """
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    weights = patient_weights(frame["patient_id"].astype(str).to_numpy(), spec.n_resamples, spec.seed)
    site_column = attribute_column(frame, "site")
    sites = (frame[site_column].astype(str).to_numpy() if site_column else np.zeros(len(y), dtype=object))
    order = _shuffle_order(sites, spec.seed)
    pos = y == 1
    out: dict[str, Any] = {"auc": _r(batched_auc(y, p, np.ones((1, len(y))))[0]),
                           "sensitivity": _r((p[pos] >= threshold).mean()) if pos.any() else None,
                           "alert_drop": spec.auc_drop_alert, "shuffled_within": site_column or "all images",
                           "masks": {}, "flagged": []}
    for name, rects in spec.masks.items():
        mask = region_mask(images.shape[1], images.shape[2], rects)
        if not mask.any():
            out["masks"][name] = {"skipped": "empty region at this image size"}
            continue
        saved = images[:, mask].copy()  # (n, pixels, c)
        entry: dict[str, Any] = {"rects": [list(r) for r in rects], "pixels_share": _r(mask.mean())}
        try:
            images[:, mask] = np.median(saved, axis=(0, 1))
            entry["mask"] = _rescored(y, p, _proba(predict(images)), threshold, weights, spec)
            if spec.shuffle_within_site:
                images[:, mask] = saved[order]
                entry["shuffle_within_site"] = _rescored(y, p, _proba(predict(images)), threshold, weights, spec)
        finally:
            images[:, mask] = saved
        out["masks"][name] = entry
        out["flagged"] += [f"{name}/{v}" for v in ("mask", "shuffle_within_site") if entry.get(v, {}).get("flagged")]
    return out


def _proba(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    return scores[:, 0] if scores.ndim == 2 else scores


# --------------------------------------------------------------------------- the report


def failure_analysis(frame: pd.DataFrame, y: np.ndarray, p: np.ndarray, threshold: float, spec: FailureSpec,
                     predict: Predict | None = None, images: np.ndarray | None = None) -> dict[str, Any]:
    """The whole report (``evaluation/failure_analysis.json``); the shortcut test needs ``predict`` and ``images``."""
    report: dict[str, Any] = {"threshold": float(threshold), "top_k": spec.top_k, "min_patients": spec.min_patients,
                              "ci_level": spec.level, "resamples": spec.n_resamples,
                              "confident_errors": confident_errors(frame, y, p, threshold, spec),
                              "error_rates": error_rates(frame, y, p, threshold, spec)}
    if predict is not None and images is not None and spec.masks:
        report["shortcut"] = shortcut_test(predict, images, frame, y, p, threshold, spec)
        if report["shortcut"]["flagged"]:
            logger.warning("shortcut test: AUC drops by more than %s when %s is masked/shuffled",
                           spec.auc_drop_alert, ", ".join(report["shortcut"]["flagged"]))
    else:
        report["shortcut"] = {"status": "not run", "reason": "no model/images or no masks configured"}
    return report


def _worst(rows: list[dict[str, Any]], key: str, n: int = 3) -> list[dict[str, Any]]:
    ranked = sorted((r for r in rows if r.get(key)), key=lambda r: -r[key])[:n]  # no group with a zero rate
    return [{"attribute": r["attribute"], "group": r["group"], "patients": r["patients"], key: r[key],
             f"{key}_ci": r[f"{key}_ci"]} for r in ranked]


def failure_summary(report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The part of the report that goes into ``metrics.json`` and the model card."""
    if not report:
        return None
    rates, shortcut = report["error_rates"], report.get("shortcut") or {}
    rows = rates["subgroups"] + rates["quality"]
    masks = {name: {v: {k: entry[v][k] for k in ("auc", "sensitivity", "delta_auc", "delta_auc_ci", "flagged")}
                    for v in ("mask", "shuffle_within_site") if v in entry}
             for name, entry in (shortcut.get("masks") or {}).items() if "skipped" not in entry}
    return {"artifact": FAILURE_ANALYSIS_ARTIFACT, "overall": {k: rates["overall"][k] for k in
                                                               ("fp_rate", "fp_rate_ci", "fn_rate", "fn_rate_ci")},
            "highest_fp_rate": _worst(rows, "fp_rate"), "highest_fn_rate": _worst(rows, "fn_rate"),
            "shortcut": {"status": "run" if masks else shortcut.get("status", "not run"),
                         "alert_drop": shortcut.get("alert_drop"), "flagged": shortcut.get("flagged", []),
                         "masks": masks}}
