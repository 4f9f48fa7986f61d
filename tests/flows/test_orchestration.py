"""Pieces of the production shape that need no server: run parameters as the UI/CLI send them, schedule
validation, retry backoff, Dask shard sizes, settings from the environment, S3 locations by settings only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError


def training_schema() -> dict:
    from flows.training import training_flow

    return training_flow.parameters.model_dump()


def test_ui_form_schema_has_titled_described_fields() -> None:
    schema = training_schema()
    assert list(schema["properties"]) == ["params"] and "$ref" in schema["properties"]["params"]
    fields = schema["definitions"]["TrainingParameters"]["properties"]
    assert {"source", "rev", "model", "epochs", "require_approval", "overrides"} <= set(fields)
    assert all(f.get("title") and f.get("description") for f in fields.values())


def test_form_has_drop_downs_of_valid_names_and_no_null_switches() -> None:
    """Issue 18 item 4: source and model are enums from the source registry and the zoo; no field is an
    "X or null" union (the UI renders those as a type switcher); simulation is off unless asked for."""
    from pipeline.data.sources import SOURCES
    from pipeline.training.models import list_models

    schema = training_schema()
    fields = schema["definitions"]["TrainingParameters"]["properties"]
    assert fields["source"]["enum"] == list(SOURCES) and fields["source"]["type"] == "string"
    assert fields["model"]["enum"] == sorted(spec.name for spec in list_models())
    assert "xray_cnn" in fields["model"]["enum"] and "keras:mnist" in fields["source"]["enum"]
    switchers = [name for name, f in fields.items() if "anyOf" in f or "oneOf" in f or f.get("type") == "null"]
    assert not switchers, f"fields the UI shows as type switchers: {switchers}"
    assert all("type" in f for f in fields.values())
    assert fields["epochs"]["minimum"] == 1 and fields["simulate_production"]["default"] is False
    # unset fields have no default rather than a null one (null is not a value of their type)
    assert not [name for name, f in fields.items() if "default" in f and f["default"] is None]
    assert schema["properties"]["params"]["default"] == {"simulate_production": False, "overrides": []}


def test_form_rejects_names_outside_the_registries() -> None:
    from pydantic import ValidationError

    from flows.training import TrainingParameters

    TrainingParameters(source="sklearn:digits", model="lenet5")
    with pytest.raises(ValidationError, match="'synthetic'"):
        TrainingParameters(source="imagenet")
    with pytest.raises(ValidationError, match="'xray_cnn'"):
        TrainingParameters(model="gpt")


def test_deployment_form_shows_params_yaml_values_and_schedules_run_without_simulation(
        make_settings: Callable[..., Settings]) -> None:
    """The deployment's form defaults are the params.yaml values (what a run would use); scheduled runs get
    simulate_production=false and nothing else, so they keep reading params.yaml when they start."""
    from prefect.utilities.schema_tools import validate

    from flows.training import TrainingParameters, deployment_form

    settings = make_settings("train.model=vgg_small", "train.epochs=4", "data.source=sklearn:digits")
    parameters, form = deployment_form(settings, training_schema())
    assert parameters == {"params": {"simulate_production": False}}
    fields = form["definitions"]["TrainingParameters"]["properties"]
    assert (fields["source"]["default"], fields["model"]["default"], fields["epochs"]["default"]) == (
        "sklearn:digits", "vgg_small", 4)
    assert "default" not in fields["rev"] and "default" not in fields["params_path"]  # unset: a blank input
    shown = form["properties"]["params"]["default"]
    assert shown["model"] == "vgg_small" and shown["simulate_production"] is False
    assert None not in shown.values()
    # what the UI submits unchanged, and what a schedule sends, pass the server's validation of the schema
    assert not validate({"params": shown}, form) and not validate(parameters, form)
    assert validate({"params": {**shown, "model": "gpt"}}, form), "a name outside the zoo must not validate"
    # blank text inputs (the form may send "") count as unset
    run_settings = TrainingParameters(**{**shown, "rev": "", "input": "", "params_path": str(settings.root /
                                                                                           "params.yaml")}).settings()
    assert run_settings.data.rev is None and run_settings.train.model == "vgg_small"
    assert "default" not in training_schema()["definitions"]["TrainingParameters"]["properties"]["model"], \
        "the flow's own schema is not changed by building a deployment form"


def test_trigger_parameters_go_into_the_settings_model() -> None:
    from flows.trigger import build_parameters, deployment_name

    params = build_parameters(training_schema(), ["epochs=3", "model=vgg_small", "require_approval=true"],
                              ["train.batch_size=16"])
    assert params == {"params": {"epochs": 3, "model": "vgg_small", "require_approval": True,
                                 "overrides": ["train.batch_size=16"]}}
    from flows.training import TrainingParameters

    TrainingParameters.model_validate(params["params"])  # what the server validates against the schema
    # text fields get the text as typed (YAML would cut at '#' and read 1.10 as the float 1.1)
    params = build_parameters(training_schema(), ["input=/data/cxr #2", "rev=1.10", "model=vgg_small", "epochs=3",
                                                  "source=keras:mnist", "require_approval="], [])
    assert params == {"params": {"input": "/data/cxr #2", "rev": "1.10", "model": "vgg_small", "epochs": 3,
                                 "source": "keras:mnist"}}  # empty = unset (params.yaml), never null
    TrainingParameters.model_validate(params["params"])
    assert build_parameters(training_schema(), [], []) == {}
    assert build_parameters({"properties": {"a": {"type": "integer"}, "b": {}}}, ["a=1"], []) == {"a": 1}
    with pytest.raises(ValueError, match="name=value"):
        build_parameters(training_schema(), ["epochs"], [])
    assert deployment_name("training") == "xrayops-training/training"
    assert deployment_name("xrayops-monitoring") == "xrayops-monitoring/monitoring"
    assert deployment_name("a/b") == "a/b"


def test_form_values_reach_the_settings_typed(make_settings: Callable[..., Settings]) -> None:
    """UI form fields are typed values: a '#' in a folder or a rev like 1.10 is not re-read as YAML."""
    from flows.training import TrainingParameters

    path = str(make_settings().root / "params.yaml")
    settings = TrainingParameters(input="/data/cxr #2", rev="1.10", model="vgg_small", epochs=3,
                                  require_approval=True, params_path=path).settings()
    assert settings.data.input == "/data/cxr #2" and settings.data.rev == "1.10"
    assert settings.train.model == "vgg_small" and settings.train.epochs == 3 and settings.promote.require_approval
    # free-form overrides keep the --set meaning (YAML) and still win over the form fields
    settings = TrainingParameters(epochs=3, overrides=["train.epochs=5", "train.batch_size=16"],
                                  params_path=path).settings()
    assert settings.train.epochs == 5 and settings.train.batch_size == 16
    with pytest.raises(ConfigError, match="train.model: Input should be a valid string"):
        TrainingParameters(params_path=path, overrides=["train.model=yes"]).settings()
    with pytest.raises(ConfigError, match="train.epochs: Input should be greater than or equal to 1"):
        TrainingParameters.model_construct(epochs=0, params_path=path, overrides=[]).settings()


def test_bad_schedule_is_a_config_error_naming_the_setting() -> None:
    from flows.deploy import check_schedule

    check_schedule("0 2 * * 1", "Europe/Paris", "training_cron")
    with pytest.raises(ConfigError, match="orchestrate.training_cron"):
        check_schedule("every monday", "UTC", "training_cron")
    with pytest.raises(ConfigError, match="orchestrate.timezone"):
        check_schedule("0 2 * * 1", "Mars/Olympus", "training_cron")


def test_io_task_options_back_off_exponentially(make_settings: Callable[..., Settings]) -> None:
    from flows.options import backoff, io_options

    assert backoff(2, 3) == [2, 4, 8]
    opts = io_options(make_settings("orchestrate.task_retries=3", "orchestrate.task_retry_delay_s=5",
                                    "orchestrate.task_timeout_s=60"))
    assert opts["retries"] == 3 and opts["retry_delay_seconds"] == [5, 10, 20] and opts["timeout_seconds"] == 60
    assert io_options(make_settings("orchestrate.task_retries=0"))["retry_delay_seconds"] == 0


def test_dask_shards_are_bounded() -> None:
    from flows.scaleout import MAX_SHARD, MIN_SHARD, shard_size

    assert shard_size(10, 2) == MIN_SHARD
    assert shard_size(800, 2) == 100
    assert shard_size(10**7, 2) == MAX_SHARD


def test_settings_overrides_from_the_environment(make_settings: Callable[..., Settings],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_settings().root / "params.yaml"
    monkeypatch.setenv("XRAYOPS_SET", "paths.mlflow_tracking_uri=http://mlflow:5000;\n train.epochs=3 ;")
    settings = load_settings(path, ["train.epochs=4"])
    assert settings.tracking_uri == "http://mlflow:5000" and settings.train.epochs == 4  # --set wins
    monkeypatch.setenv("XRAYOPS_SET", "train.nope=1")
    with pytest.raises(ConfigError, match="train.nope"):
        load_settings(path)


@pytest.mark.slow
def test_s3_locations_come_from_settings_only(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """DVC remote and MLflow artifact store on S3/MinIO: URLs pass through untouched; with an HTTP tracking
    server and no artifact root the server's own (proxied) store is used."""
    from pipeline.tracking import ensure_experiment

    s3 = make_settings("paths.dvc_remote=s3://dvc/store", "paths.mlflow_artifact_root=s3://mlflow/artifacts")
    assert s3.dvc_remote == "s3://dvc/store" and s3.artifact_root == "s3://mlflow/artifacts"
    exp_id = ensure_experiment(s3)  # SQLite tracking store; creating the experiment does not touch S3
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri=s3.tracking_uri).get_experiment(exp_id)
    assert exp.artifact_location == "s3://mlflow/artifacts/xrayops_synthetic"
    assert make_settings("paths.mlflow_tracking_uri=http://mlflow:5000").artifact_root is None
    assert make_settings().artifact_root.startswith("file://")


def test_dvc_remote_config_accepts_an_s3_url(dvc_project: Callable[..., Settings]) -> None:
    from pipeline.data.versioning import ensure_remote

    settings = dvc_project("paths.dvc_remote=s3://dvc/store")
    ensure_remote(settings.root, settings.dvc_remote)
    text = (settings.root / ".dvc" / "config.local").read_text()
    assert "url = s3://dvc/store" in text and "remote = xrayops" in text


def test_deployment_names_agree_with_settings_and_flows(make_settings: Callable[..., Settings]) -> None:
    from flows import TRAINING_DEPLOYMENT
    from flows.deploy import PROJECT_DIR, SPECS, find_flow

    assert make_settings().monitor.training_deployment == TRAINING_DEPLOYMENT  # drift → retraining target
    for spec in SPECS:
        found = find_flow(spec, PROJECT_DIR)
        if found:  # the flow object carries the name the deployment is addressed by
            assert found[1].name == spec.flow_name, spec
