"""Clinician app (Streamlit): sign in, upload an X-ray, see the model's answer and an explanation, give feedback.

Run with ``xrayops ui``. People sign in first (:mod:`pipeline.ui.login`; ``ui.auth``); what they see
follows their role: clinicians review X-rays and give feedback, adjudicators also resolve
disagreements, reviewers are pointed at the promotion approval. The app scores through the same
service as the API (input gate, compiled inference, production log); the score, the explanation and
the model name/version/threshold shown all come from the one loaded model that scored. Feedback is
stored append-only with the request id, model version and the user's pseudonymous id (never a name,
no patient data; comments are limited and flagged as identifier-free).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any

import streamlit as st

from pipeline.ui.adjudication import adjudication_page
from pipeline.ui.auth import UiUser
from pipeline.ui.login import auth_plan, sign_out_button, signed_in_user
from pipeline.ui.render import SETS_ENV, blend, display_gray, ui_settings

PACS_PAGE = "pipeline.ui.pacs_review"  # optional page module: render_pacs_review(settings, user_id)


@st.cache_resource(show_spinner=False)
def get_settings(params_env: str, sets_env: str) -> Any:
    return ui_settings()


@st.cache_resource(show_spinner="Loading the served model…")
def get_service(params_env: str, sets_env: str) -> Any:
    """One inference service per (params, overrides), shared by all sessions of this process."""
    from pipeline.runtime import import_tensorflow_quietly, quiet_tools
    from pipeline.serving.model_store import ModelStore
    from pipeline.serving.production_log import LogWriter
    from pipeline.serving.service import InferenceService

    quiet_tools()
    import_tensorflow_quietly()  # no CUDA/oneDNN start-up noise in the Streamlit process's log on CPU hosts
    settings = ui_settings()
    store = ModelStore(settings).start()
    return InferenceService(settings, store, LogWriter(settings.production_log, 0))


def score(service: Any, data: bytes) -> Any:
    """Score an upload once per distinct file; the result lives in the session."""
    from pipeline.errors import REJECTION_REASONS, NotReady, Rejected

    digest = hashlib.sha256(data).hexdigest()
    if st.session_state.get("digest") == digest:
        return st.session_state["result"]
    try:
        result = service.predict(data, source="ui")
    except Rejected as exc:
        meaning = REJECTION_REASONS.get(exc.reason, (0, ""))[1]
        st.error(f"Image rejected by the input gate — {exc.reason}: {exc.detail}"
                 + (f" ({meaning})" if meaning else ""))
        return None
    except NotReady as exc:
        st.error(f"No model available: {exc}")
        return None
    st.session_state.update(digest=digest, result=result, explanation=None, feedback_saved=None)
    return result


def model_banner(service: Any) -> None:
    """The model now served: name, version, locked threshold (before anything is uploaded)."""
    predictor = service.store.current
    threshold = f"{predictor.threshold:.3f}" if predictor.threshold is not None else "none (argmax)"
    st.caption(f"Served model **{predictor.model_name} v{predictor.version}** (alias {predictor.alias}) · locked "
               f"operating threshold **{threshold}**")


def show_result(result: Any) -> None:
    positive = result.positive_class or result.label
    c1, c2, c3 = st.columns(3)
    c1.metric(f"Probability of {positive}", f"{result.probability:.1%}")
    c2.metric("Decision", result.label)
    c3.metric("Locked threshold", f"{result.threshold:.3f}" if result.threshold is not None else "argmax",
              help="the version's operating threshold, fixed when it was registered")
    st.markdown(f"Model **{result.model_name} v{result.model_version}** (alias {result.alias}) · request "
                f"`{result.request_id}` · {result.engine} engine · {result.latency_ms:.0f} ms")
    st.caption("Score, explanation and version come from the same loaded model. "
               "Decision support only: the radiologist decides.")


def show_images(result: Any) -> None:
    from pipeline.errors import ExplainUnavailable
    from pipeline.evaluation.attribution import METHOD_TITLES
    from pipeline.serving.service import explain_image

    gray = display_gray(result.image)
    left, right = st.columns(2)
    left.image(gray, caption="Uploaded image", clamp=True, width="stretch", alt="the uploaded radiograph")
    method = right.selectbox("Explanation", list(METHOD_TITLES), format_func=METHOD_TITLES.get, key="explain_method")
    explained = st.session_state.get("explanation") or {}  # method → Explanation or the reason it is unavailable
    if method not in explained:
        predictor = result.predictor  # the model that scored, not whatever the store holds now
        try:
            x = predictor.preprocess(result.image)
            explained[method] = explain_image(predictor.model, x, method, st.session_state["service"].settings)
        except ExplainUnavailable as exc:
            explained[method] = str(exc)
        st.session_state["explanation"] = explained
    explanation, label = explained[method], METHOD_TITLES[method]
    if isinstance(explanation, str):
        right.info(f"{label} unavailable: {explanation}")
        return
    opacity = right.slider(f"{label} opacity", 0.0, 1.0, 0.45, 0.05, key="opacity")
    right.image(blend(gray, explanation.heatmap, opacity), width="stretch", alt=f"{label} overlay",
                caption=f"{label} of {result.model_name} v{result.model_version}: regions that drove the score")


def feedback_form(service: Any, result: Any, user: UiUser) -> None:
    from pipeline.errors import FeedbackError
    from pipeline.monitoring.feedback import FeedbackRecord, record_feedback

    st.subheader("Your assessment")
    if user.user_id is None:
        st.caption("No sign-in (ui.auth=none): your feedback is stored but never counts as a clinician's opinion.")
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
                                comment=comment or "", user_id=user.user_id)
        try:  # the label must be one of the served model's classes (it becomes a dataset folder name)
            record_feedback(service.settings.feedback_log, record, image=result.image, classes=result.classes)
            st.session_state["feedback_saved"] = f"{verdict}: {label}"
        except FeedbackError as exc:
            st.error(f"Feedback not saved: {exc}" + (f" ({exc.hint})" if exc.hint else ""))
    if st.session_state.get("feedback_saved"):
        st.success(f"Feedback saved ({st.session_state['feedback_saved']}) for request {result.request_id}.")


def review_page(service: Any, user: UiUser) -> None:
    if service.store.current is None:
        st.warning(f"No model is being served: {service.store.detail}")
        if st.button("Check the registry again"):
            service.store.refresh()
        return
    if service.store.reason is not None:
        st.warning(f"The served model is not verified as the current one ({service.store.reason}): "
                   f"{service.store.detail}")
    model_banner(service)
    upload = st.file_uploader("Chest X-ray (PNG, JPEG or DICOM; the format is read from the content)", key="upload")
    if upload is None:
        st.info("Upload a radiograph to see the model's assessment.")
        return
    result = score(service, upload.getvalue())
    if result is None:
        return
    show_result(result)
    show_images(result)
    if user.can("feedback"):
        feedback_form(service, result, user)


def pacs_page(settings: Any, user: UiUser) -> None:
    """PACS results awaiting the clinician's sign-off (pipeline/ui/pacs_review.py, imported only when present)."""
    from pipeline.ui.pacs_review import render_pacs_review  # type: ignore[import-not-found, unused-ignore]

    render_pacs_review(settings, user.user_id)


def main() -> None:
    st.set_page_config(page_title="xrayops — chest X-ray review", layout="wide")
    st.title("Chest X-ray review")
    keys = (os.environ.get("XRAYOPS_PARAMS", ""), os.environ.get(SETS_ENV, ""))
    settings = get_settings(*keys)
    plan = auth_plan(settings)
    if plan is None:
        return
    user = signed_in_user(settings, plan)
    if user is None:
        return
    sign_out_button(plan, user)
    pages: list[tuple[str, Any]] = []
    if user.can("predict"):
        service = get_service(*keys)
        st.session_state["service"] = service
        pages.append(("Review an X-ray", lambda: review_page(service, user)))
        if user.user_id is not None and importlib.util.find_spec(PACS_PAGE) is not None:  # sign-off needs an id
            pages.append(("PACS results", lambda: pacs_page(settings, user)))
    if user.can("adjudicate"):
        pages.append(("Resolve disagreements", lambda: adjudication_page(settings, user)))
    if user.can("review"):
        pages.append(("Promotions", lambda: st.info("Approve or reject a gated version with "
                                                    "`xrayops registry approve VERSION --reviewer YOU`; the model "
                                                    "card and evidence pack of each version are in the registry.")))
    for tab, (_, render) in zip(st.tabs([name for name, _ in pages]), pages, strict=True):
        with tab:
            render()


if __name__ == "__main__":
    main()
