"""The monitoring flow: drift of production inputs vs the champion's reference → report, alert, retraining.

Tasks are thin wrappers of :mod:`pipeline.monitoring.drift`. The summary also carries label-free
estimates (``label_free``: CBPE performance, BBSE prevalence, embedding MMD; see
:mod:`pipeline.monitoring.estimation`); their alerts are logged as warnings. Each run is also added
as a snapshot to the model's project in the Evidently workspace (``monitor.workspace``; the
timeline dashboard of ``xrayops monitor ui``, :mod:`pipeline.monitoring.workspace`). When the drift share exceeds
``monitor.drift_share_threshold`` the flow emits the Prefect event ``xrayops.drift.detected``
(automations can react to it), ends in a ``Completed`` state named ``Drift detected``, and —
when ``monitor.retrain_on_drift`` is set — starts the training deployment
(``monitor.training_deployment``) with ``run_deployment``. The window is real traffic only
unless ``monitor.include_simulation`` is set, and drift in a window holding simulated rows never
starts a retraining.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from pydantic import BaseModel, Field

from pipeline.config import Settings, load_settings, with_overrides
from pipeline.serving.production_log import SIMULATION

DRIFT_EVENT = "xrayops.drift.detected"


class MonitoringParameters(BaseModel):
    """What a person can change when starting a monitoring run from the UI or CLI."""

    window_hours: float | None = Field(None, gt=0, title="Window (hours)",
                                       description="Compare the last N hours of predictions. Empty = params.yaml.")
    last_k: int | None = Field(None, ge=1, title="Window (predictions)",
                               description="Compare the last K predictions (when no hours are given).")
    retrain_on_drift: bool | None = Field(None, title="Retrain on drift",
                                          description="Start the training deployment when drift is detected.")
    overrides: list[str] = Field(default_factory=list, title="Other settings",
                                 description="section.field=value strings, e.g. monitor.drift_share_threshold=0.2.")
    params_path: str | None = Field(None, title="params.yaml path", description="Empty = the project's params.yaml.")

    def settings(self) -> Settings:
        retrain = self.retrain_on_drift
        sets = [] if retrain is None else [f"monitor.retrain_on_drift={str(retrain).lower()}"]
        return with_overrides(load_settings(self.params_path), [*sets, *self.overrides])


@task(name="drift-report", cache_policy=NO_CACHE)
def drift_report(settings: Settings, window_hours: float | None, last_k: int | None) -> dict[str, Any]:
    from pipeline.monitoring.drift import monitor_champion

    return monitor_champion(settings, hours=window_hours, last_k=last_k)


@task(name="timeline-snapshot", cache_policy=NO_CACHE)
def timeline_snapshot(settings: Settings, summary: dict[str, Any]) -> dict[str, str] | None:
    """Add the run to the model's Evidently workspace project (the timeline of `xrayops monitor ui`); where it went."""
    from pipeline.monitoring.drift import write_summary
    from pipeline.monitoring.workspace import record_monitoring_run

    if summary["status"] == "no_model":
        return None
    recorded = record_monitoring_run(settings, summary)
    where = {k: recorded[k] for k in ("path", "project_id", "snapshot_id")}
    write_summary(Path(summary["report_dir"]), {**summary, "workspace": where})
    get_run_logger().info("monitoring snapshot %s added to the Evidently workspace %s (`xrayops monitor ui`)",
                          recorded["snapshot_id"], recorded["path"])
    return where


@task(name="publish-report", cache_policy=NO_CACHE)
def publish(summary: dict[str, Any]) -> None:
    from pipeline.monitoring.drift import summary_markdown

    if summary["status"] == "no_model":
        create_markdown_artifact(f"## Drift report\n\n{summary['message']}\n", key="drift-report")
        return
    if summary.get("skipped_parts"):
        get_run_logger().warning("skipped %d unreadable log part file(s): %s", summary["skipped_parts"],
                                 ", ".join(summary.get("skipped_files", [])[:3]))
    create_markdown_artifact(summary_markdown(summary), key="drift-report",
                             description=f"Drift of {summary.get('model_name')} v{summary.get('model_version')}")
    if summary.get("report_html"):
        create_link_artifact(Path(summary["report_html"]).as_uri(), link_text="Evidently drift report (HTML)",
                             key="drift-report-html", description=f"MLflow run {summary.get('mlflow_run_id')}")


@task(name="drift-alert", cache_policy=NO_CACHE)
def alert(summary: dict[str, Any]) -> dict[str, Any]:
    from prefect.events import emit_event

    name, version = summary.get("model_name"), summary.get("model_version")
    event = emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"xrayops.model.{name}", "prefect.resource.name": str(name),
                  "xrayops.model.version": str(version)},
        payload={"drift_share": summary["drift_share"], "threshold": summary["share_threshold"],
                 "top_drifted": summary.get("top_drifted", []), "report_html": summary.get("report_html"),
                 "mlflow_run_id": summary.get("mlflow_run_id")})
    get_run_logger().warning("DRIFT on %s v%s: share %.2f > %.2f (top: %s)", name, version, summary["drift_share"],
                             summary["share_threshold"], ", ".join(summary.get("top_drifted", [])))
    return {"event": DRIFT_EVENT, "event_id": str(event.id) if event is not None else None}


@task(name="trigger-retraining", cache_policy=NO_CACHE)
def trigger_retraining(settings: Settings, summary: dict[str, Any]) -> dict[str, Any]:
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = settings.monitor.training_deployment
    try:
        run = run_deployment(name=name, timeout=0, tags=["drift-triggered"], as_subflow=False)
    except ObjectNotFound:
        get_run_logger().warning("retrain_on_drift is set but no deployment named '%s' exists: create it with "
                                 "`xrayops deploy` or point monitor.training_deployment at an existing one", name)
        return {"triggered": False, "deployment": name, "reason": "deployment not found"}
    get_run_logger().info("started training deployment %s: flow run %s", name, run.id)
    return {"triggered": True, "deployment": name, "flow_run_id": str(run.id)}


@flow(name="xrayops-monitoring", log_prints=True)
def monitoring_flow(params: MonitoringParameters | None = None) -> Any:
    """Drift report on the production window; alert and optionally retrain when drift is detected."""
    params = params or MonitoringParameters()
    settings = params.settings()
    summary = drift_report(settings, params.window_hours, params.last_k)
    summary["workspace"] = timeline_snapshot(settings, summary)
    publish(summary)
    raised = [k for k, v in (summary.get("label_free") or {}).get("alerts", {}).items() if v]
    if raised:
        get_run_logger().warning("label-free monitoring alerts on v%s: %s (summary.json → label_free)",
                                 summary.get("model_version"), ", ".join(raised))
    if not summary.get("drift_detected"):
        return summary
    summary["alert"] = alert(summary)
    simulated = (summary.get("rows_by_source") or {}).get(SIMULATION, 0)
    if settings.monitor.retrain_on_drift and simulated:
        get_run_logger().warning("not retraining: the drift window holds %d simulated rows "
                                 "(monitor.include_simulation); only drift on real traffic starts training", simulated)
        summary["retraining"] = {"triggered": False, "deployment": settings.monitor.training_deployment,
                                 "reason": "the window holds simulated traffic"}
    elif settings.monitor.retrain_on_drift:
        summary["retraining"] = trigger_retraining(settings, summary)
    return Completed(data=summary, name="Drift detected",
                     message=f"drift share {summary['drift_share']:.2f} > {summary['share_threshold']:.2f}")


def run(params: MonitoringParameters) -> dict[str, Any]:
    """Run the flow in this process (temporary Prefect server unless PREFECT_API_URL is set)."""
    return monitoring_flow(params)
