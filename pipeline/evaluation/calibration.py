"""Calibration by logistic recalibration and decision curves (net benefit). Pure numpy; no I/O.

Every statistic here takes a ``(R, n)`` matrix of per-image weights and returns ``R`` values,
so one call gives the point estimate (``W = ones((1, n))``) or all patient-level bootstrap
resamples at once (``W = patient_weights(...)``, :mod:`pipeline.evaluation.metrics`).

Calibration slope and intercept follow Van Calster et al. (2016, 2019): with ``lp = logit(p)``,
the *slope* is ``b`` of ``logit P(y=1) = a + b·lp`` (1 = ideal; < 1 = scores too extreme,
overconfident; > 1 = too timid) and the *intercept* (calibration-in-the-large) is ``a`` of
``logit P(y=1) = a + lp`` with the slope fixed at 1 (0 = ideal; < 0 = risks overestimated).
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-6
_MAX_ITER = 50
_TOL = 1e-8
_MAX_SLOPE = 1e3  # beyond this the classes are (quasi-)separated and the slope is not estimable


def logit(p: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[1e-6, 1 - 1e-6]``."""
    q = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(q / (1 - q))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(x, -500, 500)))


def _estimable(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Resamples with weight on both classes (``R`` booleans)."""
    return ((w * (y == 1)).sum(axis=1) > 0) & ((w * (y == 0)).sum(axis=1) > 0)


def calibration_intercept(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Calibration-in-the-large: ``a`` of ``logit P(y=1) = a + logit(p)`` per resample (NaN when one class)."""
    y, lp, w = np.asarray(y, dtype=float), logit(p), np.atleast_2d(np.asarray(w, dtype=float))
    a = np.zeros(len(w))
    for _ in range(_MAX_ITER):
        mu = _sigmoid(a[:, None] + lp)
        grad = (w * (y - mu)).sum(axis=1)
        hess = (w * mu * (1 - mu)).sum(axis=1)
        step = np.clip(np.divide(grad, hess, out=np.zeros_like(grad), where=hess > 0), -5, 5)
        a += step
        if np.all(np.abs(step) < _TOL):
            break
    return np.where(_estimable(y, w), a, np.nan)


def calibration_slope(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``b`` of the weighted logistic fit ``logit P(y=1) = a + b·logit(p)`` per resample (Newton's method).

    NaN where the fit has no finite answer: one class only, or classes separated by the score
    (then the likelihood grows without bound as ``b`` does).
    """
    y, lp, w = np.asarray(y, dtype=float), logit(p), np.atleast_2d(np.asarray(w, dtype=float))
    a, b = np.zeros(len(w)), np.ones(len(w))
    converged = np.zeros(len(w), dtype=bool)
    for _ in range(_MAX_ITER):
        mu = _sigmoid(a[:, None] + b[:, None] * lp)
        r, v = w * (y - mu), w * mu * (1 - mu)
        g0, g1 = r.sum(axis=1), (r * lp).sum(axis=1)
        h00, h01, h11 = v.sum(axis=1), (v * lp).sum(axis=1), (v * lp * lp).sum(axis=1)
        det = h00 * h11 - h01 * h01
        ok = det > 1e-12 * np.maximum(h00 * h11, 1e-300)
        safe = np.where(ok, det, 1.0)
        da = np.where(ok, (h11 * g0 - h01 * g1) / safe, 0.0)
        db = np.where(ok, (h00 * g1 - h01 * g0) / safe, 0.0)
        scale = np.maximum(1.0, np.hypot(da, db) / 5)  # at most 5 units per step
        a, b = a + da / scale, b + db / scale
        converged = ok & (np.hypot(da, db) < _TOL * (1 + np.abs(b)))
        if np.all(converged | ~ok):
            break
    return np.where(_estimable(y, w) & converged & (np.abs(b) < _MAX_SLOPE), b, np.nan)


def platt_fit(y: np.ndarray, p: np.ndarray) -> tuple[float, float] | None:
    """Platt scaling on scores ``p``: ``(a, b)`` of ``logit P(y=1) = a + b·logit(p)``, fitted by maximum
    likelihood on one sample (L-BFGS on the convex negative log-likelihood: unlike the plain Newton steps of
    :func:`calibration_slope` it also converges from far away, e.g. for a very overconfident model); None when
    it has no finite answer (one class, or classes separated by the score)."""
    from scipy.optimize import minimize

    y, z = np.asarray(y, dtype=float), logit(p)
    if not (0 < y.sum() < len(y)):
        return None

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = theta[0] + theta[1] * z
        r = _sigmoid(t) - y
        return float(np.sum(np.logaddexp(0, t) - y * t)), np.array([r.sum(), (r * z).sum()])

    res = minimize(nll, np.array([0.0, 1.0]), jac=True, method="L-BFGS-B")
    a, b = (float(v) for v in res.x)
    if not res.success or not np.isfinite([a, b]).all() or abs(b) >= _MAX_SLOPE:
        return None
    return a, b


def calibration_fit(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``{"calibration_slope": (R,), "calibration_intercept": (R,)}``; ``w=None``: one unweighted fit."""
    w = np.ones((1, len(y))) if w is None else np.atleast_2d(w)
    return {"calibration_slope": calibration_slope(y, p, w), "calibration_intercept": calibration_intercept(y, p, w)}


# --------------------------------------------------------------------------- decision curve


def net_benefit(y: np.ndarray, p: np.ndarray, threshold: float) -> float:
    """Net benefit of treating cases with ``p >= threshold``: ``TP/n − FP/n · t/(1−t)`` (Vickers & Elkin 2006)."""
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    if not len(y):
        return float("nan")
    treat = p >= threshold
    tp, fp = float((treat & (y == 1)).sum()), float((treat & (y == 0)).sum())
    return tp / len(y) - fp / len(y) * threshold / (1 - threshold)


def decision_curve(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray | None = None,
                   operating_threshold: float | None = None) -> dict[str, Any]:
    """Net benefit of the model, treat-all and treat-none over threshold probabilities.

    Args:
        thresholds: threshold probabilities in (0, 1); default 0.01, 0.02, …, 0.99.
        operating_threshold: the locked threshold, reported with its own net benefit.

    Returns:
        A JSON-ready dict: ``thresholds``, ``model``, ``treat_all``, ``treat_none`` (lists), ``prevalence``,
        ``n`` and, with ``operating_threshold``, ``operating_point`` (threshold and net benefit).
    """
    y = np.asarray(y, dtype=int)
    ts = np.round(np.arange(1, 100) / 100, 2) if thresholds is None else np.asarray(thresholds, dtype=float)
    prevalence = float(y.mean()) if len(y) else float("nan")
    odds = ts / (1 - ts)
    out: dict[str, Any] = {
        "thresholds": [float(t) for t in ts],
        "model": [round(net_benefit(y, p, float(t)), 6) for t in ts],
        "treat_all": [round(float(v), 6) for v in prevalence - (1 - prevalence) * odds],
        "treat_none": [0.0] * len(ts),
        "prevalence": round(prevalence, 6),
        "n": int(len(y)),
        "formula": "net benefit = TP/n - FP/n * t/(1-t); treat all = prevalence - (1-prevalence) * t/(1-t)",
    }
    if operating_threshold is not None:
        out["operating_point"] = {"threshold": float(operating_threshold),
                                  "net_benefit": round(net_benefit(y, p, operating_threshold), 6)}
    return out
