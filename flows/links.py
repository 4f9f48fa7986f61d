"""Links for run artifacts: MLflow UI pages when the tracking server is HTTP, files otherwise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

logger = logging.getLogger(__name__)


def _experiment_id(tracking_uri: str, run_id: str) -> str | None:
    try:
        from mlflow import MlflowClient

        return str(MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id)
    except Exception as exc:  # noqa: BLE001 - a link is a convenience: never fail a run over it
        logger.warning("cannot resolve the experiment of run %s: %s", run_id, exc)
        return None


def _without_credentials(uri: str) -> str:
    """``uri`` without a ``user[:password]@`` part: links never carry credentials (the browser asks)."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else uri


def mlflow_links(tracking_uri: str, run_id: str | None, model_name: str | None, version: str | None,
                 experiment_id: str | None = None) -> list[str]:
    """Markdown bullets linking the MLflow run and registry version (HTTP tracking servers only).

    ``experiment_id`` saves a lookup (and is needed when ``tracking_uri`` has its password masked)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return []
    base = _without_credentials(tracking_uri).rstrip("/")
    lines = []
    exp = experiment_id or (_experiment_id(tracking_uri, run_id) if run_id else None)
    if exp and run_id:
        lines.append(f"- [MLflow run]({base}/#/experiments/{exp}/runs/{run_id})")
    if model_name and version:
        lines.append(f"- [Registry: {model_name} v{version}]({base}/#/models/{quote(model_name)}/versions/{version})")
        lines.append(f"- [All versions and aliases of {model_name}]({base}/#/models/{quote(model_name)})")
    return lines


def file_link(label: str, path: str | None) -> str | None:
    """A markdown link to a local report (opens on the machine that holds it)."""
    if not path:
        return None
    return f"- {label}: [{Path(path).name}]({Path(path).resolve().as_uri()}) (`{path}`)"


def summary_links(summary: dict[str, Any]) -> list[str]:
    """All links of a training-run summary."""
    reg, reports = summary.get("registry") or {}, summary.get("reports") or {}
    train = summary.get("train") or {}
    lines = mlflow_links(summary.get("tracking_uri", ""), train.get("run_id"), reg.get("model_name"),
                         reg.get("version"), train.get("experiment_id"))
    if not lines and summary.get("mlflow_ui"):
        lines.append(f"- MLflow UI: `{summary['mlflow_ui']}`")
    for label, key in (("Drift report", "drift_html"), ("Data Docs (GX)", "data_docs"),
                       ("Split certificate", "split_certificate"), ("Metrics", "metrics")):
        line = file_link(label, reports.get(key))
        if line:
            lines.append(line)
    return lines
