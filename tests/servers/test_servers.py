"""Production shape on real servers: PostgreSQL, an MLflow tracking server backed by it, a Prefect server
backed by it. ``xrayops deploy`` applies the scheduled deployments, a ``xrayops worker`` process worker runs
a training run triggered with custom parameters through the API (what the UI's "Custom run" does), and the
registered version and its aliases are read back from the Postgres-backed MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import TINY, init_git_dvc, write_params
from tests.servers.processes import (
    Group,
    Postgres,
    http_ok,
    kill_processes_with_env,
    postgres_bin_dir,
    start,
    start_mlflow,
    start_postgres,
    start_prefect,
    wait_until,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
XRAYOPS = str(Path(sys.executable).parent / "xrayops")
TZ = "Europe/Paris"
LENIENT_GATE = ["promote.min_auc=0", "promote.sensitivity_ci_floor=0", "promote.max_ece=1"]
REGISTRY_LIMIT = "registry-write"  # an MLflow server is a shared registry: alias moves need this Prefect limit


@dataclass
class Stack:
    postgres: Postgres
    mlflow_url: str
    prefect_api: str
    root: Path
    groups: list[Group]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL + MLflow server (Postgres backend, local artifact root) + Prefect server (Postgres)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed: run "
                    "`bash infra/scripts/ensure-postgres.sh` (CI does) to run the real-server tests")
    root = tmp_path_factory.mktemp("stack")
    groups: list[Group] = []
    pg = None
    try:
        pg = start_postgres(bin_dir, root)
        groups.append(pg.group)
        pg.create_database("mlflow")
        pg.create_database("prefect")
        mlflow_url, mlflow_group = start_mlflow(pg.url("mlflow"), root / "mlflow-artifacts", root)
        prefect_api, prefect_group = start_prefect(pg.url("prefect", "asyncpg"), root / "prefect-server-home", root)
        groups += [mlflow_group, prefect_group]
        wait_until(http_ok(f"{mlflow_url}/health"), mlflow_group, 240, "healthy /health")
        wait_until(http_ok(f"{prefect_api}/health"), prefect_group, 240, "healthy /api/health")
        yield Stack(pg, mlflow_url, prefect_api, root, groups)
    finally:
        for group in reversed(groups):
            group.stop()
        if pg is not None:
            pg.stop()
        leftovers = [g.name for g in groups if g.alive()]
        assert not leftovers, f"processes left running: {leftovers}"


def cron_times() -> tuple[str, str]:
    """A weekly and a daily cron that cannot fire during the test (≥ 2 days / ~12 h away)."""
    now = datetime.now(ZoneInfo(TZ))
    weekly_day = (now + timedelta(days=3)).isoweekday() % 7
    return f"0 2 * * {weekly_day}", f"15 {(now.hour + 12) % 24} * * *"


def make_project(root: Path, mlflow_url: str, training_cron: str, monitoring_cron: str) -> Path:
    """A tiny git + DVC project whose MLflow is the real server."""
    params = write_params(root, [*TINY, *LENIENT_GATE, f"paths.mlflow_tracking_uri={mlflow_url}",
                                 f"orchestrate.timezone={TZ}", f"orchestrate.training_cron='{training_cron}'",
                                 f"orchestrate.monitoring_cron='{monitoring_cron}'", "orchestrate.task_retries=1",
                                 "promote.export_onnx=false", f"promote.registry_write_limit={REGISTRY_LIMIT}"])
    init_git_dvc(root)
    return params


def cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([XRAYOPS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"xrayops {' '.join(args)} → {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def scheduled_runs(client: Any, deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.auto_scheduled and r.state and r.state.is_scheduled()]


def wait_for_scheduled(client: Any, deployment_id: Any, timeout_s: float = 60) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = scheduled_runs(client, deployment_id)
        if runs:
            return runs
        time.sleep(1)
    raise AssertionError(f"the scheduler created no run for deployment {deployment_id} in {timeout_s} s")


def test_deploy_schedule_and_ui_triggered_training_on_real_servers(stack: Stack, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t0 = time.monotonic()
    training_cron, monitoring_cron = cron_times()
    project = tmp_path / "project"
    project.mkdir()
    params = make_project(project, stack.mlflow_url, training_cron, monitoring_cron)
    env = {**os.environ, "PREFECT_API_URL": stack.prefect_api, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "XRAYOPS_PSEUDONYM_SALT": "test-salt-not-secret-0123456789abcdef"}
    env.pop("XRAYOPS_PARAMS", None)  # the deployment's job variables must carry it

    # 1. xrayops deploy: work pool + scheduled deployments from the project folder
    out = cli(["deploy", "--params", str(params)], env, cwd=project, timeout=120)
    assert "xrayops-training/training" in out.stdout and training_cron in out.stdout
    with temporary_settings({PREFECT_API_URL: stack.prefect_api}), get_client(sync_client=True) as client:
        # deploy created the registry's alias-move limit (promote.registry_write_limit), one slot
        assert client.read_global_concurrency_limit_by_name(REGISTRY_LIMIT).limit == 1
        pool = client.read_work_pool("xrayops-process")
        assert pool.type == "process"
        deployment = client.read_deployment_by_name("xrayops-training/training")
        assert deployment.work_pool_name == "xrayops-process"
        assert deployment.job_variables["env"]["XRAYOPS_PARAMS"] == str(params)
        assert deployment.entrypoint == "flows/training.py:training_flow"
        assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [(training_cron, TZ)]
        # the UI form: one "params" object with titled, described fields
        form = deployment.parameter_openapi_schema["definitions"]["TrainingParameters"]["properties"]
        assert form["epochs"]["title"] == "Epochs" and form["model"]["description"]

        # 2. the real server's scheduler turns the cron into scheduled runs at 02:00 Paris time
        runs = wait_for_scheduled(client, deployment.id)
        first = min(r.expected_start_time for r in runs).astimezone(ZoneInfo(TZ))
        assert (first.hour, first.minute, first.isoweekday() % 7) == (2, 0, int(training_cron.split()[-1]))
        monitoring = _monitoring_deployment(client)
        if monitoring is not None:
            assert [s.schedule.cron for s in monitoring.schedules] == [monitoring_cron]
            wait_for_scheduled(client, monitoring.id)
    t_deployed = time.monotonic() - t0

    # 3. a process worker on the pool + a run with custom parameters through the API, waited for
    worker = start("worker", [XRAYOPS, "worker"], stack.root, env, cwd=project)
    try:
        out = cli(["trigger", "training", "--param", "epochs=1", "--param", "simulate_production=false",
                   "--set", "train.batch_size=8", "--wait", "--timeout", "300"], env, cwd=project, timeout=330)
        run = json.loads(out.stdout)
    except BaseException:
        print(worker.tail(80))
        raise
    finally:
        worker.stop()
        orphans = kill_processes_with_env("PREFECT_API_URL", stack.prefect_api)  # flow runs get their own group
    assert not worker.alive() and not orphans, f"left running: flow-run processes {orphans}"
    assert run["state"] == "Completed", run
    assert run["parameters"] == {"params": {"epochs": 1, "simulate_production": False,
                                            "overrides": ["train.batch_size=8"]}}
    t_run = time.monotonic() - t0 - t_deployed

    # 4. the Postgres-backed MLflow server holds the registered version, its aliases and the run's params
    client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)  # not a global set earlier
    model = client.get_registered_model("xrayops-synthetic")
    assert model.aliases == {"champion": "1", "challenger": "1"}
    version = client.get_model_version("xrayops-synthetic", "1")
    assert version.tags["gate_verdict"] == "pass" and version.tags["dvc_md5"].endswith(".dir")
    run_params = client.get_run(version.run_id).data.params
    assert run_params["train.epochs"] == "1" and run_params["train.batch_size"] == "8"
    # artifacts were uploaded through the server (proxied) into its artifact root, not to the worker's disk
    assert any((stack.root / "mlflow-artifacts").rglob("MLmodel")), "no model artifacts in the server's store"
    with stack.postgres.connect("mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias",
                    ("xrayops-synthetic",))
        assert cur.fetchall() == [("challenger", 1), ("champion", 1)]

    # 5. the run published its summary artifact with links into the MLflow UI
    with temporary_settings({PREFECT_API_URL: stack.prefect_api}), get_client(sync_client=True) as pclient:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        arts = pclient.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-summary"])))
        summary = [a for a in arts if str(a.flow_run_id) == run["flow_run_id"]]
        assert summary and f"{stack.mlflow_url}/#/experiments/" in str(summary[0].data)
    print(f"\nreal-server test: deploy+schedule {t_deployed:.1f} s, triggered run {t_run:.1f} s")


def _monitoring_deployment(client: Any) -> Any:
    """The monitoring deployment: required once flows/monitoring.py exists."""
    if not (REPO / "flows" / "monitoring.py").is_file():
        return None
    return client.read_deployment_by_name("xrayops-monitoring/monitoring")
