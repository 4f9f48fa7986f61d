"""Three ``xrayops run`` processes started at once in one tiny project (a schedule, a manual run
and a drift trigger overlapping): all finish, the dataset files are one consistent set, and
the registry holds each run's version once with every alias on a version that exists.

Each run is small (48 synthetic patients of 64x64 px, 1 epoch, no ONNX export, no drift
simulation), so the three take about 2-3 minutes together on 2 cores.

The first test: all three talk to one Prefect server (the test harness; scheduled and manual runs
share one in production too), and the project has been used before: its MLflow database exists.
The second: a fresh project and no Prefect server, as a first ``xrayops run`` on a new machine:
three processes create one SQLite MLflow database at once (MLflow's first-open migrations raced
and crashed two of three: now created under a lock, see :func:`pipeline.tracking.ensure_sqlite_store`),
and each starts its own temporary Prefect server on the project's Prefect database
(``<home>/prefect/prefect.db``), whose migrations Prefect runs in ``BEGIN IMMEDIATE`` transactions
(18 of 18 processes started that way at once finished in a repro). Faults the first test found
and that are fixed: concurrent ``mlflow.log_input`` of one dataset (MLflow's SQL store UNIQUE race:
retried in training) and concurrent validations writing one Great Expectations context (validate
and split now hold the dataset lock).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from pipeline.config import Settings, load_settings
from pipeline.registry.contract import VersionRecord
from tests.conftest import TINY, init_git_dvc, write_params

pytestmark = pytest.mark.slow

RUNS = 3
LENIENT_GATE = ["promote.min_auc=0", "promote.sensitivity_ci_floor=0", "promote.max_ece=1"]
SMALL = ["train.epochs=1", "promote.export_onnx=false", "evaluate.bootstrap_resamples=50"]


def test_three_runs_started_at_once_keep_data_and_registry_consistent(prefect_harness: None, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    init_git_dvc(tmp_path)
    params = write_params(tmp_path, [*TINY, *LENIENT_GATE, *SMALL])
    settings = load_settings(params)
    MlflowClient(tracking_uri=settings.tracking_uri).search_experiments()  # the database exists (see above)
    wall, summaries = run_at_once(tmp_path, params, {"PREFECT_API_URL": PREFECT_API_URL.value()})
    assert_data_consistent(settings, summaries)
    assert_registry_consistent(settings, summaries)
    print(f"{RUNS} concurrent runs: {wall:.0f} s wall, all finished")


def test_three_runs_started_at_once_in_a_fresh_project_without_a_prefect_server(tmp_path: Path) -> None:
    """No MLflow database, no Prefect server or database: each run creates what it needs, and all finish."""
    init_git_dvc(tmp_path)
    params = write_params(tmp_path, [*TINY, *LENIENT_GATE, *SMALL])
    settings = load_settings(params)
    db = Path(settings.tracking_uri.removeprefix("sqlite:///"))
    assert settings.tracking_uri.startswith("sqlite:///") and not db.exists()
    assert not settings.prefect_home.exists()
    wall, summaries = run_at_once(tmp_path, params, {})  # no PREFECT_API_URL: temporary servers
    assert (settings.prefect_home / "prefect.db").is_file()  # the project's Prefect home, not the user's
    assert_data_consistent(settings, summaries)
    assert_registry_consistent(settings, summaries)
    print(f"{RUNS} concurrent runs in a fresh project, no Prefect server: {wall:.0f} s wall, all finished")


#: lines tools print on their own that a run must not show (DVC's git hint, printed raw and again through our
#: log; MLflow's missing-pip warning)
RAW_TOOL_OUTPUT = ("To track the changes with git", "Failed to resolve installed pip version")


def run_at_once(root: Path, params: Path, extra_env: dict[str, str]) -> tuple[float, list[dict]]:
    """Start :data:`RUNS` ``xrayops run`` processes at once in ``root``; all must exit 0. Returns the wall
    time and their run summaries. Prefect and MLflow settings come only from ``params`` and ``extra_env``."""
    xrayops = Path(sys.executable).with_name("xrayops")
    dropped = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILES_PATH",
               "PREFECT_API_DATABASE_CONNECTION_URL")
    env = {**{k: v for k, v in os.environ.items() if k not in dropped},
           "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", "COLUMNS": "400", **extra_env}
    began = time.monotonic()
    procs = []
    for i in range(RUNS):
        log = open(root / f"run{i}.log", "w")  # closed below, after the process ends
        procs.append((subprocess.Popen([str(xrayops), "run", "--params", str(params), "--no-simulate",
                                        "--summary", str(root / f"summary{i}.json")],
                                       cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait(timeout=600)
        log.close()
    wall = time.monotonic() - began
    logs = [" ".join((root / f"run{i}.log").read_text().split()) for i in range(RUNS)]  # unwrapped
    failed = {i: log[-3000:] for i, ((proc, _), log) in enumerate(zip(procs, logs, strict=True)) if proc.returncode}
    assert not failed, failed  # all three finish (overlapping stages take turns on the dataset lock)
    raw = {hint for hint in RAW_TOOL_OUTPUT for log in logs if hint in log}
    assert not raw, f"a tool's raw console output in the run's output: {raw}"
    return wall, [json.loads((root / f"summary{i}.json").read_text()) for i in range(RUNS)]


def assert_data_consistent(settings: Settings, summaries: list[dict]) -> None:
    """The dataset files on disk are one consistent set, and every finished run saw that dataset."""
    dataset = settings.dataset_dir
    on_disk = json.loads((dataset / "ingest_summary.json").read_text())
    manifest = pq.read_table(dataset / "manifest.parquet").to_pandas()
    quarantine = list(csv.DictReader(open(dataset / "quarantine.csv")))
    assert on_disk["ingested"] == len(manifest) > 0 and on_disk["quarantined"] == len(quarantine)
    assert on_disk["manifest_sha256"] == hashlib.sha256((dataset / "manifest.parquet").read_bytes()).hexdigest()
    assert all((dataset / p).is_file() for p in manifest["path"])
    assert not [p for p in dataset.rglob("*.tmp")], "temporary files left behind"
    for s in summaries:
        assert s["data"]["ingested"] == on_disk["ingested"] and s["data"]["dvc_md5"] == on_disk["dvc_md5"]


def assert_registry_consistent(settings: Settings, summaries: list[dict]) -> None:
    """One version per finished run, each registered once and gated; aliases on versions that exist; the
    champion passed its gate, and the previous-champion chain links each champion to the one it was gated
    against, back to the first (gated against no champion)."""
    # both URIs explicitly: an earlier test's mlflow.set_registry_uri leaves MLFLOW_REGISTRY_URI in the environment
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    versions = client.search_model_versions(f"name='{settings.registered_model}'")
    run_ids = [v.run_id for v in versions]
    assert len(set(run_ids)) == len(run_ids), "a run registered twice"
    assert {s["train"]["run_id"] for s in summaries} <= set(run_ids)
    assert len({s["registry"]["version"] for s in summaries}) == len(summaries)
    # versions and alias targets as strings: the SQL store gives ints, the tags (previous_champion_version) strings
    aliases = {a: str(v) for a, v in client.get_registered_model(settings.registered_model).aliases.items()}
    records = {str(v.version): VersionRecord.from_version(v) for v in versions}
    assert "champion" in aliases and set(aliases.values()) <= set(records)
    assert all(r.gate is not None for r in records.values()), "a version without a gate decision"
    champion = client.get_model_version(settings.registered_model, aliases["champion"])
    assert champion.tags.get("gate_verdict") == "pass"
    links, version = [], aliases["champion"]
    while version is not None:
        assert version not in links, f"the previous-champion chain loops: {links}"
        links.append(version)
        version = records[version].champion.previous_version
    for newer, older in zip(links, [*links[1:], None], strict=True):
        assert records[newer].gate.passed and records[newer].gate.champion == older, (newer, records[newer].gate)
    assert aliases.get("previous-champion") == (links[1] if len(links) > 1 else None)
