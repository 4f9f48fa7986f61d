"""The monitoring flow in Prefect's test harness on real production batches scored by the champion:
drift only on the shifted batch, reports on disk and in MLflow, alert event, retraining trigger,
and a clear not-enough-data result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evidently.ui.workspace import Workspace
from mlflow import MlflowClient

from pipeline.config import Settings, with_overrides
from pipeline.serving.production_log import LogWriter
from tests.serving.helpers import png

pytestmark = pytest.mark.slow


def log_batch(settings: Settings, n: int, *, shift: float, seed: int) -> None:
    """Score ``n`` new-patient images through the serving path and log them."""
    from pipeline.serving.model_store import ModelStore
    from pipeline.serving.service import InferenceService

    store = ModelStore(settings)
    store.refresh()
    writer = LogWriter(settings.production_log, flush_s=3600)
    service = InferenceService(settings, store, writer)
    for i in range(n):
        service.predict(png(i, shift=shift, seed=seed, positive=i % 3 == 0), source="test")
    writer.flush()


def test_drift_flow_flags_only_the_shifted_batch(prefect_harness: None, champion_project: Settings,
                                                 tmp_path: Path) -> None:
    from flows.monitoring import MonitoringParameters, monitoring_flow

    overrides = [f"paths.production_log={tmp_path / 'log'}", f"paths.reports_dir={tmp_path / 'reports'}",
                 "monitor.min_rows=20", "monitor.drift_share_threshold=0.3"]
    settings = with_overrides(champion_project, overrides)
    params = {"params_path": str(champion_project.root / "params.yaml"), "overrides": overrides}

    # not enough data yet: a clear result, no report
    log_batch(settings, 6, shift=0.0, seed=901)
    few = monitoring_flow(MonitoringParameters(**params, last_k=60))
    assert few["status"] == "insufficient_data" and few["drift_share"] is None and not few["drift_detected"]
    assert "not enough data" in few["message"] and not list((tmp_path / "reports").rglob("report.html"))

    # an unshifted batch (new patients, same scanner): no drift
    log_batch(settings, 60, shift=0.0, seed=777)
    state = monitoring_flow(MonitoringParameters(**params, last_k=60), return_state=True)
    calm = state.result()
    assert state.name == "Completed" and calm["status"] == "ok" and calm["current_rows"] == 60
    assert not calm["drift_detected"] and calm["drift_share"] <= 0.3, calm["drifted_columns"]
    label_free = calm["label_free"]  # the champion's reference profile logs y_true of its validation rows
    assert label_free["cbpe"]["status"] == label_free["bbse"]["status"] == "ok", label_free["bbse"]
    assert label_free["embedding_mmd"]["columns"] == [f"emb_pc{i}" for i in range(1, 5)]
    assert label_free["cbpe"]["reference"]["rows"] == label_free["bbse"]["reference"]["rows"] > 0
    html = Path(calm["report_html"])
    assert html.is_file() and html.parent.parent == tmp_path / "reports" / "drift"
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run = client.get_run(calm["mlflow_run_id"])
    assert run.data.tags["model_version"] == "1" and run.data.tags["drift_detected"] == "false"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "drift")} >= {"drift/report.html",
                                                                                "drift/summary.json"}
    assert client.get_experiment(run.info.experiment_id).name == f"{settings.experiment_name}/monitoring"

    # a shifted batch (another scanner/protocol): drift, alert, retraining requested but no deployment yet
    log_batch(settings, 60, shift=1.0, seed=778)
    state = monitoring_flow(MonitoringParameters(**params, last_k=60, retrain_on_drift=True), return_state=True)
    drift = state.result()
    assert state.name == "Drift detected" and drift["drift_detected"] and drift["drift_share"] > 0.3
    assert {"mean", "p50", "p95"} <= set(drift["drifted_columns"]) and drift["top_drifted"]
    assert {f"emb_pc{i}" for i in range(1, 5)} <= set(drift["columns"]), "embedding PCs are monitored"
    assert drift["alert"]["event"] == "xrayops.drift.detected" and drift["alert"]["event_id"]
    assert drift["retraining"] == {"triggered": False, "deployment": settings.monitor.training_deployment,
                                   "reason": "deployment not found"}
    assert client.get_run(drift["mlflow_run_id"]).data.tags["drift_detected"] == "true"
    # each run is a snapshot of the model's Evidently workspace project (the timeline of `xrayops monitor ui`)
    saved = json.loads((Path(drift["report_dir"]) / "summary.json").read_text())["workspace"]
    assert saved == drift["workspace"] and Path(saved["path"]) == settings.home / "evidently-workspace"
    runs = {s["workspace"]["snapshot_id"] for s in (few, calm, drift)}
    assert runs <= set(map(str, Workspace(saved["path"]).list_runs(saved["project_id"]))) and len(runs) == 3

    # with a training deployment registered, drift starts a run of it
    from prefect.client.orchestration import get_client

    flow_name, deployment_name = settings.monitor.training_deployment.split("/")
    with get_client(sync_client=True) as prefect:
        deployment_id = prefect.create_deployment(prefect.create_flow_from_name(flow_name), deployment_name)
        again = monitoring_flow(MonitoringParameters(**params, last_k=60, retrain_on_drift=True))
        assert again["retraining"]["triggered"]
        triggered = prefect.read_flow_run(again["retraining"]["flow_run_id"])
        assert triggered.deployment_id == deployment_id and "drift-triggered" in triggered.tags
        prefect.delete_deployment(deployment_id)
