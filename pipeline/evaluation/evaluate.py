"""Stage ``evaluate``: operating point on validation, clinical metrics with patient-level CIs on test.

Writes ``<models_dir>/<dataset>/metrics.json`` and ``operating_point.json`` (DVC metrics)
and logs the same, plus plots, to the training run in MLflow.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Settings
from pipeline.data.manifest import read_manifest
from pipeline.data.split import read_split
from pipeline.evaluation.calibration import calibration_fit, decision_curve
from pipeline.evaluation.failures import FailureSpec, failure_analysis, failure_summary
from pipeline.evaluation.metrics import (
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    confusion_counts,
    confusion_matrix,
    multiclass_metrics,
    patient_weights,
    percentile_interval,
)
from pipeline.evaluation.subgroups import SubgroupSpec, subgroup_table
from pipeline.registry.contract import (
    DECISION_CURVE_ARTIFACT,
    EVALUATION_ARTIFACT,
    EXPLAIN_ARTIFACT,
    FAILURE_ANALYSIS_ARTIFACT,
    OPERATING_POINT_ARTIFACT,
    SLICES_ARTIFACT,
    SUBGROUPS_ARTIFACT,
    plot_artifact,
)
from pipeline.training.inputs import InputSpec, check_files, load_images, split_frame
from pipeline.training.train import TrainResult

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
OPERATING_POINT_FILE = "operating_point.json"
SLICE_COLUMNS = ("view_position", "sex", "age_band", "source")


@dataclass
class Scored:
    """Model outputs on one split, aligned with the manifest rows."""

    frame: pd.DataFrame
    y: np.ndarray
    proba: np.ndarray  # (n,) binary positive-class probability, (n, k) multi-class


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, Any]
    ci: dict[str, list[float]]
    operating_point: dict[str, Any] | None
    slices: list[dict[str, Any]]
    n_test: int
    test: Scored | None = field(default=None, repr=False)
    explain: dict[str, Any] | None = None  # Grad-CAM sanity check (see pipeline.evaluation.explain)
    figures: dict[str, Any] = field(default_factory=dict, repr=False)  # extra figures (Grad-CAM grid)
    subgroups: dict[str, Any] | None = None  # binary: per-subgroup metrics + CIs (pipeline.evaluation.subgroups)
    decision_curve: dict[str, Any] | None = None  # binary: net benefit vs threshold (pipeline.evaluation.calibration)
    failures: dict[str, Any] | None = None  # binary: failure analysis (pipeline.evaluation.failures)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "metrics": self.metrics, "ci": self.ci, "operating_point": self.operating_point,
                "slices": self.slices, "n_test": self.n_test, "explain": self.explain, "subgroups": self.subgroups,
                "decision_curve": self.decision_curve, "failure_analysis": failure_summary(self.failures)}


def predict_proba(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Probabilities from a Keras model (positive class for binary)."""
    out = np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)
    return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out


def score_split(model: Any, settings: Settings, dataset_dir: Path, split_name: str, ispec: InputSpec) -> Scored:
    """Run ``model`` on every image of ``split_name``."""
    manifest, split = read_manifest(dataset_dir), read_split(dataset_dir)
    frame = split_frame(manifest, split, split_name)
    images = load_images(check_files(dataset_dir, frame["path"].tolist()), ispec)
    return Scored(frame, frame["label_index"].to_numpy(), predict_proba(model, images))


def evaluate_scores(settings: Settings, val: Scored, test: Scored, num_classes: int) -> EvalResult:
    """Metrics, CIs and slices from already-computed scores (no model needed)."""
    cfg = settings.evaluate
    weights = patient_weights(test.frame["patient_id"].to_numpy(), cfg.bootstrap_resamples, settings.base.seed)
    if num_classes == 2:
        op = choose_threshold(val.y, val.proba, cfg.threshold_policy, sensitivity_floor=cfg.sensitivity_floor,
                              fixed=cfg.fixed_threshold)
        thr = op["threshold"]
        metrics = binary_metrics(test.y, test.proba, thr, bins=cfg.calibration_bins)
        pred = (test.proba >= thr).astype(int)
        metrics["confusion"] = confusion_counts(test.y, pred)
        ci = bootstrap_ci(lambda w: binary_metrics(test.y, test.proba, thr, bins=cfg.calibration_bins, w=w),
                          weights, cfg.ci_level)
        slices = _slices(test, lambda f, y, p: binary_metrics(y, p, thr, bins=cfg.calibration_bins))
        _add_calibration_fit(test, weights, cfg.ci_level, metrics, ci)
        op = threshold_derivation(op, val, cfg.sensitivity_floor, cfg.fixed_threshold)
        task = "binary"
    else:
        op = None
        metrics = multiclass_metrics(test.y, test.proba)
        metrics["confusion"] = confusion_matrix(test.y, test.proba.argmax(1), num_classes)
        ci = bootstrap_ci(lambda w: multiclass_metrics(test.y, test.proba, w), weights, cfg.ci_level)
        slices = _slices(test, lambda f, y, p: multiclass_metrics(y, p))
        task = "multiclass"
    result = EvalResult(task, _round(metrics), {k: [round(a, 4), round(b, 4)] for k, (a, b) in ci.items()},
                        op, slices, int(len(test.y)), test)
    if op is not None:
        spec = SubgroupSpec(cfg.subgroup_attributes, cfg.subgroup_min_patients, cfg.bootstrap_resamples,
                            settings.base.seed, cfg.ci_level, cfg.calibration_bins)
        result.subgroups = subgroup_table(test.frame, test.y, test.proba, op["threshold"], spec)
        result.decision_curve = decision_curve(test.y, test.proba, operating_threshold=op["threshold"])
    return result


def _add_calibration_fit(test: Scored, weights: np.ndarray, level: float, metrics: dict[str, Any],
                         ci: dict[str, Any]) -> None:
    """Calibration slope and intercept (logistic recalibration) with patient-level CIs, beside ECE/Brier."""
    for name, value in calibration_fit(test.y, test.proba).items():
        metrics[name] = float(value[0])
    for name, values in calibration_fit(test.y, test.proba, weights).items():
        ci[name] = percentile_interval(values, level)


def threshold_derivation(op: dict[str, Any], val: Scored, sensitivity_floor: float,
                         fixed_threshold: float) -> dict[str, Any]:
    """The operating point with how it was derived: criterion, the set it was chosen on, and that set's size."""
    y = np.asarray(val.y, dtype=int)
    patients = int(val.frame["patient_id"].nunique()) if "patient_id" in val.frame else None
    parameter = ({"fixed_threshold": fixed_threshold} if op["policy"] == "fixed" or "fixed" in op["reason"]
                 else {"sensitivity_floor": sensitivity_floor} if op["policy"] == "sensitivity_floor" else {})
    return {**op, "criterion": op["reason"], "parameters": parameter, "derived_on": "validation",
            "validation_images": int(len(y)), "validation_patients": patients,
            "validation_positives": int((y == 1).sum()),
            "applied_to": "test and serving unchanged (locked with the version; never re-tuned on test)"}


def _slices(scored: Scored, fn: Any) -> list[dict[str, Any]]:
    rows = []
    for col in SLICE_COLUMNS:
        if col not in scored.frame or scored.frame[col].nunique(dropna=True) < 2:
            continue
        for value, idx in scored.frame.groupby(col, dropna=True).indices.items():
            if len(idx) < 5:
                continue
            m = fn(scored.frame.iloc[idx], scored.y[idx], scored.proba[idx])
            rows.append({"slice": col, "value": str(value), "n": int(len(idx)), **_round(m)})
    return rows


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) and v == v else (None if isinstance(v, float) else v))
            for k, v in d.items()}


def run_evaluate(settings: Settings, trained: TrainResult, dataset_dir: Path | None = None) -> EvalResult:
    """Evaluate a trained model; writes metrics files and logs them to its MLflow run."""
    dataset_dir = dataset_dir or settings.dataset_dir
    ispec = InputSpec(**trained.input)
    val = score_split(trained.model, settings, dataset_dir, "val", ispec)
    test = score_split(trained.model, settings, dataset_dir, "test", ispec)
    result = evaluate_scores(settings, val, test, len(trained.classes))
    explain_result(settings, trained.model, result, dataset_dir, ispec)
    analyse_failures(settings, trained.model, result, dataset_dir, ispec)
    _write(settings, result)
    _log_to_mlflow(settings, trained.run_id, result, val)
    logger.info("test metrics: %s", {k: v for k, v in result.metrics.items() if k != "confusion"})
    return result


def explain_result(settings: Settings, model: Any, result: EvalResult, dataset_dir: Path, ispec: InputSpec) -> None:
    """Example grids of TP/FP/TN/FN test images for each of ``evaluate.explain_methods``, with each method's
    randomisation sanity check and lung-field mass (sets ``result.explain``; Grad-CAM's result stays at the top)."""
    from pipeline.errors import GradCamError
    from pipeline.evaluation.attribution import (
        METHOD_TITLES,
        AttributionOptions,
        explain_examples_by_method,
        sanity_thresholds,
    )
    from pipeline.evaluation.plots import gradcam_grid_figure

    cfg, test = settings.evaluate, result.test
    if cfg.gradcam_examples == 0 or test is None or not len(test.y):
        result.explain = {"status": "disabled"}
        return
    paths = test.frame["path"].tolist()
    threshold = result.operating_point["threshold"] if result.operating_point else None

    def load(indices: list[int]) -> np.ndarray:
        return load_images(check_files(dataset_dir, [paths[i] for i in indices]), ispec)

    try:
        by_method = explain_examples_by_method(
            model, load, test.y, test.proba, threshold, per_cell=cfg.gradcam_examples,
            methods=sanity_thresholds(cfg), options=AttributionOptions.from_config(cfg, settings.base.seed),
            seed=settings.base.seed)
    except GradCamError as exc:
        logger.warning("explanations unavailable: %s", exc)
        result.explain = {"status": "unavailable", "reason": str(exc)}
        return
    methods = {name: ex.summary() for name, ex in by_method.items()}
    headline = by_method.get("gradcam")
    result.explain = {**({"status": methods["gradcam"]["status"], "sanity": headline.sanity,
                          "examples": {cell: len(v) for cell, v in headline.cells.items()}}
                         if headline else {"status": "not_run"}), "methods": methods}
    for name, ex in by_method.items():
        result.figures["gradcam_grid" if name == "gradcam" else f"{name}_grid"] = gradcam_grid_figure(
            ex.cells, ex.sanity, method=METHOD_TITLES[name])
        if not ex.sanity["passed"]:
            logger.warning("%s sanity check failed: rank corr %s > %s (maps barely depend on the weights)",
                           METHOD_TITLES[name], ex.sanity["rank_corr"], ex.sanity["threshold"])


def explain_metrics(explain: dict[str, Any] | None) -> dict[str, float]:
    """Flat MLflow metrics of each method: sanity rank correlation, lung-field mass, IG completeness error."""
    out = {}
    for name, m in ((explain or {}).get("methods") or {}).items():
        values = {"sanity_rank_corr": m["sanity"].get("rank_corr"), "lung_mass": m["lung_mass"].get("mean"),
                  "completeness_rel_error": (m.get("completeness") or {}).get("max_relative_error")}
        out.update({f"explain_{name}_{k}": float(v) for k, v in values.items() if v is not None})
    return out


def analyse_failures(settings: Settings, model: Any, result: EvalResult, dataset_dir: Path, ispec: InputSpec) -> None:
    """Confident errors, error rates by subgroup/quality bin and the shortcut test (sets ``result.failures``;
    binary only; the test images are decoded once more and re-scored once per mask)."""
    test = result.test
    if result.operating_point is None or test is None or not len(test.y):
        return
    images = load_images(check_files(dataset_dir, test.frame["path"].tolist()), ispec)
    result.failures = failure_analysis(test.frame, test.y, test.proba, result.operating_point["threshold"],
                                       FailureSpec.from_settings(settings), lambda x: predict_proba(model, x), images)


def _write(settings: Settings, result: EvalResult) -> None:
    out = settings.model_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(result.to_json(), indent=2, sort_keys=True))
    if result.operating_point:
        (out / OPERATING_POINT_FILE).write_text(json.dumps(result.operating_point, indent=2, sort_keys=True))


def _log_to_mlflow(settings: Settings, run_id: str, result: EvalResult, val: Scored) -> None:
    import mlflow

    from pipeline.evaluation.plots import evaluation_figures
    from pipeline.tracking import configure_mlflow

    configure_mlflow(settings)
    flat = {f"test_{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float)) and v is not None}
    for k, (lo, hi) in result.ci.items():
        if lo == lo and hi == hi:
            flat[f"test_{k}_ci_low"], flat[f"test_{k}_ci_high"] = lo, hi
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(flat)
        mlflow.log_dict(result.to_json(), EVALUATION_ARTIFACT)
        if result.operating_point:
            mlflow.log_dict(result.operating_point, OPERATING_POINT_ARTIFACT)
            mlflow.set_tag("operating_threshold", f"{result.operating_point['threshold']:.6f}")
        if result.slices:
            mlflow.log_table(pd.DataFrame(result.slices), SLICES_ARTIFACT)
        if result.subgroups is not None:
            mlflow.log_dict(result.subgroups, SUBGROUPS_ARTIFACT)
        if result.decision_curve is not None:
            mlflow.log_dict(result.decision_curve, DECISION_CURVE_ARTIFACT)
        if result.failures is not None:
            mlflow.log_dict(result.failures, FAILURE_ANALYSIS_ARTIFACT)
        sanity = (result.explain or {}).get("sanity")
        if sanity and sanity.get("rank_corr") is not None:
            mlflow.log_metric("gradcam_sanity_rank_corr", sanity["rank_corr"])
        if result.explain:
            mlflow.log_metrics(explain_metrics(result.explain))
            mlflow.log_dict(result.explain, EXPLAIN_ARTIFACT)
            mlflow.set_tag("gradcam_sanity", result.explain["status"])
        assert result.test is not None
        for name, fig in {**evaluation_figures(result, val), **result.figures}.items():
            mlflow.log_figure(fig, plot_artifact(name))
