"""Clinician app (Streamlit): upload an X-ray, see the model's answer and an explanation, give feedback.

Run with ``xrayops ui``. The app scores through the same service as the API (input gate,
compiled inference, production log) and stores feedback append-only with the request id
and model version (no patient data; comments are limited and flagged as identifier-free).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import streamlit as st

from pipeline.ui.render import SETS_ENV, blend, display_gray, ui_settings


@st.cache_resource(show_spinner="Loading the served model…")
def get_service(params_env: str, sets_env: str) -> Any:
    """One inference service per (params, overrides), shared by all sessions of this process."""
    from pipeline.runtime import quiet_tools
    from pipeline.serving.model_store import ModelStore
    from pipeline.serving.production_log import LogWriter
    from pipeline.serving.service import InferenceService

    quiet_tools()
    settings = ui_settings()
    store = ModelStore(settings).start()
    return InferenceService(settings, store, LogWriter(settings.production_log, 0))


def score(service: Any, data: bytes) -> Any:
    """Score an upload once per distinct file; the result lives in the session."""
    from pipeline.errors import NotReady, Rejected

    digest = hashlib.sha256(data).hexdigest()
    if st.session_state.get("digest") == digest:
        return st.session_state["result"]
    try:
        result = service.predict(data, source="ui")
    except Rejected as exc:
        st.error(f"Image rejected ({exc.reason}): {exc.detail}")
        return None
    except NotReady as exc:
        st.error(f"No model available: {exc}")
        return None
    st.session_state.update(digest=digest, result=result, explanation=None, feedback_saved=None)
    return result


def show_result(result: Any) -> None:
    positive = result.positive_class or result.label
    c1, c2, c3 = st.columns(3)
    c1.metric(f"Probability of {positive}", f"{result.probability:.1%}")
    c2.metric("Decision", result.label,
              help=f"at the version's locked operating threshold {result.threshold}" if result.threshold else None)
    c3.metric("Model", f"{result.model_name} v{result.model_version}")
    st.caption(f"Request id `{result.request_id}` · alias {result.alias} · {result.engine} engine · "
               f"{result.latency_ms:.0f} ms. Decision support only: the radiologist decides.")


def show_images(result: Any) -> None:
    from pipeline.errors import ExplainUnavailable
    from pipeline.evaluation.attribution import METHOD_TITLES
    from pipeline.serving.service import explain_image

    gray = display_gray(result.image)
    left, right = st.columns(2)
    left.image(gray, caption="Uploaded image", clamp=True)
    method = right.selectbox("Explanation", list(METHOD_TITLES), format_func=METHOD_TITLES.get, key="explain_method")
    explained = st.session_state.get("explanation") or {}  # method → Explanation or the reason it is unavailable
    if method not in explained:
        service = st.session_state["service"]
        predictor = service.store.current
        try:
            x = predictor.preprocess(result.image)
            explained[method] = explain_image(predictor.model, x, method, service.settings)
        except ExplainUnavailable as exc:
            explained[method] = str(exc)
        st.session_state["explanation"] = explained
    explanation, label = explained[method], METHOD_TITLES[method]
    if isinstance(explanation, str):
        right.info(f"{label} unavailable: {explanation}")
        return
    opacity = right.slider(f"{label} opacity", 0.0, 1.0, 0.45, 0.05, key="opacity")
    right.image(blend(gray, explanation.heatmap, opacity), caption=f"{label}: regions that drove the score")



def feedback_form(service: Any, result: Any) -> None:
    from pipeline.errors import FeedbackError
    from pipeline.monitoring.feedback import FeedbackRecord, record_feedback

    st.subheader("Your assessment")
    with st.form("feedback"):
        verdict = st.radio("Do you agree with the model's decision?", ["agree", "disagree"], horizontal=True,
                           key="verdict")
        others = [c for c in result.classes if c != result.label] or result.classes
        correct = st.selectbox("Correct label (when you disagree)", others, key="correct_label")
        comment = st.text_area("Comment (optional — no patient names, ids or dates)", max_chars=500, key="comment")
        submitted = st.form_submit_button("Submit feedback")
    if submitted:
        label = result.label if verdict == "agree" else correct
        record = FeedbackRecord(request_id=result.request_id, model_name=result.model_name,
                                model_version=result.model_version, predicted_label=result.label,
                                probability=result.probability, verdict=verdict, correct_label=label,
                                comment=comment or "")
        try:  # the label must be one of the served model's classes (it becomes a dataset folder name)
            record_feedback(service.settings.feedback_log, record, image=result.image, classes=result.classes)
            st.session_state["feedback_saved"] = f"{verdict}: {label}"
        except FeedbackError as exc:
            st.error(f"Feedback not saved: {exc}" + (f" ({exc.hint})" if exc.hint else ""))
    if st.session_state.get("feedback_saved"):
        st.success(f"Feedback saved ({st.session_state['feedback_saved']}) for request {result.request_id}.")


def main() -> None:
    st.set_page_config(page_title="xrayops — chest X-ray review", layout="wide")
    st.title("Chest X-ray review")
    service = get_service(os.environ.get("XRAYOPS_PARAMS", ""), os.environ.get(SETS_ENV, ""))
    st.session_state["service"] = service
    if service.store.current is None:
        st.warning(f"No model is being served: {service.store.detail}")
        if st.button("Check the registry again"):
            service.store.refresh()
        return
    if service.store.reason is not None:
        st.warning(f"The served model is not verified as the current one ({service.store.reason}): "
                   f"{service.store.detail}")
    upload = st.file_uploader("Chest X-ray (PNG, JPEG or DICOM; the format is read from the content)", key="upload")
    if upload is None:
        st.info("Upload a radiograph to see the model's assessment.")
        return
    result = score(service, upload.getvalue())
    if result is None:
        return
    show_result(result)
    show_images(result)
    feedback_form(service, result)


if __name__ == "__main__":
    main()
