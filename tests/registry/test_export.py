"""SavedModel + ONNX export through the SavedModel route, with the parity check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.registry.export import ONNX_INPUT, ONNX_OUTPUT, export_onnx, export_saved_model, onnx_parity, onnx_session


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), [("xray_cnn", {"image_size": 48}), ("mnist_cnn", {"num_classes": 10})])
def test_onnx_export_matches_keras(tmp_path: Path, name: str, options: dict) -> None:
    from pipeline.training.models import build_model

    model = build_model(name, **options)
    shape = tuple(model.inputs[0].shape[1:])
    path = export_onnx(model, shape, tmp_path / "model.onnx")
    session = onnx_session(path)
    assert [i.name for i in session.get_inputs()] == [ONNX_INPUT]  # no leaked constants as extra inputs
    assert [o.name for o in session.get_outputs()] == [ONNX_OUTPUT]
    sample = np.random.default_rng(0).random((5, *shape)).astype(np.float32)  # batch size is free
    assert onnx_parity(model, path, sample) <= 1e-4


def test_saved_model_serves_the_same_probabilities(tmp_path: Path) -> None:
    import tensorflow as tf

    from pipeline.training.models import build_model

    model = build_model("xray_cnn", image_size=32)
    out = export_saved_model(model, tmp_path / "sm", (32, 32, 1))
    sample = np.random.default_rng(1).random((3, 32, 32, 1)).astype(np.float32)
    loaded = tf.saved_model.load(str(out))
    served = loaded.serve(tf.constant(sample)).numpy()
    np.testing.assert_allclose(served, model(sample).numpy(), atol=1e-6)


@pytest.mark.slow
def test_efficientnet_exports_without_leaked_inputs(tmp_path: Path) -> None:
    from pipeline.training.models import build_model

    model = build_model("efficientnet_b0", image_size=32, weights="none")
    path = export_onnx(model, (32, 32, 1), tmp_path / "eff.onnx")
    assert [i.name for i in onnx_session(path).get_inputs()] == [ONNX_INPUT]
    assert onnx_parity(model, path, np.random.default_rng(2).random((2, 32, 32, 1)).astype(np.float32)) <= 1e-4


@pytest.mark.slow
def test_registration_logs_exports_and_parity_tag(make_settings, tmp_path: Path) -> None:
    import mlflow

    from pipeline.registry.export import ONNX_ARTIFACT, PARITY_TAG, SAVED_MODEL_ARTIFACT, log_exports
    from pipeline.tracking import configure_mlflow, ensure_experiment
    from pipeline.training.models import build_model

    settings = make_settings()
    client = configure_mlflow(settings)
    run = client.create_run(ensure_experiment(settings))
    model = build_model("xray_cnn", image_size=32)
    sample = np.random.default_rng(3).random((4, 32, 32, 1)).astype(np.float32)
    tags = log_exports(model, run.info.run_id, sample, onnx=True)
    assert float(tags[PARITY_TAG]) <= 1e-4 and tags["onnx_export"] == ONNX_ARTIFACT
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {ONNX_ARTIFACT, SAVED_MODEL_ARTIFACT} <= listed
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=ONNX_ARTIFACT,
                                                dst_path=str(tmp_path))
    assert onnx_parity(model, local, sample) <= 1e-4
    assert log_exports(model, run.info.run_id, sample, onnx=False)["onnx_export"] == "disabled"
