"""Label-free monitoring: performance, prevalence and embedding drift without production labels.

- **CBPE** (confidence-based performance estimation): with calibrated probabilities ``p_i`` the
  label of a production row is Bernoulli(``p_i``), so the expected confusion counts at the locked
  threshold are ``E[TP] = Σ p_i·pred_i``, ``E[FN] = Σ p_i·(1 − pred_i)`` etc.; sensitivity and
  specificity are their ratios and the expected AUC is
  ``Σ_{i≠j} p_i (1 − p_j) [s_i > s_j] / (Σ p_i · Σ (1 − p_j) − Σ p_i (1 − p_i))`` (ties count ½),
  computed in O(n log n) by sorting. The interval is a parametric bootstrap: rows resampled,
  labels drawn from ``p``, the realised metric computed; its percentile interval covers both the
  window's sampling and its label noise. *Assumption:* P(y | score) is the same in production as
  where the model was calibrated. That holds under covariate shift (inputs move, the disease given
  the image does not); it fails under concept shift (same images, other labels) and for a model
  that was never calibrated, which the reference check (CBPE vs realised metrics on the held-out
  reference rows) shows.
- **BBSE** (black-box shift estimation, Lipton et al. 2018): with the joint confusion matrix
  ``C[i, j] = P(pred = i, y = j)`` of the held-out reference rows and the production distribution
  of predicted classes ``μ``, the class weights ``w = q(y)/p(y)`` solve ``C w = μ``; ``w`` is
  clipped at 0 and the implied prevalence ``q`` renormalised. The PPV/NPV that prevalence implies
  at the locked threshold follow from the reference sensitivity/specificity (Bayes). Interval:
  bootstrap of both the reference and the production rows. *Assumption:* label shift — P(x | y)
  unchanged, so P(pred | y) is too; it fails when the images of a class change (a new scanner).
- **MMD** on the embedding principal components (``emb_pc*``): unbiased MMD² with an RBF kernel
  whose bandwidth is the median pairwise distance of the pooled sample, permutation p-value with a
  fixed seed. One multivariate test next to Evidently's per-column tests.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import MonitorSection
from pipeline.evaluation.metrics import confusion_array, percentile_interval
from pipeline.serving.predictor import EMB_PREFIX

logger = logging.getLogger(__name__)

LABEL_COLUMN = "y_true"  # reference profile: label of held-out rows, empty for training rows


# --------------------------------------------------------------------------- metrics


def expected_auc(p: np.ndarray, score: np.ndarray | None = None) -> float:
    """Expected AUC when row ``i`` is positive with probability ``p[i]`` (ranked by ``score``, default ``p``)."""
    p = np.asarray(p, dtype=float)
    s = p if score is None else np.asarray(score, dtype=float)
    order = np.argsort(s, kind="stable")
    p, s = p[order], s[order]
    neg = 1.0 - p
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(s)]))
    neg_group = np.add.reduceat(neg, starts)
    neg_below = np.r_[0.0, np.cumsum(neg_group)[:-1]]  # Σ (1 − p_j) over strictly lower scores
    ties = neg_group[group] - neg  # same score, other rows
    numerator = float(np.sum(p * (neg_below[group] + 0.5 * ties)))
    denominator = float(p.sum() * neg.sum() - np.sum(p * neg))
    return numerator / denominator if denominator > 0 else float("nan")


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Realised ROC AUC (Mann-Whitney, ties ½); nan with one class only."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def rates(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Sensitivity and specificity (soft labels allowed: ``y`` may be a probability).

    Not :func:`pipeline.evaluation.metrics.confusion`: with a probability as ``y`` each row adds ``y`` to the
    positive cells and ``1 − y`` to the negative ones (CBPE's expected counts ``E[TP] = Σ p·pred``), which the
    hard-label cell masks there cannot express; for 0/1 labels the two agree.
    """
    y, pred = np.asarray(y, dtype=float), np.asarray(pred, dtype=float)
    pos, neg = y.sum(), (1 - y).sum()
    sens = float((y * pred).sum() / pos) if pos > 0 else float("nan")
    spec = float(((1 - y) * (1 - pred)).sum() / neg) if neg > 0 else float("nan")
    return sens, spec


def interval(samples: Any, level: float) -> list[float | None]:
    """:func:`~pipeline.evaluation.metrics.percentile_interval` rounded to 4 digits, ``None`` where it is NaN
    (no finite sample): the form the monitoring summary stores."""
    return [_round(v) for v in percentile_interval(samples, level)]


# --------------------------------------------------------------------------- CBPE


def cbpe(p: np.ndarray, pred: np.ndarray, *, n_resamples: int, seed: int, level: float) -> dict[str, Any]:
    """CBPE of AUC, sensitivity and specificity at the locked threshold (``pred`` = its decisions), with
    parametric-bootstrap intervals, and the expected prevalence ``mean(p)``."""
    p, pred = np.asarray(p, dtype=float), np.asarray(pred, dtype=float)
    sens, spec = rates(p, pred)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"auc": [], "sensitivity": [], "specificity": []}
    for _ in range(n_resamples):
        idx = rng.integers(0, len(p), len(p))
        y = rng.random(len(p)) < p[idx]
        samples["auc"].append(auc(y, p[idx]))
        for name, value in zip(("sensitivity", "specificity"), rates(y, pred[idx]), strict=True):
            samples[name].append(value)
    point = {"auc": expected_auc(p), "sensitivity": sens, "specificity": spec}
    return {**{k: _round(v) for k, v in point.items()}, "ci": {k: interval(v, level) for k, v in samples.items()},
            "expected_prevalence": _round(float(p.mean())), "rows": len(p)}


# --------------------------------------------------------------------------- BBSE


def joint_confusion(y: np.ndarray, pred: np.ndarray, k: int = 2) -> np.ndarray:
    """``C[i, j] = P(pred = i, y = j)``: the transposed confusion counts over the number of rows."""
    return confusion_array(y, pred, k).T / max(len(y), 1)


def bbse_prevalence(confusion: np.ndarray, pred_dist: np.ndarray) -> np.ndarray:
    """Class distribution ``q`` of the production window: solve ``C w = μ``, clip ``w ≥ 0``, ``q ∝ w·p(y)``."""
    w = np.linalg.lstsq(confusion, pred_dist, rcond=None)[0]
    q = np.clip(w, 0, None) * confusion.sum(axis=0)
    return q / q.sum() if q.sum() > 0 else np.full(len(q), np.nan)


def predictive_values(sens: float, spec: float, prevalence: float) -> tuple[float, float]:
    """PPV and NPV at a threshold with ``sens``/``spec`` when the prevalence is ``prevalence`` (Bayes)."""
    tp, fp = sens * prevalence, (1 - spec) * (1 - prevalence)
    tn, fn = spec * (1 - prevalence), (1 - sens) * prevalence
    ppv = tp / (tp + fp) if tp + fp > 0 else float("nan")
    npv = tn / (tn + fn) if tn + fn > 0 else float("nan")
    return ppv, npv


def bbse(y_ref: np.ndarray, pred_ref: np.ndarray, pred_cur: np.ndarray, *, n_resamples: int, seed: int,
         level: float) -> dict[str, Any]:
    """BBSE prevalence of the production window and the PPV/NPV it implies at the locked threshold."""
    y_ref, pred_ref, pred_cur = (np.asarray(a, dtype=int) for a in (y_ref, pred_ref, pred_cur))

    def estimate(y: np.ndarray, pr: np.ndarray, pc: np.ndarray) -> tuple[float, float, float]:
        q = float(bbse_prevalence(joint_confusion(y, pr), np.bincount(pc, minlength=2) / len(pc))[1])
        ppv, npv = predictive_values(*rates(y, pr), q)
        return q, ppv, npv

    prevalence, ppv, npv = estimate(y_ref, pred_ref, pred_cur)
    rng = np.random.default_rng(seed)
    boot = np.array([estimate(y_ref[i], pred_ref[i], pred_cur[rng.integers(0, len(pred_cur), len(pred_cur))])
                     for i in (rng.integers(0, len(y_ref), len(y_ref)) for _ in range(n_resamples))])
    sens, spec = rates(y_ref, pred_ref)
    ref_prev = float(y_ref.mean())
    ref_ppv, ref_npv = predictive_values(sens, spec, ref_prev)
    ci = {k: interval(boot[:, i], level) for i, k in enumerate(("prevalence", "ppv", "npv"))} if len(boot) else {}
    return {"prevalence": _round(prevalence), "ppv": _round(ppv), "npv": _round(npv), "ci": ci,
            "reference": {"prevalence": _round(ref_prev), "sensitivity": _round(sens), "specificity": _round(spec),
                          "ppv": _round(ref_ppv), "npv": _round(ref_npv), "rows": len(y_ref)},
            "current_positive_rate": _round(float(pred_cur.mean())), "rows": len(pred_cur)}


# --------------------------------------------------------------------------- MMD


def mmd_test(x: np.ndarray, y: np.ndarray, *, n_permutations: int, seed: int) -> dict[str, Any]:
    """Unbiased MMD² between samples ``x`` and ``y`` (RBF kernel, median-heuristic bandwidth) and its
    permutation p-value ``(1 + #{perm ≥ observed}) / (1 + n_permutations)``."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    m, n = len(x), len(y)
    z = np.vstack([x, y])
    sq = np.sum(z**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    off = d2[np.triu_indices(len(z), 1)]
    bandwidth = float(np.sqrt(np.median(off))) if len(off) else 1.0
    kernel = np.exp(-d2 / (2 * max(bandwidth, 1e-12) ** 2))
    rng = np.random.default_rng(seed)
    first = np.zeros((len(z), n_permutations + 1))
    first[:m, 0] = 1.0
    for k in range(1, n_permutations + 1):
        first[rng.permutation(len(z))[:m], k] = 1.0
    k_first = kernel @ first
    s_xx = np.sum(first * k_first, axis=0)
    s_xy = np.sum((1 - first) * k_first, axis=0)
    s_yy = kernel.sum() - 2 * s_xy - s_xx
    stat = (s_xx - m) / (m * (m - 1)) + (s_yy - n) / (n * (n - 1)) - 2 * s_xy / (m * n)
    p_value = (1 + int(np.sum(stat[1:] >= stat[0]))) / (1 + n_permutations)
    return {"mmd2": _round(float(stat[0]), 6), "p_value": round(p_value, 6), "bandwidth": _round(bandwidth),
            "permutations": n_permutations, "rows": [m, n]}


# --------------------------------------------------------------------------- the summary section


def label_free_summary(reference: pd.DataFrame, current: pd.DataFrame, cfg: MonitorSection, *, seed: int,
                       level: float) -> dict[str, Any]:
    """CBPE, BBSE and embedding MMD of ``current`` against ``reference``, with alert flags.

    ``reference`` is the profile logged at registration: ``probability``, ``predicted_positive``,
    ``emb_pc*`` and ``y_true`` (labels of its held-out rows; training rows have none). A part that
    cannot be computed says why in its ``status`` instead of a number.
    """
    out: dict[str, Any] = {"cbpe": {"status": "not_applicable"}, "bbse": {"status": "not_applicable"},
                           "embedding_mmd": {"status": "not_applicable"}}
    binary = all("predicted_positive" in f and "probability" in f for f in (reference, current))
    held_out = reference[reference[LABEL_COLUMN].notna()] if LABEL_COLUMN in reference else reference.iloc[0:0]
    if not binary:
        reason = "binary models only: no predicted_positive column"
        out["cbpe"]["reason"] = out["bbse"]["reason"] = reason
    else:
        current = current.dropna(subset=["probability", "predicted_positive"])
        out["cbpe"] = {"status": "ok", **cbpe(current["probability"].to_numpy(), current["predicted_positive"],
                                              n_resamples=cfg.estimation_resamples, seed=seed, level=level)}
        out["bbse"] = _bbse_or_reason(held_out, current, cfg, seed=seed, level=level)
        out["cbpe"]["reference"] = _reference_check(held_out)
    out["embedding_mmd"] = _mmd_or_reason(reference, current, cfg, seed=seed)
    out["alerts"] = alerts(out, cfg)
    out["alert"] = any(out["alerts"].values())
    return out


def _bbse_or_reason(held_out: pd.DataFrame, current: pd.DataFrame, cfg: MonitorSection, *, seed: int,
                    level: float) -> dict[str, Any]:
    y = held_out[LABEL_COLUMN].to_numpy(dtype=int) if len(held_out) else np.array([], dtype=int)
    if len(np.unique(y)) < 2:
        return {"status": "no_reference_labels",
                "reason": f"the reference profile holds {len(held_out)} labelled held-out rows "
                          f"({len(np.unique(y))} classes); BBSE needs both classes: register a model trained by "
                          "this version (its profile logs y_true of the validation rows)"}
    est = bbse(y, held_out["predicted_positive"].to_numpy(), current["predicted_positive"].to_numpy(),
               n_resamples=cfg.estimation_resamples, seed=seed, level=level)
    return {"status": "ok", **est}


def _reference_check(held_out: pd.DataFrame) -> dict[str, Any] | None:
    """Realised vs CBPE-estimated metrics on the labelled reference rows (is the model calibrated there?)."""
    if held_out.empty or held_out[LABEL_COLUMN].nunique() < 2:
        return None
    y, p = held_out[LABEL_COLUMN].to_numpy(dtype=int), held_out["probability"].to_numpy()
    pred = held_out["predicted_positive"].to_numpy()
    sens, spec = rates(y, pred)
    est_sens, est_spec = rates(p, pred)
    return {"rows": len(y), "auc": _round(auc(y, p)), "sensitivity": _round(sens), "specificity": _round(spec),
            "estimated_auc": _round(expected_auc(p)), "estimated_sensitivity": _round(est_sens),
            "estimated_specificity": _round(est_spec)}


def _mmd_or_reason(reference: pd.DataFrame, current: pd.DataFrame, cfg: MonitorSection, *,
                   seed: int) -> dict[str, Any]:
    cols = sorted((c for c in reference.columns if c.startswith(EMB_PREFIX) and c in current.columns),
                  key=lambda c: int(c.removeprefix(EMB_PREFIX)) if c.removeprefix(EMB_PREFIX).isdigit() else 0)
    if not cols:
        return {"status": "not_applicable", "reason": "no emb_pc* columns in both the reference and the window"}
    ref, cur = reference[cols].dropna().to_numpy(), current[cols].dropna().to_numpy()
    if len(ref) < 2 or len(cur) < 2:
        return {"status": "insufficient_data", "reason": f"{len(ref)} reference / {len(cur)} current rows"}
    rng = np.random.default_rng(seed)
    ref, cur = (a[rng.choice(len(a), cfg.mmd_max_rows, replace=False)] if len(a) > cfg.mmd_max_rows else a
                for a in (ref, cur))
    test = mmd_test(ref, cur, n_permutations=cfg.mmd_permutations, seed=seed)
    return {"status": "ok", "columns": cols, **test, "alpha": cfg.mmd_alpha, "drifted": test["p_value"] < cfg.mmd_alpha}


def alerts(section: dict[str, Any], cfg: MonitorSection) -> dict[str, bool]:
    """Alert flags: estimated AUC below the reference's by more than ``cbpe_auc_drop_alert``; BBSE
    prevalence away from the reference's by more than ``prevalence_change_alert``; MMD p < ``mmd_alpha``."""
    cbpe_, bbse_ = section["cbpe"], section["bbse"]
    ref_auc = (cbpe_.get("reference") or {}).get("auc")
    drop = ref_auc - cbpe_["auc"] if ref_auc is not None and cbpe_.get("auc") is not None else None
    change = (abs(bbse_["prevalence"] - bbse_["reference"]["prevalence"])
              if bbse_.get("status") == "ok" and bbse_.get("prevalence") is not None else None)
    if drop is not None:
        cbpe_["auc_drop"] = round(drop, 4)
    if change is not None:
        bbse_["prevalence_change"] = round(change, 4)
    return {"estimated_auc_drop": drop is not None and drop > cfg.cbpe_auc_drop_alert,
            "prevalence_change": change is not None and change > cfg.prevalence_change_alert,
            "embedding_drift": bool(section["embedding_mmd"].get("drifted", False))}


def _round(value: float, digits: int = 4) -> float | None:
    return round(float(value), digits) if value is not None and math.isfinite(float(value)) else None


# --------------------------------------------------------------------------- presentation


def label_free_markdown(section: dict[str, Any] | None) -> list[str]:
    """Summary lines (Markdown bullets) of the label-free section; none without one."""
    if not section:
        return []
    lines = []
    cb, bb, mmd = section["cbpe"], section["bbse"], section["embedding_mmd"]
    if cb.get("status") == "ok":
        ref = (cb.get("reference") or {}).get("auc")
        lines.append(f"- CBPE (no labels): AUC {cb['auc']} {_ci_text(cb['ci']['auc'])}, sensitivity "
                     f"{cb['sensitivity']} {_ci_text(cb['ci']['sensitivity'])}, specificity {cb['specificity']} "
                     f"{_ci_text(cb['ci']['specificity'])}; "
                     + (f"reference AUC {ref}" if ref is not None else "no labelled reference rows"))
    if bb.get("status") == "ok":
        lines.append(f"- BBSE prevalence {bb['prevalence']} {_ci_text(bb['ci'].get('prevalence'))} (reference "
                     f"{bb['reference']['prevalence']}) → PPV {bb['ppv']}, NPV {bb['npv']} at the locked threshold")
    elif bb.get("status") != "not_applicable":
        lines.append(f"- BBSE: {bb.get('status')} ({bb.get('reason')})")
    if mmd.get("status") == "ok":
        lines.append(f"- embedding MMD² {mmd['mmd2']} (p = {mmd['p_value']}, α {mmd['alpha']}): "
                     f"{'drifted' if mmd['drifted'] else 'stable'}")
    raised = [k for k, v in section.get("alerts", {}).items() if v]
    lines.append(f"- label-free alerts: {', '.join(raised) if raised else 'none'}")
    return lines


def label_free_metrics(section: dict[str, Any] | None) -> dict[str, float]:
    """The estimates as flat MLflow metrics (``cbpe_auc``, ``bbse_prevalence``, ``mmd_p_value`` …)."""
    if not section:
        return {}
    names = {("cbpe", k): f"cbpe_{k}" for k in ("auc", "sensitivity", "specificity")}
    names |= {("bbse", k): f"bbse_{k}" for k in ("prevalence", "ppv", "npv")}
    names |= {("embedding_mmd", "mmd2"): "mmd2", ("embedding_mmd", "p_value"): "mmd_p_value"}
    out = {name: section[part][key] for (part, key), name in names.items() if section[part].get(key) is not None}
    return {**out, "label_free_alert": float(bool(section.get("alert")))}


def add_label_free_section(html_path: Any, section: dict[str, Any]) -> None:
    """Put a plain table of the label-free estimates at the top of the Evidently HTML report."""
    import html
    from pathlib import Path

    path = Path(html_path)
    if not path.is_file():
        return
    rows = "".join(f"<tr><td>{html.escape(line.removeprefix('- '))}</td></tr>"
                   for line in label_free_markdown(section))
    block = (f'<section id="xrayops-label-free" style="font-family:sans-serif;margin:1em">'
             f"<h2>Label-free monitoring (CBPE, BBSE, embedding MMD)</h2><table>{rows}</table></section>")
    text = path.read_text(encoding="utf-8")
    at = text.find(">", text.find("<body")) + 1 if "<body" in text else 0
    path.write_text(text[:at] + block + text[at:], encoding="utf-8")


def _ci_text(ci: list[float | None] | None) -> str:
    return f"[{ci[0]}, {ci[1]}]" if ci and ci[0] is not None else "[n/a]"
