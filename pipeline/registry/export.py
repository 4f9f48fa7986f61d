"""Export a trained Keras model for serving: TensorFlow SavedModel and ONNX, with a parity check.

ONNX goes through the SavedModel route (``model.export(format="tf_saved_model")`` then
tf2onnx's SavedModel loader + converter, as ``python -m tf2onnx.convert --saved-model``
does): ``model.export(format="onnx")`` leaks EfficientNet's normalisation constants as
extra graph inputs. The ONNX graph always has one input named :data:`ONNX_INPUT`
(``(batch, H, W, C)`` float32 in [0, 1], the same preprocessing as the Keras model) and one
output named :data:`ONNX_OUTPUT` (probabilities, ``(batch, 1)`` binary / ``(batch, k)``).

At registration the exports are logged to the training run under ``export/saved_model/``
and ``export/model.onnx``; the parity (max abs difference of probabilities, Keras vs ONNX
Runtime, on a sample of test images) is stored as the version tag
``onnx_parity_max_abs_diff``. A model whose parity exceeds :data:`PARITY_TOLERANCE` gets no
``model.onnx`` artifact (serving then falls back to TensorFlow) and tag ``onnx_export=parity_failed``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ExportError
from pipeline.registry.contract import ONNX_ARTIFACT, PARITY_TAG, SAVED_MODEL_ARTIFACT, ExportTags  # noqa: F401

logger = logging.getLogger(__name__)

ONNX_INPUT = "image"
ONNX_OUTPUT = "probability"
PARITY_TOLERANCE = 1e-4


def _input_hwc(model: Any, input_shape: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    shape = tuple(input_shape) if input_shape is not None else tuple(model.inputs[0].shape)
    hwc = shape[-3:]
    if len(hwc) != 3 or any(d is None for d in hwc):
        raise ExportError(f"expected an image input shape (H, W, C) with known sizes, found {shape}; "
                          "pass input_shape=(H, W, C)")
    return int(hwc[0]), int(hwc[1]), int(hwc[2])


def export_saved_model(model: Any, out_dir: str | Path, input_shape: tuple[int, ...] | None = None) -> Path:
    """Write ``model`` as a TensorFlow SavedModel (endpoint ``serve``, batch dimension free).

    Returns:
        The SavedModel folder.
    """
    import keras

    out_dir = Path(out_dir)
    h, w, c = _input_hwc(model, input_shape)
    if not model.built:
        model(np.zeros((1, h, w, c), np.float32))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    spec = keras.InputSpec(shape=(None, h, w, c), dtype="float32")
    try:
        model.export(str(out_dir), format="tf_saved_model", input_signature=[spec], verbose=False)
    except Exception as exc:  # Keras/TensorFlow raise many types: say which model and step failed
        raise ExportError(f"SavedModel export of {model.name!r} to {out_dir} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    return out_dir


def saved_model_to_onnx(saved_model_dir: str | Path, out_path: str | Path, opset: int = 17) -> Path:
    """Convert a SavedModel (signature ``serve``) to ONNX with tf2onnx; input/output renamed to stable names."""
    import tensorflow as tf
    from tf2onnx import convert, tf_loader

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its INFO lines would flood the flow logs
    graph_def, inputs, outputs, tables, rename = tf_loader.from_saved_model(
        str(saved_model_dir), None, None, tag="serve", signatures=["serve"],
        return_initialized_tables=True, return_tensors_to_rename=True)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"expected a SavedModel with one input and one output, found inputs {inputs} "
                          f"and outputs {outputs}")
    rename = {**rename, inputs[0]: ONNX_INPUT, outputs[0]: ONNX_OUTPUT}
    with tf.device("/cpu:0"):
        # The same call `python -m tf2onnx.convert --saved-model` makes after loading.
        convert._convert_common(graph_def, name=Path(saved_model_dir).name, continue_on_error=False, opset=opset,
                                input_names=inputs, output_names=outputs, tensors_to_rename=rename,
                                initialized_tables=tables, output_path=str(out_path))
    return out_path


def export_onnx(model: Any, input_shape: tuple[int, ...] | None, out_path: str | Path, opset: int = 17) -> Path:
    """Export ``model`` to ONNX through a temporary SavedModel.

    Args:
        input_shape: ``(H, W, C)`` (a leading batch dimension is ignored); None = the model's input shape.

    Returns:
        The ``.onnx`` file.
    """
    with tempfile.TemporaryDirectory(prefix="xrayops-export-") as tmp:
        saved = export_saved_model(model, Path(tmp) / "saved_model", input_shape)
        return saved_model_to_onnx(saved, out_path, opset)


def onnx_session(onnx_path: str | Path) -> Any:
    """An ONNX Runtime CPU session for an exported model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_predict(session: Any, batch: np.ndarray) -> np.ndarray:
    """Raw model outputs for a preprocessed ``(n, H, W, C)`` float32 batch."""
    return np.asarray(session.run([ONNX_OUTPUT], {ONNX_INPUT: np.asarray(batch, np.float32)})[0])


def onnx_parity(model: Any, onnx_path: str | Path, sample: np.ndarray) -> float:
    """Max absolute difference of probabilities between the Keras model and its ONNX export."""
    sample = np.asarray(sample, np.float32)
    keras_out = np.asarray(model(sample, training=False), np.float64)
    onnx_out = onnx_predict(onnx_session(onnx_path), sample).astype(np.float64)
    if keras_out.shape != onnx_out.shape:
        raise ExportError(f"ONNX output shape {onnx_out.shape} differs from the Keras output {keras_out.shape}")
    return float(np.max(np.abs(keras_out - onnx_out)))


def log_exports(model: Any, run_id: str, sample: np.ndarray, *, onnx: bool, opset: int = 17,
                tolerance: float = PARITY_TOLERANCE) -> dict[str, str]:
    """Log SavedModel (+ ONNX when ``onnx``) to MLflow run ``run_id``; return the version tags to set.

    The tracking URI must already be configured (:func:`pipeline.tracking.configure_mlflow`).
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    input_shape = tuple(np.asarray(sample).shape[1:])
    with tempfile.TemporaryDirectory(prefix="xrayops-export-") as tmp:
        saved = export_saved_model(model, Path(tmp) / "saved_model", input_shape)
        client.log_artifacts(run_id, str(saved), SAVED_MODEL_ARTIFACT)
        if not onnx:
            return ExportTags(SAVED_MODEL_ARTIFACT, ExportTags.DISABLED).to_tags()
        try:
            onnx_path = saved_model_to_onnx(saved, Path(tmp) / "model.onnx", opset)
            diff = onnx_parity(model, onnx_path, sample)
        except Exception as exc:  # noqa: BLE001 - a converter gap must not lose the registration; serving uses tf
            logger.warning("ONNX export failed (%s: %s); serve this version with engine=tf",
                           type(exc).__name__, exc)
            return ExportTags(SAVED_MODEL_ARTIFACT, ExportTags.FAILED, f"{type(exc).__name__}: {exc}").to_tags()
        if diff <= tolerance:
            client.log_artifact(run_id, str(onnx_path), Path(ONNX_ARTIFACT).parent.as_posix())
            logger.info("exported ONNX (opset %d); parity max |Δp| = %.3g", opset, diff)
            return ExportTags(SAVED_MODEL_ARTIFACT, ONNX_ARTIFACT, onnx_parity=f"{diff:.3g}",
                              onnx_opset=opset).to_tags()
        logger.warning("ONNX export differs from Keras by %.3g (> %.0e): not logged; serve with engine=tf",
                       diff, tolerance)
        return ExportTags(SAVED_MODEL_ARTIFACT, ExportTags.PARITY_FAILED, onnx_parity=f"{diff:.3g}").to_tags()


def download_onnx(run_id: str, dst_dir: str | Path) -> Path:
    """Download ``export/model.onnx`` of a training run (tracking URI already configured)."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ONNX_ARTIFACT,
                                                    dst_path=str(dst_dir)))
