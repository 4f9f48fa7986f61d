"""Monitoring over time: each run adds a snapshot to the model's Evidently workspace project, whose dashboard
plots the run's values (read back the way the Evidently UI reads them); `xrayops monitor ui` serves it and
refuses a busy port."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.monitoring.drift import current_window, drift_report
from pipeline.monitoring.workspace import (
    PANEL_TITLES,
    SIMULATED_SUFFIX,
    add_run_snapshot,
    timeline_values,
    ui_env,
    workspace_dir,
)
from pipeline.serving import production_log
from tests.monitoring.test_drift_report import frame
from tests.monitoring.test_estimation import PI, THRESHOLD, labelled_window
from tests.monitoring.test_traffic import log_rows

FAST = ["monitor.estimation_resamples=40", "monitor.mmd_permutations=40", "monitor.mmd_max_rows=200"]


def monitoring_summary(settings: Settings, out: Path, *, shift: float, seed: int) -> dict[str, Any]:
    """One monitoring run on synthetic frames (labelled reference, label-free section), as summary.json has it."""
    reference = frame(300, 1)
    y_ref, p_ref = labelled_window(300, PI, seed=10)
    reference["probability"], reference["predicted_positive"] = p_ref, (p_ref >= THRESHOLD).astype(float)
    reference["y_true"] = np.where(np.arange(300) % 2 == 0, y_ref, np.nan)
    current = frame(200, seed, shift=shift)
    _, p = labelled_window(200, PI + 0.3 * shift, seed=seed + 10)
    current["probability"], current["predicted_positive"] = p, (p >= THRESHOLD).astype(float)
    context = {"model_name": settings.registered_model, "model_version": "3", "traffic": "production",
               "rejected_rows": 7 * seed, "rejected_share": round(7 * seed / (200 + 7 * seed), 4),
               "latency_p95_ms": 20.0 + seed}
    drift_report(reference, current, out, share_threshold=settings.monitor.drift_share_threshold,
                 min_rows=settings.monitor.min_rows, context=context,
                 label_free=(settings.monitor, settings.base.seed, 0.95))
    return json.loads((out / "summary.json").read_text())


def series_of(path: Path, project_id: Any, panel: Any) -> dict[str, list[float | None]]:
    """The series the Evidently UI computes for ``panel``, keyed by the series' column label."""
    from evidently.legacy.utils.sync import async_to_sync
    from evidently.ui.service.base import SeriesFilter
    from evidently.ui.service.storage.local.base import InMemoryDataStorage

    filters = [SeriesFilter(tags=v.tags, metadata=v.metadata, metric=v.metric, metric_labels=v.metric_labels)
               for v in panel.values]
    response = async_to_sync(InMemoryDataStorage(str(path)).get_data_series(project_id, filters, None, None))
    return {s.params["column"]: s.values for s in response.series}


@pytest.mark.slow
def test_two_runs_give_one_project_with_two_snapshots_and_the_dashboard(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    from evidently.ui.workspace import Workspace

    settings = make_settings(*FAST)
    path = workspace_dir(settings)
    assert path == settings.home / "evidently-workspace"
    summaries = [monitoring_summary(settings, tmp_path / f"run{i}", shift=shift, seed=2 + i)
                 for i, shift in enumerate((0.0, 1.0))]
    recorded = [add_run_snapshot(path, s, settings.monitor) for s in summaries]

    workspace = Workspace(str(path))
    projects = workspace.list_projects()
    assert [p.name for p in projects] == [settings.registered_model]
    project = projects[0]
    assert {str(s) for s in workspace.list_runs(project.id)} == {r["snapshot_id"] for r in recorded}
    dashboard = workspace.get_dashboard(project.id)
    assert [p.title for p in dashboard.panels] == PANEL_TITLES
    panels = {p.title: p for p in dashboard.panels}

    def plotted(title: str) -> dict[str, list[float | None]]:
        return series_of(path, project.id, panels[title])

    first, second = summaries
    drift = plotted("Drift share (input features)")
    assert drift["drift_share"] == [first["drift_share"], second["drift_share"]]
    assert drift["drift_share_threshold"] == [settings.monitor.drift_share_threshold] * 2
    assert not first["drift_detected"] and second["drift_detected"]
    cbpe = plotted("CBPE estimated AUC (label-free) with interval")
    for i, s in enumerate(summaries):
        est = s["label_free"]["cbpe"]
        plotted_auc = [cbpe[k][i] for k in ("cbpe_auc", "cbpe_auc_ci_low", "cbpe_auc_ci_high")]
        assert plotted_auc == [est["auc"], *est["ci"]["auc"]]
        assert cbpe["cbpe_auc_alert_floor"][i] == pytest.approx(
            est["reference"]["auc"] - settings.monitor.cbpe_auc_drop_alert)
    bbse = plotted("BBSE prevalence (label-free) with interval")
    assert bbse["bbse_prevalence"] == [s["label_free"]["bbse"]["prevalence"] for s in summaries]
    assert bbse["bbse_prevalence_ci_low"] == [s["label_free"]["bbse"]["ci"]["prevalence"][0] for s in summaries]
    ref_prev = first["label_free"]["bbse"]["reference"]["prevalence"]
    assert bbse["bbse_prevalence_alert_high"][0] == pytest.approx(ref_prev + settings.monitor.prevalence_change_alert)
    assert plotted("Input-gate rejection rate")["rejection_rate"] == [s["rejected_share"] for s in summaries]
    assert plotted("Latency p95 (ms)")["latency_p95_ms"] == [22.0, 23.0]
    volume = plotted("Request volume (window)")
    assert volume["requests"] == [s["current_rows"] + s["rejected_rows"] for s in summaries]
    assert plotted("Embedding drift: MMD p-value")["mmd_p_value"] == [
        s["label_free"]["embedding_mmd"]["p_value"] for s in summaries]

    features = plotted("Most drifted features (severity, 1 = drift threshold)")
    assert features["feature_drift_threshold"] == [1.0, 1.0]
    assert set(features) - {"feature_drift_threshold"} == set(second["columns"])
    for i, s in enumerate(summaries):  # above the threshold line exactly where the test failed
        assert {c for c in s["columns"] if features[c][i] > 1.0} == set(s["drifted_columns"])
    assert features[second["top_drifted"][0]][1] == max(features[c][1] for c in second["columns"]), "most drifted"

    # no PHI: only aggregate values, feature names and run metadata; no row-level data in the workspace
    stored = "".join(f.read_text() for f in path.rglob("*.json"))
    assert "request_id" not in stored and "patient" not in stored.lower()
    assert not list(path.rglob("*.parquet")), "no datasets uploaded"

    # the main job's simulated-traffic demo gets its own project: production's timeline never shows it
    assert first["traffic"] == "production"
    demo = add_run_snapshot(path, {**first, "traffic": "simulation"}, settings.monitor)
    workspace = Workspace(str(path))
    by_name = {p.name: p for p in workspace.list_projects()}
    assert set(by_name) == {settings.registered_model, settings.registered_model + SIMULATED_SUFFIX}
    assert {str(s) for s in workspace.list_runs(by_name[settings.registered_model].id)} == {
        r["snapshot_id"] for r in recorded}
    assert [str(s) for s in workspace.list_runs(by_name[settings.registered_model + SIMULATED_SUFFIX].id)] == [
        demo["snapshot_id"]]


def test_timeline_values_come_from_the_summary_and_skip_what_is_missing(
        make_settings: Callable[..., Settings]) -> None:
    cfg = make_settings().monitor
    no_data = {"status": "no_data", "current_rows": 0, "rejected_rows": 0, "rejected_share": None,
               "latency_p95_ms": None, "drift_share": None}
    assert timeline_values(no_data, cfg) == {"requests": 0.0, "predictions": 0.0, "rejected": 0.0}
    ok = {"status": "ok", "current_rows": 90, "rejected_rows": 10, "rejected_share": 0.1, "latency_p95_ms": 12.5,
          "drift_share": 0.25, "share_threshold": 0.3, "drifted_columns": ["mean"],
          "label_free": {"cbpe": {"status": "ok", "auc": 0.8, "ci": {"auc": [0.75, 0.85]},
                                  "reference": {"auc": 0.9}},
                         "bbse": {"status": "no_reference_labels"}, "embedding_mmd": {"status": "not_applicable"}}}
    values = timeline_values(ok, cfg)
    assert values["requests"] == 100 and values["rejection_rate"] == 0.1 and values["drift_share"] == 0.25
    assert values["cbpe_auc_alert_floor"] == pytest.approx(0.9 - cfg.cbpe_auc_drop_alert)
    assert not any(k.startswith(("bbse", "mmd")) for k in values)


def test_the_ui_process_runs_with_telemetry_off() -> None:
    assert ui_env({"PATH": "/bin"})["DO_NOT_TRACK"] == "1" and ui_env({"DO_NOT_TRACK": "0"})["DO_NOT_TRACK"] == "1"


def test_the_window_reports_latency_p95_of_logged_requests(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    rows = log_rows(settings, "api", 40).assign(latency_ms=np.arange(1.0, 41.0))
    production_log.append(settings.production_log, rows)
    _, info = current_window(settings, "1", last_k=100)
    assert info["latency_p95_ms"] == pytest.approx(np.quantile(np.arange(1.0, 41.0), 0.95), abs=0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def monitor_ui(settings: Settings, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "monitor", "ui", "--port", str(port),
                             "--params", str(settings.root / "params.yaml")], cwd=settings.root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.server
def test_monitor_ui_serves_the_workspace_and_refuses_a_busy_port(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    port = free_port()
    process = monitor_ui(settings, port)
    try:
        status, deadline = None, time.monotonic() + 60
        while status is None and time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    status = response.status
            except OSError:
                time.sleep(0.3)
        assert status == 200, process.stderr.read() if process.poll() is not None else "no answer"
        assert workspace_dir(settings).is_dir()

        busy = subprocess.run([sys.executable, "-m", "pipeline.cli", "monitor", "ui", "--port", str(port),
                               "--params", str(settings.root / "params.yaml")], cwd=settings.root, text=True,
                              capture_output=True, timeout=60)
        assert busy.returncode == 2 and "Traceback" not in busy.stderr
        error = [line for line in busy.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and f"127.0.0.1:{port}" in error[0] and "in use" in error[0], busy.stderr
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
