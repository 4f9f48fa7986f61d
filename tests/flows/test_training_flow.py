"""End to end: the training flow on a tiny cohort through Prefect's test harness, with a temp
MLflow SQLite DB, a temp git + DVC repo and a local DVC remote."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import Settings

pytestmark = pytest.mark.slow

LENIENT_GATE = ["promote.min_auc=0", "promote.sensitivity_ci_floor=0", "promote.max_ece=1"]


def test_training_flow_end_to_end_and_rerun(prefect_harness: None, dvc_project: Callable[..., Settings],
                                            tmp_path: Path) -> None:
    from flows.training import TrainingParameters, run

    settings = dvc_project(*LENIENT_GATE)
    params_path = str(settings.root / "params.yaml")
    summary = run(TrainingParameters(params_path=params_path, simulate_production=True), tmp_path / "summary.json")

    # data: versioned with DVC, validated, split by patient
    assert summary["data"]["dvc_md5"].endswith(".dir")
    assert (settings.root / "data" / "raw" / "synthetic.dvc").is_file()
    assert any((settings.home / "dvc-remote").rglob("*")), "dataset pushed to the local DVC remote"
    gx = json.loads((settings.dataset_dir / "validation" / "result.json").read_text())
    assert gx["success"] and not gx["critical_failures"]
    cert = json.loads((settings.dataset_dir / "split_certificate.json").read_text())
    assert cert["patient_overlap"] == 0 == summary["data"]["split"]["patient_overlap"]

    # registry: first model passes the (lenient) floors and becomes champion
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    from pipeline.registry.read import aliases

    assert aliases(settings) == {"champion": "1", "challenger": "1"} == summary["registry"]["aliases"]
    version = client.get_model_version(settings.registered_model, "1")
    assert version.tags["dvc_md5"] == summary["data"]["dvc_md5"]
    assert version.tags["gate_verdict"] == "pass" and "operating_threshold" in version.tags
    run_data = client.get_run(summary["train"]["run_id"]).data
    assert int(run_data.params["train.epochs"]) == 2 and "test_auc" in run_data.metrics

    # drift report on disk
    html = Path(summary["reports"]["drift_html"])
    assert html.is_file() and (html.parent / "summary.json").is_file()
    assert summary["drift"]["current_rows"] == 40
    # ... and published as the run's artifact under its own key (the monitoring flow's drift-report is real traffic)
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.training import SIMULATED_DRIFT_ARTIFACT

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[SIMULATED_DRIFT_ARTIFACT])))
    assert arts and "Simulated traffic" in str(arts[-1].data) and "drift share" in str(arts[-1].data)

    # the summary file has the documented keys
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert {"schema", "data", "train", "metrics", "registry", "reports", "mlflow_ui"} <= set(on_disk)

    # re-running is idempotent: a new version, no name clashes; aliases stay consistent with the gate
    again = run(TrainingParameters(params_path=params_path, simulate_production=False))
    assert again["registry"]["version"] == "2"
    now = aliases(settings)
    assert now["challenger"] == "2"
    if again["registry"]["gate"]["promote"]:
        assert now["champion"] == "2" and now["previous-champion"] == "1"
    else:
        assert now["champion"] == "1"
