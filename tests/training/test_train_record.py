"""One real training run on a tiny cohort: the MLflow record holds everything the issue lists."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import Settings


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
    # dataset lineage as MLflow inputs
    inputs = [{t.key: t.value for t in i.tags} for i in run.inputs.dataset_inputs]
    assert {i["mlflow.data.context"] for i in inputs} == {"training", "validation"}
    assert all(i["split_certificate"] == tags["split_certificate"] for i in inputs)
    # artifacts: curves, architecture report + figures; model with signature and explicit requirements
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "architecture")}
    assert {"architecture/report.json", "architecture/report.txt", "architecture/first_layer_filters.png",
            "architecture/feature_maps.png"} <= artifacts
    assert "plots/training_curves.png" in {a.path for a in client.list_artifacts(result.run_id, "plots")}
    report = json.loads(Path(client.download_artifacts(result.run_id, "architecture/report.json")).read_text())
    assert report["total_params"] == report["keras_total_params"] and not report["mismatches"]
    import mlflow

    info = mlflow.models.get_model_info(result.model_uri)
    assert info.signature is not None
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 32, 32, 1)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(result.model_uri)).read_text()
    assert "tensorflow==" in requirements and "keras==" in requirements
    assert result.history["val_auc"] and len(result.history["loss"]) == result.epochs_run == 2
