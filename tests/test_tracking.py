"""Credentials in URI settings never reach MLflow params/tags, log lines, the run summary or what is printed."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.tracking import loggable_params, mask_secrets

SECRET = "s3cr3t-Pa55"
# every setting that holds a URI, each with a password in it (the tracking URI stays usable where MLflow is used)
URI_SETTINGS = [f"paths.mlflow_registry_uri=postgresql+psycopg2://mlflow:{SECRET}@db:5432/mlflow",
                f"paths.mlflow_artifact_root=s3://AKIAEXAMPLE:{SECRET}@minio:9000/mlflow",
                f"paths.dvc_remote=https://dvc:{SECRET}@dvc.example.com/store",
                f"data.repo=https://git:{SECRET}@git.example.com/data.git",
                f"orchestrate.dask_address=tcp://dask:{SECRET}@scheduler:8786"]
TRACKING = f"paths.mlflow_tracking_uri=http://alice:{SECRET}@mlflow.example.com:5000"


def test_loggable_params_mask_every_uri_setting(make_settings: Callable[..., Settings]) -> None:
    params = loggable_params(make_settings(*URI_SETTINGS, TRACKING))
    assert SECRET not in json.dumps(params)
    assert params["paths.mlflow_tracking_uri"] == "http://alice:***@mlflow.example.com:5000"
    assert params["paths.dvc_remote"] == "https://dvc:***@dvc.example.com/store"
    assert params["paths.mlflow_registry_uri"] == "postgresql+psycopg2://mlflow:***@db:5432/mlflow"
    assert params["train.epochs"] == "2" and params["data.labels"] == ""  # everything else as before
    assert mask_secrets({"a": [f"http://u:{SECRET}@h", 1, ("x", None)]}) == {"a": ["http://u:***@h", 1, ("x", None)]}


@pytest.mark.slow
def test_training_run_record_holds_no_password(make_settings: Callable[..., Settings], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """The params, tags and dataset inputs the training stage logs, in a real MLflow run (temp SQLite)."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.training.inputs import InputSpec
    from pipeline.training.train import _log_run_inputs

    settings = make_settings(*URI_SETTINGS)
    mlflow.set_tracking_uri(settings.tracking_uri)  # sqlite under tmp_path: the tracking store stays local
    exp = MlflowClient(settings.tracking_uri).create_experiment("masking", artifact_location=tmp_path.as_uri())
    frame = pd.DataFrame({"image_id": ["a", "b"], "label": ["NORMAL", "PNEUMONIA"]})
    dataset = {"name": "synthetic", "dvc_md5": "abc.dir", "dvc_rev": "v1", "manifest_sha256": "m",
               "split_certificate": "c"}
    hardware = {"kind": "cpu", "replicas": 1, "mixed_precision": False}
    with caplog.at_level(logging.DEBUG), mlflow.start_run(experiment_id=exp) as run:
        _log_run_inputs(settings, frame, frame, dataset, hardware, InputSpec(32, 1, 2), ["NORMAL", "PNEUMONIA"])
    record = MlflowClient(settings.tracking_uri).get_run(run.info.run_id)
    logged = json.dumps({"params": record.data.params, "tags": record.data.tags,
                         "inputs": [[(t.key, t.value) for t in i.tags] for i in record.inputs.dataset_inputs]})
    assert SECRET not in logged and SECRET not in caplog.text
    assert record.data.params["data.repo"] == "https://git:***@git.example.com/data.git"


def test_run_summary_and_what_is_printed_hold_no_password(make_settings: Callable[..., Settings],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from flows.training import summary_markdown
    from pipeline import cli
    from pipeline.job import run_summary

    settings = make_settings(*URI_SETTINGS, TRACKING)
    # the registry read is the one call to the (unreachable, password-protected) server: answer it here
    monkeypatch.setattr("pipeline.registry.read.aliases", lambda s: {"champion": "1"})
    trained = SimpleNamespace(model_name="xray_cnn", run_id="r1", experiment_id="7", epochs_run=2, seconds=1.0,
                              hardware={"kind": "cpu"})
    evaluation = SimpleNamespace(metrics={"auc": 0.9}, ci={}, operating_point={"threshold": 0.5})
    summary = run_summary(
        settings, started=datetime.now(UTC),
        ingest={"files_seen": 3, "ingested": 3, "quarantined": 0, "patients": 2, "dvc": {"dvc_md5": "m", "rev": "v"}},
        validation={"critical_failures": [], "data_docs": None},
        certificate={"images": 3, "patients": 2, "patient_overlap": 0, "certificate_sha256": "c"},
        trained=trained, evaluation=evaluation, version=SimpleNamespace(version=1),
        decision=SimpleNamespace(promote=True, reason="ok", failed=[], inputs={}), promotion={"promoted": True},
        drift=None)
    assert summary["tracking_uri"] == "http://alice:***@mlflow.example.com:5000"
    assert "--backend-store-uri http://alice:***@mlflow.example.com:5000" in summary["mlflow_ui"]
    assert SECRET not in json.dumps(summary)
    cli._print_summary(summary)
    assert SECRET not in capsys.readouterr().out
    markdown = summary_markdown(summary)
    assert SECRET not in markdown and "alice" not in markdown  # links never carry credentials
    assert "(http://mlflow.example.com:5000/#/experiments/7/runs/r1)" in markdown
