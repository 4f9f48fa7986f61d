"""Monitoring over time: every monitoring run adds a snapshot to an Evidently workspace project per model.

The drift report of one run is a single HTML file; the workspace keeps one point per run so the
Evidently UI (``xrayops monitor ui``) can draw a timeline. Evidently 0.7's workspace stores its own
Report snapshots and its dashboards plot the values of metrics found in them, so each run's values
are written as a one-row *timeline frame* (one column per value, taken from ``summary.json``) and
measured with built-in metrics that plot as-is:

- ``MeanValue(column=<name>)`` — one series per scalar: drift share, CBPE AUC and its interval,
  BBSE prevalence and its interval, MMD p-value, input-gate rejection rate, request volume,
  latency p95, and the alert thresholds as constant reference series (the dashboard API has no
  threshold lines): ``drift_share_threshold``, ``cbpe_auc_alert_floor`` (reference AUC minus
  ``monitor.cbpe_auc_drop_alert``), ``bbse_prevalence_alert_low/high`` (reference prevalence ±
  ``monitor.prevalence_change_alert``), ``mmd_alpha``, ``feature_drift_threshold`` (1.0);
- ``MaxValue(column=<feature>)`` — the drift severity of each input feature (its test's score
  scaled so that 1.0 is the drift threshold, whichever method Evidently chose; see
  :func:`pipeline.monitoring.drift.drift_severity`), plotted as one series per feature.

The full Evidently drift report is *not* copied into the workspace: its widgets hold row-level
feature values. Snapshots hold aggregate values and feature names only (no identifiers; the
production log has none); the report stays in ``reports/drift/<timestamp>/`` and MLflow, and its
path is in the snapshot's metadata. Rejection rate and latency have no configured alert threshold,
so their panels show the values alone.
"""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import MonitorSection, Settings
from pipeline.errors import ConfigError, PortInUse
from pipeline.monitoring.drift import drift_severity
from pipeline.runtime import QUIET_ENV

logger = logging.getLogger(__name__)

WORKSPACE_DIRNAME = "evidently-workspace"
SCALAR_METRIC = "MeanValue"  # one series per timeline value
FEATURE_METRIC = "MaxValue"  # one series per input feature (drift severity)

# (title, plot type, [(column, legend), …]); FEATURE_METRIC series are added to the features panel
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Drift share (input features)", "line",
     [("drift_share", "drift share"), ("drift_share_threshold", "alert threshold")]),
    ("Most drifted features (severity, 1 = drift threshold)", "line",
     [("feature_drift_threshold", "drift threshold")]),
    ("CBPE estimated AUC (label-free) with interval", "line",
     [("cbpe_auc", "estimated AUC"), ("cbpe_auc_ci_low", "interval low"), ("cbpe_auc_ci_high", "interval high"),
      ("cbpe_auc_alert_floor", "alert floor (reference AUC − monitor.cbpe_auc_drop_alert)")]),
    ("BBSE prevalence (label-free) with interval", "line",
     [("bbse_prevalence", "estimated prevalence"), ("bbse_prevalence_ci_low", "interval low"),
      ("bbse_prevalence_ci_high", "interval high"), ("bbse_prevalence_alert_low", "alert band low"),
      ("bbse_prevalence_alert_high", "alert band high")]),
    ("Embedding drift: MMD p-value", "line", [("mmd_p_value", "p-value"), ("mmd_alpha", "alert below (mmd_alpha)")]),
    ("Input-gate rejection rate", "line", [("rejection_rate", "rejected share of requests")]),
    ("Request volume (window)", "bar", [("requests", "requests"), ("predictions", "predictions"),
                                         ("rejected", "rejected")]),
    ("Latency p95 (ms)", "line", [("latency_p95_ms", "p95 latency (ms)")]),
]
PANEL_TITLES = [title for title, _, _ in PANELS]


def workspace_dir(settings: Settings) -> Path:
    """``monitor.workspace``, or ``<paths.home>/evidently-workspace`` when it is null."""
    return settings.resolve(settings.monitor.workspace or settings.home / WORKSPACE_DIRNAME)


# --------------------------------------------------------------------------- values of one run


def timeline_values(summary: dict[str, Any], cfg: MonitorSection) -> dict[str, float]:
    """The scalar values of one monitoring run (from its summary), thresholds included; missing ones left out."""
    rejected = summary.get("rejected_rows") or 0
    values: dict[str, Any] = {"requests": summary.get("current_rows", 0) + rejected,
                              "predictions": summary.get("current_rows", 0), "rejected": rejected,
                              "rejection_rate": summary.get("rejected_share"),
                              "latency_p95_ms": summary.get("latency_p95_ms")}
    if summary.get("status") == "ok":
        values.update(drift_share=summary.get("drift_share"), drift_share_threshold=summary.get("share_threshold"),
                      drifted_columns=len(summary.get("drifted_columns", [])), feature_drift_threshold=1.0)
    values.update(_label_free_values(summary.get("label_free") or {}, cfg))
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def _label_free_values(section: dict[str, Any], cfg: MonitorSection) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cbpe, bbse, mmd = (section.get(k) or {} for k in ("cbpe", "bbse", "embedding_mmd"))
    if cbpe.get("status") == "ok":
        low, high = (cbpe.get("ci") or {}).get("auc") or [None, None]
        ref_auc = (cbpe.get("reference") or {}).get("auc")
        out.update(cbpe_auc=cbpe.get("auc"), cbpe_auc_ci_low=low, cbpe_auc_ci_high=high,
                   cbpe_auc_alert_floor=None if ref_auc is None else round(ref_auc - cfg.cbpe_auc_drop_alert, 4))
    if bbse.get("status") == "ok":
        low, high = (bbse.get("ci") or {}).get("prevalence") or [None, None]
        ref = (bbse.get("reference") or {}).get("prevalence")
        out.update(bbse_prevalence=bbse.get("prevalence"), bbse_prevalence_ci_low=low, bbse_prevalence_ci_high=high)
        if ref is not None:
            out.update(bbse_prevalence_alert_low=round(max(0.0, ref - cfg.prevalence_change_alert), 4),
                       bbse_prevalence_alert_high=round(min(1.0, ref + cfg.prevalence_change_alert), 4))
    if mmd.get("status") == "ok":
        out.update(mmd_p_value=mmd.get("p_value"), mmd_alpha=cfg.mmd_alpha)
    return out


def feature_severities(summary: dict[str, Any]) -> dict[str, float]:
    """Drift severity of each input feature (1.0 = its test's threshold); empty without a drift verdict."""
    if summary.get("status") != "ok":
        return {}
    return {name: round(drift_severity(col), 6) for name, col in (summary.get("columns") or {}).items()}


# --------------------------------------------------------------------------- workspace, project, dashboard


def open_workspace(path: Path) -> Any:
    """The local Evidently workspace at ``path`` (created when missing).

    Raises:
        ConfigError: ``path`` exists and is not a folder.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"Evidently workspace {path} is not a folder",
                          hint="point monitor.workspace at a folder (null = <paths.home>/evidently-workspace)")
    from evidently.ui.workspace import Workspace

    path.mkdir(parents=True, exist_ok=True)
    return Workspace(str(path))


SIMULATED_SUFFIX = " (simulated traffic)"


def model_project(workspace: Any, model_name: str) -> Any:
    """The project named after the registered model; created with its dashboard the first time."""
    found = workspace.search_project(model_name)
    if found:
        return found[0]
    project = workspace.create_project(model_name, description=f"xrayops monitoring of the registered model "
                                       f"{model_name}: one snapshot per monitoring run (`xrayops monitor`)")
    add_dashboard(project)
    return project


def add_dashboard(project: Any) -> None:
    """The timeline panels of :data:`PANELS` (the alert thresholds as constant reference series)."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, line_plot_panel

    for title, kind, series in PANELS:
        values = [PanelMetric(legend=legend, metric=SCALAR_METRIC, metric_labels={"column": column})
                  for column, legend in series]
        if title.startswith("Most drifted"):
            values.insert(0, PanelMetric(legend="{{column}}", metric=FEATURE_METRIC))
        plot = bar_plot_panel if kind == "bar" else line_plot_panel
        project.dashboard.add_panel(plot(title=title, values=values, size="half"), tab="Monitoring")


def run_snapshot(summary: dict[str, Any], cfg: MonitorSection) -> Any:
    """An Evidently snapshot of the run: built-in metrics over its one-row timeline frame (see the module doc)."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MaxValue, MeanValue

    values, severities = timeline_values(summary, cfg), feature_severities(summary)
    frame = pd.DataFrame([{**values, **severities}], dtype=float)
    metrics = [MeanValue(column=c) for c in values] + [MaxValue(column=c) for c in severities]
    data = Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=list(frame.columns)))
    when = datetime.fromisoformat(summary["created_at"]) if summary.get("created_at") else datetime.now(UTC)
    metadata = {k: str(summary[k]) for k in ("model_name", "model_version", "alias", "status", "traffic", "window",
                                             "report_html") if summary.get(k) is not None}
    tags = [f"v{summary.get('model_version')}", str(summary.get("traffic", "production"))]
    tags += ["drift"] if summary.get("drift_detected") else []
    tags += ["label-free-alert"] if (summary.get("label_free") or {}).get("alert") else []
    report = Report(metrics, metadata=metadata, tags=tags)
    return report.run(data, None, timestamp=when.astimezone(UTC).replace(tzinfo=None),
                      name=f"v{summary.get('model_version')} {when:%Y-%m-%d %H:%M:%S}")


def add_run_snapshot(path: Path, summary: dict[str, Any], cfg: MonitorSection) -> dict[str, Any]:
    """Add the run of ``summary`` to the model's project in the workspace at ``path``.

    Returns:
        ``{"path", "project_id", "snapshot_id", "values"}`` (values: the plotted scalars).
    """
    workspace = open_workspace(path)
    name = str(summary.get("model_name"))
    if summary.get("traffic") == "simulation":  # the main job's demo never lands on production's timeline
        name += SIMULATED_SUFFIX
    project = model_project(workspace, name)
    ref = workspace.add_run(project.id, run_snapshot(summary, cfg), include_data=False)
    logger.info("monitoring snapshot %s added to the Evidently workspace %s (project %s)", ref.id, path, project.name)
    return {"path": str(path), "project_id": str(project.id), "snapshot_id": str(ref.id),
            "values": timeline_values(summary, cfg)}


def record_monitoring_run(settings: Settings, summary: dict[str, Any]) -> dict[str, Any]:
    """:func:`add_run_snapshot` into :func:`workspace_dir` with the project's monitor settings."""
    return add_run_snapshot(workspace_dir(settings), summary, settings.monitor)


# --------------------------------------------------------------------------- the UI service


def check_port_free(host: str, port: int) -> None:
    """Raises :class:`PortInUse` when ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUse(f"cannot start the Evidently UI on {host}:{port}: the port is in use ({exc.strerror})",
                            hint="stop what listens there or pass --port with a free port") from None


def ui_command(path: Path, host: str, port: int) -> list[str]:
    """``evidently ui`` on the workspace (run with this interpreter, so the project's Evidently)."""
    return [sys.executable, "-m", "evidently.cli", "ui", "--workspace", str(path), "--host", host,
            "--port", str(port)]


def ui_env(environ: dict[str, str]) -> dict[str, str]:
    """The environment of the UI process: telemetry off (``DO_NOT_TRACK``) whatever the caller set."""
    return {**environ, **{k: v for k, v in QUIET_ENV.items() if k not in environ}, "DO_NOT_TRACK": "1"}


def start_ui(path: Path, host: str, port: int, environ: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the Evidently UI service on the workspace at ``path`` (created when missing); returns the process.

    Raises:
        PortInUse: the port is taken.
        ConfigError: ``path`` is not a folder.
    """
    open_workspace(path)
    check_port_free(host, port)
    return subprocess.Popen(ui_command(path, host, port), env=ui_env(environ), start_new_session=True)
