"""Request/response models of the API (they make the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from pipeline.errors import REJECTION_REASONS as REASONS
from pipeline.serving.trust import REASONS as TRUST_REASONS


class ModelRef(BaseModel):
    name: str = Field(description="Registered model name.", examples=["xrayops-synthetic"])
    version: str = Field(description="Registry version that produced the answer.", examples=["3"])
    alias: str | None = Field(description="Alias the version was loaded through.", examples=["champion"])


class ExplanationOut(BaseModel):
    overlay_png_base64: str = Field(description="Explanation heatmap blended over the image, PNG, base64.")
    method: str = Field("gradcam", description="Explanation method: gradcam, integrated_gradients or smoothgrad.")


class PredictionOut(BaseModel):
    """The model's answer for one image."""

    request_id: str = Field(description="Id of this request (also in the X-Request-ID header and the production "
                                        "log); quote it when giving feedback.", examples=["5f0c1e0e9b8d4a40b6c1"])
    probability: float = Field(ge=0, le=1, description="Probability of the positive class (binary models) or of "
                                                       "the top class (multi-class).", examples=[0.83])
    label: str = Field(description="Decision at the version's locked operating threshold.", examples=["PNEUMONIA"])
    threshold: float | None = Field(description="Operating threshold locked at registration (binary models).",
                                    examples=[0.41])
    positive_class: str | None = Field(description="Class the probability refers to.", examples=["PNEUMONIA"])
    probabilities: dict[str, float] = Field(description="Probability of every class.",
                                            examples=[{"NORMAL": 0.17, "PNEUMONIA": 0.83}])
    model: ModelRef
    latency_ms: float = Field(description="Server-side time for gate, inference and logging.", examples=[24.1])
    explanation: ExplanationOut | None = Field(None, description="Present when `explain` asks for one (true, "
                                               "gradcam, integrated_gradients, smoothgrad).")


class ErrorBody(BaseModel):
    reason: str = Field(description="Stable reason code: " + ", ".join(
        [*REASONS, "missing_api_key", "invalid_api_key", "invalid_request", "model_not_ready", *TRUST_REASONS,
         "explain_unavailable", "unknown_explain_method"]), examples=["colour_photograph"])
    detail: str = Field(description="What was found and what was expected.",
                        examples=["3-channel colour image; expected a grayscale radiograph"])
    request_id: str | None = Field(None, description="Id of the request (rejections are logged under it).")


class ErrorOut(BaseModel):
    """Every error has this shape."""

    error: ErrorBody


class MetricOut(BaseModel):
    value: float | None = Field(description="Test-set value at registration.")
    ci: list[float | None] | None = Field(None, description="Patient-level bootstrap confidence interval.")


class ModelInfo(BaseModel):
    """The model currently served."""

    name: str = Field(examples=["xrayops-synthetic"])
    version: str = Field(examples=["3"])
    alias: str = Field(examples=["champion"])
    threshold: float | None = Field(description="Locked operating threshold.", examples=[0.41])
    threshold_policy: str | None = Field(None, examples=["sensitivity_floor"])
    classes: list[str] = Field(examples=[["NORMAL", "PNEUMONIA"]])
    positive_class: str | None = Field(examples=["PNEUMONIA"])
    input_size: int = Field(description="Side of the square model input in pixels.", examples=[128])
    input_channels: int = Field(examples=[1])
    engine: str = Field(description="Compiled inference engine: onnx or tf.", examples=["onnx"])
    embedding_components: int = Field(description="Embedding PCs logged per prediction.", examples=[4])
    metrics: dict[str, MetricOut] = Field(description="Headline test metrics recorded on the version.")
    run_id: str | None = Field(description="MLflow training run of the version.")
    loaded_at: float | None = Field(description="Unix time the version was loaded.")
    reason: str | None = Field(None, description="Why the served version is not verified as the one holding the "
                               "alias right now (it is the last verified version): " + ", ".join(TRUST_REASONS)
                               + "; null when it is.", examples=[None, "alias_missing"])
    detail: str | None = Field(None, description="The same in words.")


class RefreshOut(BaseModel):
    changed: bool = Field(description="True when the alias had moved and the new version was loaded.")
    model: ModelInfo | None


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    ready: bool = Field(description="A model is served and the last registry check verified it is the gated "
                                    "version holding the alias.")
    serving: bool = Field(description="Predictions are answered (while not ready: with the last verified version).")
    alias: str
    model_name: str
    version: str | None = Field(description="The served version.")
    engine: str | None
    reason: str | None = Field(None, description="Stable code when not ready: model_not_ready, "
                               + ", ".join(TRUST_REASONS) + ".", examples=["champion_not_gated"])
    detail: str | None = Field(None, description="Why, in words (no internal error text), and what is served.")


def error_example(reason: str, detail: str) -> dict[str, Any]:
    return {"error": {"reason": reason, "detail": detail, "request_id": "5f0c1e0e9b8d4a40b6c1"}}
