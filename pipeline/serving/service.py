"""One prediction, end to end, shared by the API and the clinician UI:
gate → preprocess → compiled inference (+ embedding) → production-log row → optional explanation
(Grad-CAM, Integrated Gradients or SmoothGrad).

Nothing here keeps per-request state on the service object: every call takes the current
:class:`~pipeline.serving.predictor.Predictor` once, so concurrent requests and alias moves cannot
mix model versions.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.data.imaging import DecodedImage
from pipeline.data.policy import AdmissionPolicy, OutOfPolicy
from pipeline.errors import ExplainUnavailable, Rejected
from pipeline.evaluation.attribution import METHODS, AttributionOptions, explain, unknown_method_message
from pipeline.serving.admission import admit
from pipeline.serving.model_store import ModelStore
from pipeline.serving.production_log import LogWriter

logger = logging.getLogger(__name__)


@dataclass
class Explanation:
    heatmap: np.ndarray  # (h, w) in [0, 1]
    overlay_png: bytes
    method: str = "gradcam"


@dataclass
class PredictionResult:
    request_id: str
    probability: float
    probabilities: dict[str, float]
    label: str
    threshold: float | None
    positive_class: str | None
    model_name: str
    model_version: str
    alias: str | None
    engine: str
    latency_ms: float
    image: DecodedImage
    classes: list[str]
    explanation: Explanation | None = None
    predictor: Any = field(default=None, repr=False, compare=False)  # the loaded model that scored (explain with it)


def explain_method(value: str | bool | None) -> str | None:
    """The ``explain`` request parameter as a method name: false/0/no/off/empty → None, true/1/yes/on →
    ``gradcam`` (what ``explain=true`` always meant), else one of :data:`EXPLAIN_CHOICES`.

    Raises:
        ValueError: anything else; the message lists the valid values.
    """
    text = str(value if value is not None else "").strip().lower()
    if text in ("", "false", "0", "no", "off"):
        return None
    if text in ("true", "1", "yes", "on"):
        return "gradcam"
    if text in METHODS:
        return text
    raise ValueError(f"explain={str(value)[:40]!r} is not a known explanation: use one of {', '.join(EXPLAIN_CHOICES)}")


EXPLAIN_CHOICES = ("true", "false", *METHODS)


def clean_view_position(value: str | None) -> str | None:
    """Upper-case alphanumeric view code (PA, AP, LL, …) or None; anything else is dropped."""
    if not value:
        return None
    text = re.sub(r"[^A-Za-z0-9]", "", value).upper()[:12]
    return text or None


class InferenceService:
    """Scores uploads with the store's current model and logs every outcome."""

    def __init__(self, settings: Settings, store: ModelStore, writer: LogWriter) -> None:
        self.settings = settings
        self.store = store
        self.writer = writer
        self.policy = AdmissionPolicy.from_config(settings.data.admission)

    def predict(self, data: bytes, *, request_id: str | None = None, view_position: str | None = None,
                explain: bool | str = False, source: str = "api") -> PredictionResult:
        """Gate, score and log one upload; ``explain``: False, True (Grad-CAM) or a method name.

        Raises:
            ValueError: ``explain`` names no known method.
            NotReady: no model loaded.
            Rejected: the upload failed the input gate (the rejection is logged, reason only).
        """
        started = time.perf_counter()
        method = explain_method(explain)  # an unknown method fails before anything is scored or logged
        request_id = request_id or uuid.uuid4().hex
        predictor = self.store.require()
        try:
            image = admit(data, self.settings.serve, dicom_bit_depth=self.settings.data.ingest.dicom_bit_depth,
                          policy=self.policy)
            view = image.meta.get("view_position") or clean_view_position(view_position)
            if view:  # a declared lateral: the model was not trained on it
                self.policy.check_view(view, "declared view")
        except OutOfPolicy as exc:
            rejected = Rejected("out_of_policy", f"{exc.reason}: {exc.detail}")
            self.log_rejection(request_id, rejected, predictor.version, source)
            raise rejected from None
        except Rejected as exc:
            self.log_rejection(request_id, exc, predictor.version, source)
            raise
        image.meta = {**image.meta, "view_position": view}
        gray = image.gray01()
        x = predictor.preprocess(image, gray)
        scored = predictor.score(x[None])[0]
        row = predictor.log_row(image, scored, request_id=request_id, gray01=gray, source=source)
        self.writer.add({**row, "latency_ms": round((time.perf_counter() - started) * 1000, 3)})  # gate + score
        explanation = explain_image(predictor.model, x, method, self.settings) if method else None
        return PredictionResult(
            request_id=request_id, probability=scored.probability, probabilities=scored.probabilities,
            label=scored.label, threshold=predictor.threshold, positive_class=predictor.positive_class,
            model_name=predictor.model_name, model_version=predictor.version, alias=predictor.alias,
            engine=getattr(predictor.engine, "name", "?"), latency_ms=(time.perf_counter() - started) * 1000,
            image=image, classes=list(predictor.classes), explanation=explanation, predictor=predictor)

    def log_rejection(self, request_id: str, exc: Rejected, model_version: str | None, source: str) -> None:
        self.writer.add_rejection({"request_id": request_id, "request_time": datetime.now(UTC), "source": source,
                                   "model_name": self.settings.registered_model, "model_version": model_version,
                                   "reason": exc.reason, "status": exc.status})


def explain_image(model: Any, x: np.ndarray, method: str = "gradcam", settings: Settings | None = None) -> Explanation:
    """One preprocessed image explained by ``method`` (``pipeline.evaluation.attribution.explain``; IG and
    SmoothGrad use the ``evaluate`` section's steps/samples/σ when ``settings`` is given).

    Raises:
        ValueError: unknown method (the message lists the valid ones).
        ExplainUnavailable: the method cannot run on this model or installation.
    """
    if method not in METHODS:
        raise ValueError(unknown_method_message(method))
    options = AttributionOptions.from_config(settings.evaluate) if settings else AttributionOptions()
    try:
        heatmap, overlay = explain(model, x[None], method, options)
    except Exception as exc:  # noqa: BLE001 - any Keras/TF failure on this model means "no explanation"
        raise ExplainUnavailable(f"{method} failed for this model: {type(exc).__name__}: {str(exc)[:200]}") from None
    heat = np.asarray(heatmap, np.float32)
    return Explanation(heat[0] if heat.ndim == 3 else heat, overlay if isinstance(overlay, bytes) else bytes(overlay),
                       method)
