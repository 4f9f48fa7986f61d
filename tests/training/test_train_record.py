"""One real training run on a tiny cohort: the MLflow record holds everything the issue lists."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import Settings
from pipeline.registry.contract import (
    ARCHITECTURE_DIR,
    ARCHITECTURE_REPORT_ARTIFACT,
    ARCHITECTURE_TEXT_ARTIFACT,
    FEATURE_MAPS_ARTIFACT,
    FILTERS_ARTIFACT,
    PLOTS_DIR,
    TRAINING_CURVES_ARTIFACT,
    UNVERSIONED,
)


@pytest.mark.slow
def test_training_run_leaves_a_complete_mlflow_record(train_settings: Callable[..., Settings]) -> None:
    from pipeline.training.train import run_train

    settings = train_settings("train.epochs=2")
    result = run_train(settings)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run = client.get_run(result.run_id)

    # params: the whole config, flattened
    assert run.data.params["train.epochs"] == "2" and run.data.params["base.seed"] == "42"
    assert run.data.params["train.augment.horizontal_flip"] == "False"
    # per-epoch metrics with stable names
    for key in ("loss", "auc", "pr_auc", "precision", "recall", "val_auc", "val_loss", "learning_rate"):
        steps = [m.step for m in client.get_metric_history(result.run_id, key)]
        assert steps == [0, 1], key
    # tags: code version, seed, lineage
    tags = run.data.tags
    assert {"git_commit", "git_dirty", "lock_sha256", "seed", "split_certificate", "dvc_md5"} <= set(tags)
    assert tags["seed"] == "42"
    assert tags["dvc_md5"] == tags["dvc_rev"] == UNVERSIONED  # data.version_with_dvc=false: stated, never "None"
    # dataset lineage as MLflow inputs
    inputs = [{t.key: t.value for t in i.tags} for i in run.inputs.dataset_inputs]
    assert {i["mlflow.data.context"] for i in inputs} == {"training", "validation"}
    assert all(i["split_certificate"] == tags["split_certificate"] for i in inputs)
    # artifacts: curves, architecture report + figures; model with signature and explicit requirements
    artifacts = {a.path for a in client.list_artifacts(result.run_id, ARCHITECTURE_DIR)}
    assert {ARCHITECTURE_REPORT_ARTIFACT, ARCHITECTURE_TEXT_ARTIFACT, FILTERS_ARTIFACT,
            FEATURE_MAPS_ARTIFACT} <= artifacts
    assert TRAINING_CURVES_ARTIFACT in {a.path for a in client.list_artifacts(result.run_id, PLOTS_DIR)}
    report = json.loads(Path(client.download_artifacts(result.run_id, ARCHITECTURE_REPORT_ARTIFACT)).read_text())
    assert report["total_params"] == report["keras_total_params"] and not report["mismatches"]
    import mlflow

    info = mlflow.models.get_model_info(result.model_uri)
    assert info.signature is not None
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 32, 32, 1)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(result.model_uri)).read_text()
    assert "tensorflow==" in requirements and "keras==" in requirements
    assert result.history["val_auc"] and len(result.history["loss"]) == result.epochs_run == 2
