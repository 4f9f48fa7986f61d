"""Drift monitoring with Evidently on image features and model outputs (never raw pixels).

Reference = the profile logged with the serving model's training run (features of its
training/validation images and the model's probabilities on them); current = a window
of the production log. Output: ``reports/drift/<timestamp>/{report.html, summary.json}``.

Evidently switches its per-column test with sample size (K-S p-value below 1,000 rows,
Wasserstein distance above) and the meaning of "score vs threshold" flips with it, so
drift is read from each column's *test status*, never from raw scores.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Settings
from pipeline.features import IMAGE_FEATURES

logger = logging.getLogger(__name__)

# Geometry that is constant in a dataset would make every drift test degenerate.
DRIFT_FEATURES = [f for f in IMAGE_FEATURES if f not in ("bit_depth",)]
REFERENCE_ARTIFACT = "reference/profile.parquet"


def drift_columns(reference: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    """Numeric columns present in both frames and not constant in both."""
    cols = [c for c in reference.columns if c in current.columns and c in _monitored(reference)]
    return [c for c in cols if reference[c].nunique() > 1 or current[c].nunique() > 1]


def _monitored(frame: pd.DataFrame) -> list[str]:
    extra = [c for c in frame.columns if c.startswith("emb_pc") or c == "probability"]
    return [c for c in DRIFT_FEATURES if c in frame.columns] + extra


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, out_dir: Path, *,
                 share_threshold: float, min_rows: int, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the Evidently drift report; writes ``report.html`` and ``summary.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                               "reference_rows": int(len(reference)), "current_rows": int(len(current)),
                               "share_threshold": share_threshold, **(context or {})}
    if len(current) < min_rows:
        summary.update(status="insufficient_data", drift_detected=False, drift_share=None,
                       message=f"only {len(current)} production rows (< monitor.min_rows={min_rows}); "
                               "no drift verdict is possible yet")
        _write_summary(out_dir, summary)
        return summary
    cols = drift_columns(reference, current)
    snapshot = _evidently(reference[cols], current[cols], cols, share_threshold)
    snapshot.save_html(str(out_dir / "report.html"))
    columns = _column_status(snapshot.dict())
    drifted = sorted(c for c, s in columns.items() if s["drifted"])
    share = len(drifted) / max(1, len(columns))
    summary.update(status="ok", columns=columns, drifted_columns=drifted, drift_share=round(share, 4),
                   drift_detected=share > share_threshold, report_html=str(out_dir / "report.html"),
                   method=sorted({s["method"] for s in columns.values()}),
                   positive_rate={"reference": _rate(reference), "current": _rate(current)})
    _write_summary(out_dir, summary)
    logger.info("drift: %d/%d columns drifted (share %.2f, threshold %.2f) → %s", len(drifted), len(columns),
                share, share_threshold, "DRIFT" if summary["drift_detected"] else "no drift")
    return summary


def _rate(frame: pd.DataFrame) -> float | None:
    return round(float(frame["predicted_positive"].mean()), 4) if "predicted_positive" in frame else None


def _evidently(reference: pd.DataFrame, current: pd.DataFrame, cols: list[str], share: float) -> Any:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=cols)
    report = Report([DataDriftPreset(drift_share=share)], include_tests=True)
    return report.run(Dataset.from_pandas(current.astype(float), data_definition=definition),
                      Dataset.from_pandas(reference.astype(float), data_definition=definition))


def _column_status(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-column method, score and drift verdict, taken from each column's test status."""
    out: dict[str, dict[str, Any]] = {}
    for metric in snapshot.get("metrics", []):
        cfg = metric.get("config", {})
        if cfg.get("type", "").endswith("ValueDrift"):
            out[cfg["column"]] = {"method": cfg.get("method"), "threshold": cfg.get("threshold"),
                                  "score": _num(metric.get("value")), "drifted": False}
    for test in snapshot.get("tests", []):
        params = test.get("metric_config", {}).get("params", {})
        col = params.get("column")
        if col in out and params.get("type", "").endswith("ValueDrift"):
            out[col]["drifted"] = test.get("status") == "FAIL"
    return out


def _num(value: Any) -> float | None:
    try:
        return round(float(value), 6)
    except (TypeError, ValueError):
        return None


def _write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))


def report_dir(settings: Settings) -> Path:
    return settings.reports_dir / "drift" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


# --------------------------------------------------------------------------- reference profile


def reference_profile(frame: pd.DataFrame, probability: np.ndarray, threshold: float | None) -> pd.DataFrame:
    """Reference rows: image features of training/validation images plus the model's outputs."""
    ref = frame[[c for c in DRIFT_FEATURES if c in frame.columns]].astype(float).reset_index(drop=True)
    if probability.ndim == 1:
        ref["probability"] = probability
        if threshold is not None:
            ref["predicted_positive"] = (probability >= threshold).astype(float)
    else:
        ref["probability"] = probability.max(axis=1)
    return ref


def log_reference(settings: Settings, run_id: str, reference: pd.DataFrame) -> None:
    """Store the reference profile with the training run (so it travels with the model version)."""
    import tempfile

    import mlflow

    from pipeline.tracking import configure_mlflow

    configure_mlflow(settings)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        path = Path(tmp) / "profile.parquet"
        reference.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path="reference")


def load_reference(settings: Settings, run_id: str) -> pd.DataFrame:
    import mlflow

    from pipeline.tracking import configure_mlflow

    configure_mlflow(settings)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_ARTIFACT)
    return pd.read_parquet(local)
