"""First open of a fresh local SQLite MLflow store by several processes at once (runs started together
in a new project): the schema is created once, under a lock beside the database, and every process
opens it. Without that lock MLflow's own first-open migrations race: two of three processes crashed
("table latest_metrics already exists", "duplicate column name: step", alembic "expected to match
one row").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_settings
from pipeline.errors import RegistryBusy
from pipeline.locking import file_lock
from pipeline.tracking import INIT_LOCK_NAME, ensure_sqlite_store
from tests.conftest import REPO, write_params

PROCESSES = 3

# imports first (seconds), then a ready file; all open the store together once the parent says go
CHILD = """
import sys, time
from pathlib import Path
import mlflow.store.model_registry.sqlalchemy_store
import mlflow.store.tracking.sqlalchemy_store
from mlflow import MlflowClient
from pipeline.config import load_settings
from pipeline.tracking import mlflow_client
settings = load_settings(Path(sys.argv[1]))
Path(sys.argv[2]).touch()
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
client = mlflow_client(settings)
client.search_experiments()
client.search_registered_models()
client.create_experiment(f"exp-{sys.argv[4]}")
"""


@pytest.mark.slow
def test_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    params = write_params(tmp_path)
    settings = load_settings(params)
    db = Path(settings.tracking_uri.removeprefix("sqlite:///"))
    assert settings.tracking_uri.startswith("sqlite:///") and not db.exists()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(params), str(tmp_path / f"ready{i}"), str(go), str(i)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(PROCESSES)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(PROCESSES)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a child died while importing"
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    failed = {i: [line for line in out.splitlines() if "Error" in line][-2:] or out[-500:]
              for i, (p, out) in enumerate(zip(procs, outputs, strict=True)) if p.returncode}
    assert not failed, failed
    from mlflow import MlflowClient

    names = {e.name for e in MlflowClient(tracking_uri=settings.tracking_uri).search_experiments()}
    assert {f"exp-{i}" for i in range(PROCESSES)} <= names
    assert (db.parent / INIT_LOCK_NAME).exists()


@pytest.mark.slow
def test_schema_creation_waits_for_the_lock_and_names_it_when_the_wait_runs_out(tmp_path: Path) -> None:
    db = tmp_path / "mlruns" / "mlflow.db"
    uri = f"sqlite:///{db}"
    lock = db.parent / INIT_LOCK_NAME
    with file_lock(lock, what="a test holding it", timeout_s=1, setting="-", reentrant=False):
        with pytest.raises(RegistryBusy, match="creation of the MLflow database") as err:
            ensure_sqlite_store(uri, timeout_s=0.3)
    assert "promote.registry_lock_timeout_s" in err.value.hint and str(lock) in str(err.value)
    assert not db.exists() or db.stat().st_size == 0  # nothing created without the lock
    ensure_sqlite_store(uri, timeout_s=5)  # lock free: creates the schema
    from mlflow import MlflowClient

    assert [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()] == ["Default"]

