"""Drift monitoring with Evidently on image features, embedding components and model outputs
(never raw pixels: Evidently cannot use them).

Reference = the profile logged with the serving model's training run (features of its
training/validation images, their embedding PCs and the model's probabilities on them);
current = a window of the production log for the same model version — real traffic only
(``api``, ``ui``, ``pacs``): simulated rows live in their own log and are compared only by the
main job's drift demo (``traffic="simulation"``) or when ``monitor.include_simulation`` is set.
No rows at all gives ``status="no_data"`` (nothing to compare, not an error, not an alert).
Output: ``reports/drift/<timestamp>/{report.html, report.json, summary.json}``.

Evidently switches its per-column test with the *reference* size (K-S p-value up to 1,000
rows, normed Wasserstein distance above; Z-test / Jensen-Shannon for the binary positive
flag) and the meaning of "score vs threshold" flips with it, so every verdict here is read
from the column's *test status*; raw scores are only used to order the drifted columns.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.config import MonitorSection, Settings
from pipeline.data.features import IMAGE_FEATURES
from pipeline.monitoring.estimation import (
    LABEL_COLUMN,
    add_label_free_section,
    label_free_markdown,
    label_free_metrics,
    label_free_summary,
)
from pipeline.registry.contract import PCA_ARTIFACT, REFERENCE_ARTIFACT
from pipeline.serving.predictor import EMB_PREFIX, EmbeddingPCA

logger = logging.getLogger(__name__)

# Bit depth is constant within a dataset and would make every drift test degenerate.
DRIFT_FEATURES = [f for f in IMAGE_FEATURES if f not in ("bit_depth",)]
UNIT_RANGE = ["mean", "std", "p05", "p50", "p95", "contrast", "probability"]
PREDICTION_COLUMNS = ["probability", "predicted_positive"]


def input_columns(reference: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    """Image features and embedding PCs present in both frames and not constant in both."""
    cols = [c for c in reference.columns if c in current.columns and (c in DRIFT_FEATURES or c.startswith(EMB_PREFIX))]
    return [c for c in cols if reference[c].nunique() > 1 or current[c].nunique() > 1]


# --------------------------------------------------------------------------- the report


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, out_dir: Path, *,
                 share_threshold: float, min_rows: int, context: dict[str, Any] | None = None,
                 label_free: tuple[MonitorSection, int, float] | None = None) -> dict[str, Any]:
    """Run the Evidently report; writes ``report.html``, ``report.json`` and ``summary.json`` into ``out_dir``.

    The drift share counts drifted *input* columns (image features + embedding PCs);
    prediction drift (probability distribution, positive rate) and data-quality checks are
    reported beside it. Fewer than ``min_rows`` current rows gives ``status="insufficient_data"``.
    ``label_free`` = (monitor settings, seed, interval level) adds the label-free estimates (CBPE,
    BBSE, embedding MMD; :mod:`pipeline.monitoring.estimation`) as ``summary["label_free"]``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                               "reference_rows": int(len(reference)), "current_rows": int(len(current)),
                               "share_threshold": share_threshold, "min_rows": min_rows, **(context or {})}
    if current.empty:
        what = "simulated traffic" if summary.get("traffic") == "simulation" else "production data"
        summary.update(status="no_data", drift_detected=False, drift_share=None, drifted_columns=[],
                       message=f"no {what} yet for this model version ({summary.get('window', 'in the window')}): "
                               "nothing to compare, no drift verdict")
        write_summary(out_dir, summary)
        logger.info("drift: %s", summary["message"])
        return summary
    if len(current) < min_rows or len(reference) < 2:
        summary.update(status="insufficient_data", drift_detected=False, drift_share=None, drifted_columns=[],
                       message=f"not enough data: {len(current)} production rows for this model version "
                               f"(need monitor.min_rows={min_rows}); no drift verdict is possible yet")
        write_summary(out_dir, summary)
        logger.warning("drift: %s", summary["message"])
        return summary
    inputs = input_columns(reference, current)
    snapshot = _evidently(reference, current, inputs, share_threshold)
    snapshot.save_html(str(out_dir / "report.html"))
    snap = snapshot.dict()
    (out_dir / "report.json").write_text(json.dumps(snap, default=_jsonable, indent=1))
    status = column_status(snap)
    columns = {c: status[c] for c in inputs if c in status}
    drifted = rank_drifted(columns)
    share = len(drifted) / max(1, len(columns))
    summary.update(status="ok", columns=columns, drifted_columns=drifted, top_drifted=drifted[:5],
                   drift_share=round(share, 4), drift_detected=share > share_threshold,
                   report_html=str(out_dir / "report.html"), report_json=str(out_dir / "report.json"),
                   method=sorted({s["method"] for s in columns.values() if s["method"]}),
                   prediction=_prediction_drift(reference, current, status),
                   data_quality=_quality(snap))
    if label_free is not None:
        cfg, seed, level = label_free
        summary["label_free"] = label_free_summary(reference, current, cfg, seed=seed, level=level)
        add_label_free_section(out_dir / "report.html", summary["label_free"])
    write_summary(out_dir, summary)
    logger.info("drift: %d/%d input columns drifted (share %.2f, threshold %.2f) → %s", len(drifted), len(columns),
                share, share_threshold, "DRIFT" if summary["drift_detected"] else "no drift")
    return summary


def _evidently(reference: pd.DataFrame, current: pd.DataFrame, inputs: list[str], share: float) -> Any:
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MissingValueCount, OutRangeValueCount, RowCount, ValueDrift
    from evidently.presets import DataDriftPreset
    from evidently.tests import eq

    numeric = inputs + [c for c in ("probability",) if c in reference and c in current]
    categorical = [c for c in ("predicted_positive",) if c in reference and c in current]
    metrics: list[Any] = [DataDriftPreset(columns=inputs, drift_share=share)]
    metrics += [ValueDrift(column=c) for c in numeric[len(inputs):] + categorical]
    metrics += [RowCount()] + [MissingValueCount(column=c, tests=[eq(0)]) for c in numeric + categorical]
    metrics += [OutRangeValueCount(column=c, left=0.0, right=1.0, tests=[eq(0)]) for c in UNIT_RANGE if c in numeric]
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    cols = numeric + categorical

    def dataset(frame: pd.DataFrame) -> Any:
        data = frame[cols].astype(float)
        for c in categorical:
            data[c] = data[c].round().astype("Int64")
        return Dataset.from_pandas(data, data_definition=definition)

    report = Report(metrics, include_tests=True)
    return report.run(dataset(current), dataset(reference))


def column_status(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-column method, threshold, score and drift verdict; the verdict comes from the test status."""
    out: dict[str, dict[str, Any]] = {}
    for metric in snapshot.get("metrics", []):
        cfg = metric.get("config", {})
        if str(cfg.get("type", "")).endswith("ValueDrift"):
            out[cfg["column"]] = {"method": cfg.get("method"), "threshold": cfg.get("threshold"),
                                  "score": _num(metric.get("value")), "drifted": False, "status": None}
    for test in snapshot.get("tests", []):
        params = test.get("metric_config", {}).get("params", {})
        col = params.get("column")
        if col in out and str(params.get("type", "")).endswith("ValueDrift"):
            state = _status(test.get("status"))
            out[col]["status"] = state
            out[col]["drifted"] = state == "FAIL"
    return out


def rank_drifted(columns: dict[str, dict[str, Any]]) -> list[str]:
    """Drifted columns, most severe first (severity only orders; the verdict is the test status)."""
    return sorted((c for c, s in columns.items() if s["drifted"]), key=lambda c: -drift_severity(columns[c]))


def drift_severity(col: dict[str, Any]) -> float:
    """A column's drift score scaled so that 1.0 is its test's threshold, whichever method Evidently chose."""
    score, thr = col.get("score"), col.get("threshold") or 0.05
    if score is None:
        return 0.0
    if "p_value" in str(col.get("method")):
        return -math.log10(max(score, 1e-300)) / max(-math.log10(thr), 1e-9)
    return score / thr if thr else score


def _prediction_drift(reference: pd.DataFrame, current: pd.DataFrame,
                      status: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "probability" in status:
        out["probability"] = {**status["probability"], "reference_mean": _mean(reference, "probability"),
                              "current_mean": _mean(current, "probability")}
    if "predicted_positive" in status:
        out["positive_rate"] = {**status["predicted_positive"], "reference": _mean(reference, "predicted_positive"),
                                "current": _mean(current, "predicted_positive")}
    out["drift_detected"] = any(v.get("drifted") for v in out.values() if isinstance(v, dict))
    return out


def _quality(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Data-quality checks (missing values, values outside [0, 1]): failed check names."""
    failed, passed = [], 0
    for test in snapshot.get("tests", []):
        kind = str(test.get("metric_config", {}).get("params", {}).get("type", ""))
        if kind.endswith(("MissingValueCount", "OutRangeValueCount")):
            if _status(test.get("status")) in ("FAIL", "ERROR"):
                failed.append(str(test.get("name")))
            else:
                passed += 1
    return {"passed": passed, "failed": failed, "ok": not failed}


def _status(value: Any) -> str:
    return str(getattr(value, "value", value)).upper().removeprefix("TESTSTATUS.")


def _mean(frame: pd.DataFrame, col: str) -> float | None:
    return round(float(frame[col].mean()), 4) if col in frame and len(frame) else None


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return round(out, 6) if math.isfinite(out) else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(getattr(obj, "value", obj))


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=_jsonable))


def report_dir(settings: Settings) -> Path:
    return settings.reports_dir / "drift" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def summary_markdown(summary: dict[str, Any]) -> str:
    """A short human summary (Prefect artifact, CLI)."""
    head = f"## Drift report — {summary.get('model_name')} v{summary.get('model_version')}\n\n"
    skipped = (f"\n- unreadable log parts skipped: {summary['skipped_parts']}"
               if summary.get("skipped_parts") else "")
    if summary["status"] == "no_data":
        return head + f"**No data yet.** {summary.get('message', '')}\n{skipped}"
    if summary["status"] != "ok":
        return head + f"**Not enough data.** {summary.get('message', '')}\n{skipped}"
    verdict = "**DRIFT DETECTED**" if summary["drift_detected"] else "no drift"
    lines = [f"- verdict: {verdict} — drift share {summary['drift_share']:.2f} "
             f"(threshold {summary['share_threshold']:.2f}) over {len(summary['columns'])} input columns",
             f"- rows: {summary['current_rows']} current vs {summary['reference_rows']} reference; "
             f"method {', '.join(summary['method'])}"]
    pred = summary.get("prediction", {})
    if "positive_rate" in pred:
        pr = pred["positive_rate"]
        state = "drifted" if pr["drifted"] else "stable"
        lines.append(f"- positive rate: {pr['reference']} → {pr['current']} ({state})")
    if "probability" in pred:
        lines.append(f"- probability distribution: {'drifted' if pred['probability']['drifted'] else 'stable'}")
    dq = summary.get("data_quality", {})
    lines.append(f"- data quality: {'ok' if dq.get('ok') else 'FAILED: ' + '; '.join(dq.get('failed', []))}")
    lines += label_free_markdown(summary.get("label_free"))
    if summary.get("rejected_share") is not None:
        lines.append(f"- rejected requests in window: {summary['rejected_share']:.1%}")
    if summary.get("rows_by_source"):
        lines.append("- rows by source: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["rows_by_source"].items())))
    if skipped:
        lines.append(skipped.strip())
    rows = "\n".join(f"| {c} | {summary['columns'][c]['method']} | {summary['columns'][c]['score']} | "
                     f"{summary['columns'][c]['threshold']} |" for c in summary.get("top_drifted", []))
    table = f"\n\n| top drifted feature | method | score | threshold |\n|---|---|---|---|\n{rows}" if rows else ""
    return head + "\n".join(lines) + table + f"\n\nReport: `{summary.get('report_html')}`\n"


# --------------------------------------------------------------------------- reference profile


def reference_profile(frame: pd.DataFrame, probability: np.ndarray, threshold: float | None,
                      embedding_pcs: np.ndarray | None = None) -> pd.DataFrame:
    """Reference rows: image features of training/validation images, embedding PCs and the model's outputs;
    for a binary model also ``y_true``, the label of held-out (validation) rows (empty for training rows).
    """
    ref = frame[[c for c in DRIFT_FEATURES if c in frame.columns]].astype(float).reset_index(drop=True)
    if probability.ndim == 1:
        ref["probability"] = probability
        ref["predicted_positive"] = (probability >= (0.5 if threshold is None else threshold)).astype(float)
    else:
        ref["probability"] = probability.max(axis=1)
    if embedding_pcs is not None:
        for i in range(embedding_pcs.shape[1]):
            ref[f"{EMB_PREFIX}{i + 1}"] = embedding_pcs[:, i]
    if "split" in frame.columns:
        ref["split"] = frame["split"].to_numpy()
        if probability.ndim == 1 and "label_index" in frame.columns:  # labels of held-out rows (CBPE/BBSE)
            held_out = (frame["split"] != "train").to_numpy()
            ref[LABEL_COLUMN] = np.where(held_out, frame["label_index"].to_numpy(dtype=float), np.nan)
    return ref


def log_reference(settings: Settings, run_id: str, reference: pd.DataFrame, pca: EmbeddingPCA | None = None) -> None:
    """Store the reference profile (and the embedding PCA) with the training run."""
    import tempfile

    from pipeline.tracking import configure_mlflow

    client = configure_mlflow(settings)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(REFERENCE_ARTIFACT).name
        reference.to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), Path(REFERENCE_ARTIFACT).parent.as_posix())
        if pca is not None:
            pca_path = Path(tmp) / Path(PCA_ARTIFACT).name
            pca_path.write_bytes(pca.to_bytes())
            client.log_artifact(run_id, str(pca_path), Path(PCA_ARTIFACT).parent.as_posix())


def load_reference(settings: Settings, run_id: str) -> pd.DataFrame:
    import mlflow

    from pipeline.tracking import configure_mlflow

    configure_mlflow(settings)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_ARTIFACT)
    return pd.read_parquet(local)


# --------------------------------------------------------------------------- monitoring run


Traffic = Literal["production", "simulation"]


def current_window(settings: Settings, version: str, *, hours: float | None = None, last_k: int | None = None,
                   traffic: Traffic = "production") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Rows of model ``version`` in the configured window, plus counts for the summary.

    ``production``: the production log without simulated rows (``source=simulation`` rows an older
    version wrote there are left out and counted), plus the simulation log when
    ``monitor.include_simulation`` is set. ``simulation``: the simulation log only. Unreadable part
    files are skipped and counted (``skipped_parts``).
    """
    from pipeline.monitoring.simulate import simulation_log_dir
    from pipeline.serving import production_log

    cfg = settings.monitor
    if hours is None and last_k is None:
        hours = cfg.window_hours
    last_k = None if hours is not None else (last_k or cfg.last_k)
    where = {"model_name": settings.registered_model, "model_version": version}
    windows = []
    if traffic == "production":
        windows.append(production_log.read_window(settings.production_log, hours=hours, last_k=last_k, where=where,
                                                  exclude={"source": [production_log.SIMULATION]}))
    if traffic == "simulation" or cfg.include_simulation:
        windows.append(production_log.read_window(simulation_log_dir(settings), hours=hours, last_k=last_k,
                                                  where=where))
    rows = _merge([w.rows for w in windows], last_k if hours is None else None)
    skipped = [p for w in windows for p in w.skipped_parts]
    info: dict[str, Any] = {
        "window": f"last {hours} h" if hours is not None else f"last {last_k} predictions",
        "traffic": "production+simulation" if traffic == "production" and cfg.include_simulation else traffic,
        "rows_by_source": _by_source(rows),
        "excluded_simulated_rows": windows[0].excluded_rows if traffic == "production" else 0,
        "skipped_parts": len(skipped), "skipped_files": skipped}
    if info["excluded_simulated_rows"]:
        logger.warning("%s: left out %d simulated rows (source=simulation) written there by an older version; "
                       "simulated traffic now has its own log (paths.simulation_log)", settings.production_log,
                       info["excluded_simulated_rows"])
    if traffic == "simulation":
        return rows, {**info, "rejected_rows": 0, "rejected_share": None}
    rejected_window = production_log.read_window(settings.production_log / production_log.REJECTED_DIR, hours=hours)
    rejected = rejected_window.rows
    info["skipped_parts"] += len(rejected_window.skipped_parts)
    info["skipped_files"] += rejected_window.skipped_parts
    if hours is None and not rejected.empty:
        since = rows["request_time"].min() if not rows.empty else None
        rejected = rejected[rejected["request_time"] >= since] if since is not None else rejected.iloc[0:0]
    total = len(rows) + len(rejected)
    info.update(rejected_rows=int(len(rejected)), rejected_share=round(len(rejected) / total, 4) if total else None,
                latency_p95_ms=latency_p95(rows))
    return rows, info


def latency_p95(rows: pd.DataFrame) -> float | None:
    """95th percentile of the logged server-side latency (``latency_ms``); None when no row has one."""
    if "latency_ms" not in rows:
        return None
    latency = pd.to_numeric(rows["latency_ms"], errors="coerce").dropna()
    return round(float(latency.quantile(0.95)), 2) if len(latency) else None


def _merge(frames: list[pd.DataFrame], last_k: int | None) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if len(frames) <= 1:
        return frames[0] if frames else pd.DataFrame()
    rows = pd.concat(frames, ignore_index=True).sort_values("request_time", kind="stable")
    return (rows.tail(last_k) if last_k else rows).reset_index(drop=True)


def _by_source(rows: pd.DataFrame) -> dict[str, int]:
    if rows.empty:
        return {}
    source = rows["source"].fillna("unknown") if "source" in rows else pd.Series("unknown", index=rows.index)
    return {str(k): int(v) for k, v in source.astype(str).value_counts().sort_index().items()}


def log_monitoring_run(settings: Settings, summary: dict[str, Any], out_dir: Path) -> str:
    """Log the report (HTML + JSON) to the monitoring experiment, tagged with the model version."""
    import mlflow

    from pipeline.tracking import configure_mlflow, ensure_experiment

    configure_mlflow(settings)
    exp = ensure_experiment(settings, f"{settings.experiment_name}/monitoring")
    traffic = str(summary.get("traffic", "production"))
    tags = {"model_name": summary.get("model_name"), "model_version": summary.get("model_version"),
            "status": summary["status"], "drift_detected": str(bool(summary.get("drift_detected"))).lower(),
            "traffic": traffic}
    tags = {k: str(v) for k, v in tags.items() if v is not None}  # a missing value is no tag, never "None"
    name = f"{'simulated-' if traffic == 'simulation' else ''}drift-v{summary.get('model_version')}"
    with mlflow.start_run(experiment_id=exp, run_name=name, tags=tags) as run:
        metrics = {"current_rows": summary["current_rows"], "reference_rows": summary["reference_rows"],
                   "skipped_parts": summary.get("skipped_parts", 0)}
        if summary["status"] == "ok":
            metrics.update(drift_share=summary["drift_share"], drifted_columns=len(summary["drifted_columns"]))
            rate = summary.get("prediction", {}).get("positive_rate", {}).get("current")
            if rate is not None:
                metrics["positive_rate"] = rate
            metrics.update(label_free_metrics(summary.get("label_free")))
        mlflow.log_metrics(metrics)
        for name in ("report.html", "report.json", "summary.json"):
            if (out_dir / name).is_file():
                mlflow.log_artifact(str(out_dir / name), artifact_path="drift")
        return str(run.info.run_id)


def monitor_champion(settings: Settings, *, hours: float | None = None, last_k: int | None = None,
                     alias: str | None = None, traffic: Traffic = "production") -> dict[str, Any]:
    """Drift of the window of ``traffic`` (see :func:`current_window`) against the reference of the version
    holding ``alias``."""
    from pipeline.registry.read import get_alias

    alias = alias or settings.serve.model_alias
    version = get_alias(settings, alias)
    if version is None:
        return {"status": "no_model", "drift_detected": False,
                "message": f"no version of {settings.registered_model} holds alias '{alias}': "
                           "train and promote a model first (`xrayops run`)"}
    current, info = current_window(settings, str(version.version), hours=hours, last_k=last_k, traffic=traffic)
    reference = load_reference(settings, version.run_id)
    if "split" in reference.columns:
        reference = reference.drop(columns=["split"])
    out_dir = report_dir(settings)
    context = {"model_name": settings.registered_model, "model_version": str(version.version), "alias": alias,
               **info}
    summary = drift_report(reference, current, out_dir, share_threshold=settings.monitor.drift_share_threshold,
                           min_rows=settings.monitor.min_rows, context=context,
                           label_free=(settings.monitor, settings.base.seed, settings.evaluate.ci_level))
    if summary["status"] == "no_data" and traffic == "production":
        summary["message"] += (f". Predictions served by `xrayops serve` / `xrayops ui` are logged to "
                               f"{settings.production_log}; the simulated traffic of `xrayops run` is kept apart "
                               f"in {settings.simulation_log}")
    summary["mlflow_run_id"] = log_monitoring_run(settings, summary, out_dir)
    summary["report_dir"] = str(out_dir)
    write_summary(out_dir, summary)
    return summary
