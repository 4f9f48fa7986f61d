"""Inference on decoded images, shared by the API, the clinician UI and production simulation.

Preprocessing mirrors :func:`pipeline.inputs.decode_resize` (float [0, 1], antialiased
resize, luminance for grayscale models), and inference goes through a compiled
``tf.function`` with a fixed input signature instead of ``model.predict`` per request.
Every prediction yields a production-log row built with the shared feature code.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.imaging import DecodedImage
from pipeline.features import image_features
from pipeline.inputs import InputSpec


@dataclass
class Predictor:
    """A loaded model version ready to score images."""

    model: Any
    spec: InputSpec
    threshold: float | None
    model_name: str
    version: str
    classes: list[str]
    positive_class: str | None = None
    _fn: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import tensorflow as tf

        sig = tf.TensorSpec([None, self.spec.image_size, self.spec.image_size, self.spec.channels], tf.float32)
        self._fn = tf.function(lambda x: self.model(x, training=False), input_signature=[sig])

    @classmethod
    def from_version(cls, model: Any, version: Any, model_name: str) -> Predictor:
        """Build from a registry ``ModelVersion`` (its tags hold the input spec and threshold)."""
        tags = version.tags
        classes = json.loads(tags["classes"])
        thr = tags.get("operating_threshold")
        return cls(model, InputSpec(int(tags["input_size"]), int(tags["input_channels"]), len(classes)),
                   float(thr) if thr else None, model_name, str(version.version), classes,
                   tags.get("positive_class") if tags.get("positive_class") not in (None, "None") else None)

    def preprocess(self, image: DecodedImage) -> np.ndarray:
        """``(size, size, channels)`` float32 exactly as training saw it."""
        import tensorflow as tf

        if self.spec.channels == 1:
            px = image.gray01()[..., None]
        else:
            scale = float((1 << image.bit_depth) - 1)
            px = image.pixels.astype(np.float32) / scale
            px = np.repeat(px[..., None], 3, axis=-1) if px.ndim == 2 else px
        out = tf.image.resize(px, (self.spec.image_size, self.spec.image_size), antialias=True)
        return np.clip(out.numpy(), 0.0, 1.0).astype(np.float32)

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a preprocessed batch (positive class for binary models)."""
        out = np.asarray(self._fn(batch), dtype=np.float64)
        return out[:, 0] if out.shape[-1] == 1 else out

    def label_for(self, proba: np.ndarray | float) -> str:
        if np.ndim(proba) == 0:
            assert self.threshold is not None and self.positive_class is not None
            negative = next(c for c in self.classes if c != self.positive_class)
            return self.positive_class if float(proba) >= self.threshold else negative
        return self.classes[int(np.argmax(proba))]

    def log_row(self, image: DecodedImage, proba: np.ndarray | float, *, request_id: str | None = None,
                embedding: dict[str, float] | None = None) -> dict[str, Any]:
        """One production-log row (features, outputs, model version; no pixels, no identifiers)."""
        p = float(proba) if np.ndim(proba) == 0 else float(np.max(proba))
        row: dict[str, Any] = {
            "request_id": request_id or uuid.uuid4().hex,
            "request_time": datetime.now(UTC),
            "model_name": self.model_name,
            "model_version": self.version,
            **image_features(image.gray01(), bit_depth=image.bit_depth, width=image.width, height=image.height),
            "view_position": image.meta.get("view_position"),
            "probability": p,
            "label": self.label_for(proba),
        }
        if self.threshold is not None and np.ndim(proba) == 0:
            row["predicted_positive"] = float(p >= self.threshold)
        row.update(embedding or {})
        return row


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if not df.empty:
        df["request_time"] = pd.to_datetime(df["request_time"], utc=True)
    return df
