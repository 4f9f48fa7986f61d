"""Inference on decoded images, shared by the API, the clinician UI, production simulation and
the training-time reference profile.

Preprocessing is training's own (:mod:`pipeline.training.preprocess`: float [0, 1], antialiased
resize; ``tests/serving/test_preprocess_parity.py`` holds the two paths equal). Inference goes
through a compiled path — ONNX Runtime on the exported model, or a ``tf.function`` with a fixed
input signature — never ``model.predict`` per request. Both engines return the probabilities *and* the model's
penultimate-layer embedding in one pass; the embedding is reduced with the PCA fitted on
the training split (:class:`EmbeddingPCA`) so production rows and the reference profile
carry the same ``emb_pc*`` columns.
"""

from __future__ import annotations

import io
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.features import image_features
from pipeline.data.imaging import DecodedImage
from pipeline.registry.contract import PCA_ARTIFACT, VersionTags
from pipeline.training.inputs import InputSpec
from pipeline.training.preprocess import preprocess_decoded

logger = logging.getLogger(__name__)

EMBEDDING_LAYER = "embedding"
EMB_PREFIX = "emb_pc"


# --------------------------------------------------------------------------- embeddings + PCA


@dataclass(frozen=True)
class EmbeddingPCA:
    """A PCA of penultimate-layer embeddings (fitted on the training split, logged with the model)."""

    mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d), unit rows
    explained_variance_ratio: np.ndarray  # (k,)
    layer: str

    @property
    def columns(self) -> list[str]:
        return pca_columns(len(self.components))

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, d)`` embeddings → ``(n, k)`` principal components."""
        return (np.asarray(embeddings, np.float64) - self.mean) @ self.components.T

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components,
                 explained_variance_ratio=self.explained_variance_ratio, layer=np.array(self.layer))
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: str | Path) -> EmbeddingPCA:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mean"], z["components"], z["explained_variance_ratio"], str(z["layer"]))


def pca_columns(k: int) -> list[str]:
    return [f"{EMB_PREFIX}{i + 1}" for i in range(k)]


def fit_pca(embeddings: np.ndarray, n_components: int, layer: str) -> EmbeddingPCA:
    """PCA by SVD; each component's sign is fixed (largest loading positive) so refits agree."""
    x = np.asarray(embeddings, np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = max(1, min(n_components, vt.shape[0], max(1, len(x) - 1)))
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    var = s**2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)
    return EmbeddingPCA(mean, comps, ratio, layer)


def embedding_output(model: Any) -> tuple[Any, str]:
    """The symbolic embedding tensor: layer ``embedding`` if present, else the head's input."""
    try:
        return model.get_layer(EMBEDDING_LAYER).output, EMBEDDING_LAYER
    except ValueError:
        head = model.layers[-1]
        return head.input, f"{head.name}:input"


def dual_output_model(model: Any) -> tuple[Any, str]:
    """A Keras model returning ``[outputs, embedding]`` from one forward pass."""
    import keras

    emb, layer = embedding_output(model)
    return keras.Model(model.inputs, [model.outputs[0], emb], name=f"{model.name}_with_embedding"), layer


def score_with_embeddings(model: Any, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, str]:
    """Offline batch scoring (training-time reference): probabilities, embeddings, embedding layer name."""
    dual, layer = dual_output_model(model)
    out, emb = dual.predict(images, batch_size=batch_size, verbose=0)
    out = np.asarray(out, np.float64)
    return (out[:, 0] if out.shape[-1] == 1 else out), np.asarray(emb, np.float64).reshape(len(images), -1), layer


# --------------------------------------------------------------------------- engines


class TFEngine:
    """``tf.function`` with a fixed signature over the two-output model (thread-safe)."""

    name = "tf"

    def __init__(self, model: Any, spec: InputSpec) -> None:
        import tensorflow as tf

        self._dual, self.layer = dual_output_model(model)
        sig = tf.TensorSpec([None, spec.image_size, spec.image_size, spec.channels], tf.float32)
        self._fn = tf.function(lambda x: self._dual(x, training=False), input_signature=[sig])

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, emb = self._fn(np.asarray(batch, np.float32))
        return out.numpy(), emb.numpy().reshape(len(batch), -1)


class OnnxEngine:
    """ONNX Runtime session on the exported model, with the embedding exposed as a second output."""

    name = "onnx"

    def __init__(self, onnx_path: str | Path, threads: int = 0) -> None:
        import onnx
        import onnxruntime as ort

        proto = onnx.load(str(onnx_path))
        self.input = proto.graph.input[0].name
        self.output = proto.graph.output[0].name
        self.embedding = expose_embedding(proto)
        self.layer = "onnx:head-input"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        self._session = ort.InferenceSession(proto.SerializeToString(), sess_options=opts,
                                             providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, emb = self._session.run([self.output, self.embedding], {self.input: np.asarray(batch, np.float32)})
        return np.asarray(out), np.asarray(emb).reshape(len(batch), -1)


_PASS_THROUGH = {"Sigmoid", "Softmax", "Identity", "Cast", "Add", "Reshape", "Squeeze", "Flatten"}


def expose_embedding(proto: Any) -> str:
    """Add the input of the classification head's MatMul/Gemm as a graph output; return its name.

    Walks back from the graph output through element-wise ops (activation, bias add, casts)
    to the first MatMul/Gemm: its non-constant input is the penultimate-layer embedding.

    Raises:
        ValueError: the graph does not end in a dense head.
    """
    from onnx import helper

    graph = proto.graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                      for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    tensor = graph.output[0].name
    for _ in range(16):
        node = producer.get(tensor)
        if node is None:
            break
        variable = [i for i in node.input if i and i not in constants]
        if node.op_type in ("MatMul", "Gemm") and variable:
            name = variable[0]
            if name not in {o.name for o in graph.output}:
                graph.output.append(helper.make_empty_tensor_value_info(name))
            return name
        if node.op_type not in _PASS_THROUGH or len(variable) != 1:
            break
        tensor = variable[0]
    raise ValueError("cannot find the dense classification head in the ONNX graph (expected "
                     "output ← activation ← [bias add] ← MatMul/Gemm); serve with --set serve.engine=tf")


# --------------------------------------------------------------------------- predictor


@dataclass(frozen=True)
class Prediction:
    """One image's model outputs."""

    probability: float  # positive class (binary) or top class (multi-class)
    probabilities: dict[str, float]
    label: str
    embedding_pcs: dict[str, float]


@dataclass
class Predictor:
    """A loaded model version ready to score images (immutable once built; safe to share between threads)."""

    model: Any
    spec: InputSpec
    threshold: float | None
    model_name: str
    version: str
    classes: list[str]
    positive_class: str | None = None
    pca: EmbeddingPCA | None = None
    engine: Any = field(default=None, repr=False)
    run_id: str | None = None
    alias: str | None = None
    tags: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = TFEngine(self.model, self.spec)

    @classmethod
    def from_version(cls, model: Any, version: Any, model_name: str, *, engine: Any = None,
                     pca: EmbeddingPCA | None = None, alias: str | None = None) -> Predictor:
        """Build from a registry ``ModelVersion`` (its tags hold the input spec and threshold)."""
        tags = dict(version.tags)
        lineage = VersionTags.from_tags(tags)
        size, channels, classes = lineage.input_shape(f"{model_name} v{version.version}")
        return cls(model, InputSpec(size, channels, len(classes)), lineage.operating_threshold, model_name,
                   str(version.version), classes, lineage.positive_class, pca, engine,
                   getattr(version, "run_id", None), alias, tags)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def preprocess(self, image: DecodedImage, gray01: np.ndarray | None = None) -> np.ndarray:
        """``(size, size, channels)`` float32 exactly as training saw it (``gray01``: the image's
        :meth:`~DecodedImage.gray01` when the caller has it already)."""
        return preprocess_decoded(image, self.spec.image_size, self.spec.channels, gray01)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw outputs ``(n, 1 | k)`` and embeddings ``(n, d)`` of a preprocessed batch."""
        return self.engine(batch)

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a preprocessed batch (positive class for binary models)."""
        out = np.asarray(self.infer(batch)[0], dtype=np.float64)
        return out[:, 0] if out.shape[-1] == 1 else out

    def score(self, batch: np.ndarray) -> list[Prediction]:
        """Probabilities, labels and embedding PCs of a preprocessed batch."""
        out, emb = self.infer(batch)
        pcs = self.pca.transform(emb) if self.pca is not None else np.zeros((len(batch), 0))
        cols = self.pca.columns if self.pca is not None else []
        scored = []
        for i in range(len(batch)):
            row = np.asarray(out[i], np.float64)
            if row.shape[-1] == 1:
                p = float(row[0])
                probs = {self.negative_class: 1.0 - p, self.positive_class or self.classes[1]: p}
                scored.append(Prediction(p, probs, self.label_for(p), dict(zip(cols, map(float, pcs[i]), strict=True))))
            else:
                probs = {c: float(v) for c, v in zip(self.classes, row, strict=True)}
                scored.append(Prediction(float(row.max()), probs, self.label_for(row),
                                     dict(zip(cols, map(float, pcs[i]), strict=True))))
        return scored

    @property
    def negative_class(self) -> str:
        return next(c for c in self.classes if c != (self.positive_class or self.classes[1]))

    def label_for(self, proba: np.ndarray | float) -> str:
        if np.ndim(proba) == 0:
            positive = self.positive_class or self.classes[1]
            threshold = 0.5 if self.threshold is None else self.threshold
            return positive if float(proba) >= threshold else self.negative_class
        return self.classes[int(np.argmax(proba))]

    def log_row(self, image: DecodedImage, scored: Prediction | np.ndarray | float, *, request_id: str | None = None,
                gray01: np.ndarray | None = None, source: str = "api",
                request_time: datetime | None = None) -> dict[str, Any]:
        """One production-log row (features, outputs, model version; no pixels, no identifiers)."""
        if not isinstance(scored, Prediction):
            p = float(scored) if np.ndim(scored) == 0 else float(np.max(scored))
            scored = Prediction(p, {}, self.label_for(scored), {})
        gray = image.gray01() if gray01 is None else gray01
        row: dict[str, Any] = {
            "request_id": request_id or uuid.uuid4().hex,
            "request_time": request_time or datetime.now(UTC),
            "source": source,
            "model_name": self.model_name,
            "model_version": self.version,
            "format": image.format,
            **image_features(gray, bit_depth=image.bit_depth, width=image.width, height=image.height),
            "view_position": image.meta.get("view_position"),
            "probability": scored.probability,
            "label": scored.label,
        }
        if self.binary:
            row["predicted_positive"] = float(scored.label == (self.positive_class or self.classes[1]))
        row.update(scored.embedding_pcs)
        return row


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if not df.empty:
        df["request_time"] = pd.to_datetime(df["request_time"], utc=True)
    return df


# --------------------------------------------------------------------------- loading a registry version


def load_pca(settings: Any, run_id: str) -> EmbeddingPCA | None:
    """The embedding PCA logged with a training run, or None (older runs have none)."""
    import mlflow

    from pipeline.tracking import configure_mlflow

    configure_mlflow(settings)
    try:
        return EmbeddingPCA.from_file(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PCA_ARTIFACT))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        logger.warning("run %s has no %s (%s): production rows will carry no embedding components",
                       run_id, PCA_ARTIFACT, type(exc).__name__)
        return None


def serve_cache_key(version: Any) -> str:
    """The cache folder name of a version: ``v<N>-<sha256(run id, model source)[:16]>``.

    A version number alone is not an identity: a registry recreated from scratch (new database, deleted and
    re-created registered model) numbers its versions from 1 again. The run id and source differ, so a stale
    graph of an old ``v1`` is never reused for a new one.
    """
    import hashlib

    ident = f"{getattr(version, 'run_id', None)}\n{getattr(version, 'source', None)}"
    return f"v{version.version}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def onnx_model_path(settings: Any, version: Any, model: Any, spec: InputSpec) -> Path:
    """``export/model.onnx`` of the version's run, or (when missing) a conversion; cached under the home folder
    by :func:`serve_cache_key` (version number, run id and model source)."""
    from pipeline.registry.export import download_onnx, export_onnx
    from pipeline.tracking import configure_mlflow

    cache = settings.home / "serve-cache" / settings.registered_model / serve_cache_key(version)
    local = cache / "model.onnx"
    if local.is_file():
        return local
    cache.mkdir(parents=True, exist_ok=True)
    configure_mlflow(settings)
    staging = cache / f".download-{uuid.uuid4().hex[:8]}"
    try:
        download_onnx(version.run_id, staging).replace(local)
        return local
    except Exception as exc:  # noqa: BLE001 - artifact missing (export disabled, parity failed, older version)
        logger.warning("version %s has no ONNX export (%s): converting on load", version.version, type(exc).__name__)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tmp = cache / f".model-{uuid.uuid4().hex[:8]}.onnx"
    export_onnx(model, (spec.image_size, spec.image_size, spec.channels), tmp)
    tmp.replace(local)
    return local


def load_predictor(settings: Any, version: Any, *, alias: str | None = None, engine: str | None = None) -> Predictor:
    """Load a registry version for serving: Keras model (explanations), compiled engine, embedding PCA."""
    from pipeline.registry.read import load_version_model

    model = load_version_model(settings, version)
    size, channels, classes = VersionTags.from_version(version).input_shape(
        f"{settings.registered_model} v{version.version}")
    spec = InputSpec(size, channels, len(classes))
    kind = engine or settings.serve.engine
    runner: Any
    if kind == "onnx":
        try:
            runner = OnnxEngine(onnx_model_path(settings, version, model, spec))
        except Exception as exc:  # noqa: BLE001 - any ONNX failure: the tf.function engine serves the same model
            logger.warning("ONNX engine unavailable for version %s (%s: %s); using the tf.function engine",
                           version.version, type(exc).__name__, str(exc)[:200])
            runner = TFEngine(model, spec)
    else:
        runner = TFEngine(model, spec)
    pca = load_pca(settings, version.run_id) if version.run_id else None
    predictor = Predictor.from_version(model, version, settings.registered_model, engine=runner, pca=pca, alias=alias)
    logger.debug("loaded %s v%s (%s engine, threshold %s, %d embedding PCs)", settings.registered_model,
                 version.version, runner.name, predictor.threshold, len(pca.components) if pca else 0)
    return predictor
