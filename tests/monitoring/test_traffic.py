"""Real traffic only: simulated rows have their own log, monitoring of the production log never
compares them (nor raises alerts or retrains on them), no rows yet is a clear no-data result, and
a damaged log part is skipped and counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Settings, with_overrides
from pipeline.errors import ConfigError
from pipeline.monitoring.drift import current_window, drift_report, summary_markdown
from pipeline.serving import production_log
from tests.conftest import TINY
from tests.serving.test_production_log import corrupt


def log_rows(settings: Settings, source: str, n: int, *, minutes_ago: float = 30, version: str = "1") -> pd.DataFrame:
    """Production-log rows of ``source`` for the registered model, one per second from ``minutes_ago``."""
    start = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    rng = np.random.default_rng(len(source) + n)
    return pd.DataFrame({"request_id": [uuid.uuid4().hex for _ in range(n)],
                         "request_time": [start + timedelta(seconds=i) for i in range(n)], "source": source,
                         "model_name": settings.registered_model, "model_version": version,
                         "mean": rng.uniform(0.3, 0.6, n), "probability": rng.uniform(0, 1, n)})


def test_monitoring_compares_real_traffic_only(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    for minutes, (source, n) in enumerate([("api", 5), ("ui", 3), ("simulation", 7), ("pacs", 2)]):
        production_log.append(settings.production_log, log_rows(settings, source, n, minutes_ago=40 - minutes))
    production_log.append(settings.simulation_log, log_rows(settings, "simulation", 11, minutes_ago=10))
    assert settings.simulation_log.parent == settings.production_log.parent == settings.home

    rows, info = current_window(settings, "1", last_k=100)
    assert len(rows) == 10 and "simulation" not in set(rows["source"])
    assert info["rows_by_source"] == {"api": 5, "pacs": 2, "ui": 3} and info["traffic"] == "production"
    assert info["excluded_simulated_rows"] == 7, "simulated rows an older version wrote to the real log are left out"
    newest, _ = current_window(settings, "1", last_k=4)
    assert list(newest["source"]) == ["ui", "ui", "pacs", "pacs"], "the newest real rows, simulated ones not counted"

    demo, demo_info = current_window(settings, "1", last_k=100, traffic="simulation")
    assert len(demo) == 11 and demo_info["rows_by_source"] == {"simulation": 11}
    assert demo_info["rejected_share"] is None

    opted_in = with_overrides(settings, ["monitor.include_simulation=true"])
    both, both_info = current_window(opted_in, "1", last_k=100)
    assert len(both) == 21 and both_info["rows_by_source"] == {"api": 5, "pacs": 2, "simulation": 11, "ui": 3}
    assert both_info["traffic"] == "production+simulation" and both["request_time"].is_monotonic_increasing
    assert len(current_window(opted_in, "1", last_k=12)[0]) == 12


def test_a_damaged_part_in_the_window_is_skipped_and_counted(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    for k in range(3):
        production_log.append(settings.production_log, log_rows(settings, "api", 10, minutes_ago=50 - 10 * k))
    bad = corrupt(settings.production_log)
    rows, info = current_window(settings, "1", last_k=100)
    assert len(rows) == 20 and info["skipped_parts"] == 2 and sorted(info["skipped_files"]) == sorted(map(str, bad))


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_the_simulation_log_must_be_apart_from_the_production_log(make_settings: Callable[..., Settings],
                                                                   tmp_path: Path, where: str) -> None:
    real = tmp_path / "log"
    simulated = {"same": real, "inside": real / "sim", "around": tmp_path}[where]
    settings = make_settings(f"paths.production_log={real}", f"paths.simulation_log={simulated}")
    with pytest.raises(ConfigError, match="must be apart from paths.production_log"):
        current_window(settings, "1", last_k=10, traffic="simulation")


def test_no_rows_is_no_data_not_an_error_nor_an_alert(tmp_path: Path) -> None:
    reference = pd.DataFrame({"mean": np.linspace(0, 1, 50), "probability": np.linspace(0, 1, 50)})
    summary = drift_report(reference, pd.DataFrame(), tmp_path, share_threshold=0.3, min_rows=20,
                           context={"window": "last 1000 predictions", "traffic": "production"})
    assert summary["status"] == "no_data" and summary["current_rows"] == 0 and not summary["drift_detected"]
    assert "no production data yet" in summary["message"] and "last 1000 predictions" in summary["message"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "no_data"
    assert not (tmp_path / "report.html").exists()
    assert "No data yet" in summary_markdown({**summary, "skipped_parts": 1})


# --------------------------------------------------------------------------- with a trained champion


def isolated(settings: Settings, tmp_path: Path, *extra: str) -> tuple[Settings, list[str]]:
    """The champion project with its own logs and reports under ``tmp_path``."""
    overrides = [f"paths.production_log={tmp_path / 'log'}", f"paths.simulation_log={tmp_path / 'sim'}",
                 f"paths.reports_dir={tmp_path / 'reports'}", *extra]
    return with_overrides(settings, overrides), overrides


@pytest.mark.slow
def test_the_run_demo_never_writes_the_real_log(champion_project: Settings, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pipeline.job import simulate_and_report
    from pipeline.monitoring.drift import monitor_champion

    settings, _ = isolated(champion_project, tmp_path)
    demo = simulate_and_report(settings)
    rows = settings.monitor.simulate_rows
    assert demo["status"] == "ok" and demo["current_rows"] == rows and demo["traffic"] == "simulation"
    assert demo["rows_by_source"] == {"simulation": rows}
    assert production_log.count_rows(settings.simulation_log) == rows
    assert production_log.count_rows(settings.production_log) == 0 and not settings.production_log.exists()
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    assert client.get_run(demo["mlflow_run_id"]).data.tags["traffic"] == "simulation"

    real = monitor_champion(settings)
    assert real["status"] == "no_data" and real["current_rows"] == 0 and not real["drift_detected"]
    assert real["rows_by_source"] == {} and "no production data yet" in real["message"]
    assert client.get_run(real["mlflow_run_id"]).data.tags["traffic"] == "production"

    # real traffic arrives (three flushes); one part is damaged, one is garbage: the rest is compared
    served = production_log.read(settings.simulation_log).assign(source="api")
    chunks = [served.iloc[i::3] for i in range(3)]
    for chunk in chunks:
        production_log.append(settings.production_log, chunk.assign(request_id=[uuid.uuid4().hex for _ in chunk.index]))
    corrupt(settings.production_log)  # damages the first part written
    after = monitor_champion(settings)
    assert after["skipped_parts"] == 2 and after["status"] == "ok"
    assert after["current_rows"] == rows - len(chunks[0])
    assert after["rows_by_source"] == {"api": after["current_rows"]}


@pytest.mark.slow
def test_drift_on_simulated_traffic_never_retrains(prefect_harness: None, champion_project: Settings,
                                                   tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.monitoring import MonitoringParameters, monitoring_flow
    from pipeline.job import simulate_and_report

    strong = ["monitor.simulate_rows=80", "monitor.simulate_shifted_fraction=1.0", "monitor.simulate_shift=1.5"]
    settings, overrides = isolated(champion_project, tmp_path, *strong)
    demo = simulate_and_report(settings)
    assert demo["drift_detected"], "the simulated batch is shifted: the run's demo shows drift"
    params = {"params_path": str(champion_project.root / "params.yaml"), "overrides": overrides,
              "last_k": 80, "retrain_on_drift": True}
    flow_name, deployment_name = settings.monitor.training_deployment.split("/")
    with get_client(sync_client=True) as prefect:
        deployment_id = prefect.create_deployment(prefect.create_flow_from_name(flow_name), deployment_name)
        try:
            state = monitoring_flow(MonitoringParameters(**params), return_state=True)
            real = state.result()
            assert state.name == "Completed" and real["status"] == "no_data" and "retraining" not in real
            assert "alert" not in real
            opted = MonitoringParameters(**{**params, "overrides": [*overrides, "monitor.include_simulation=true"]})
            mixed = monitoring_flow(opted)
            assert mixed["drift_detected"] and mixed["rows_by_source"] == {"simulation": 80}
            assert mixed["retraining"]["triggered"] is False and "simulated" in mixed["retraining"]["reason"]
            runs = prefect.read_flow_runs()
            assert not [r for r in runs if r.deployment_id == deployment_id], "no training run was started"
        finally:
            prefect.delete_deployment(deployment_id)


@pytest.mark.slow
def test_a_plain_run_then_monitor_compares_zero_rows(prefect_harness: None, tmp_path: Path) -> None:
    """``xrayops run`` (simulation on) then ``xrayops monitor --summary``: 0 rows, no_data, exit 0."""
    from prefect.settings import PREFECT_API_URL

    from tests.conftest import write_params

    lenient = ["promote.min_auc=0", "promote.sensitivity_ci_floor=0", "promote.max_ece=1"]
    write_params(tmp_path, [*TINY, "data.version_with_dvc=false", *lenient])
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}

    def xrayops(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--params", str(tmp_path / "params.yaml")],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)

    run = xrayops("run", "--summary", str(tmp_path / "run.json"))
    assert run.returncode == 0, run.stdout + run.stderr
    drift = json.loads((tmp_path / "run.json").read_text())["drift"]
    assert set(drift) == {"status", "drift_share", "drift_detected", "drifted_columns", "current_rows"}
    assert drift["current_rows"] == 40, "the run's demo compares its simulated batch"
    monitor = xrayops("monitor", "--summary", str(tmp_path / "monitor.json"))
    assert monitor.returncode == 0, monitor.stdout + monitor.stderr
    summary = json.loads((tmp_path / "monitor.json").read_text())
    assert summary["current_rows"] == 0 and summary["status"] == "no_data" and summary["rows_by_source"] == {}
    assert summary["skipped_parts"] == 0 and not summary["drift_detected"]
    assert "No data yet" in monitor.stdout and "Traceback" not in monitor.stdout + monitor.stderr
    noise = ("absl::InitializeLog", "Could not find cuda drivers", "oneDNN custom operations",
             "Failed to resolve installed pip version")
    for command in (run, monitor):  # TensorFlow's CPU-host start-up noise and MLflow's missing-pip warning
        assert not [n for n in noise if n in command.stdout + command.stderr], command.stdout + command.stderr
