"""The adjudicator's page of the clinician app: open feedback cases (conflicting, or waiting for more readers)
and a decision per case, stored as an ``adjudication`` record with the adjudicator's pseudonymous id."""

from __future__ import annotations

from typing import Any

import streamlit as st

from pipeline.ui.auth import UiUser

OPEN = ("conflict", "pending")


def open_cases(settings: Any) -> Any:
    """Cases whose label is not decided yet, conflicts first (a DataFrame of :func:`adjudicate` rows)."""
    from pipeline.monitoring.feedback import adjudicate, read_adjudications, read_feedback

    cases = adjudicate(read_feedback(settings.feedback_log), read_adjudications(settings.feedback_log),
                       min_clinicians=settings.monitor.feedback_min_clinicians,
                       adjudicator_decides=settings.monitor.feedback_adjudicator_decides)
    cases = cases[cases["status"].isin(OPEN)]
    return cases.sort_values("status", key=lambda s: s.map(OPEN.index), kind="stable").reset_index(drop=True)


def adjudication_page(settings: Any, user: UiUser) -> None:
    from pipeline.errors import FeedbackError
    from pipeline.monitoring.feedback import IMAGES_DIR, FeedbackRecord, feedback_classes, record_feedback

    if not settings.monitor.feedback_adjudicator_decides:
        st.info("Decisions made here are off (monitor.feedback_adjudicator_decides=false): adjudicate in "
                f"{settings.feedback_log / 'adjudications.csv'}.")
        return
    try:
        cases = open_cases(settings)
    except FeedbackError as exc:
        st.error(f"Feedback cannot be read: {exc}")
        return
    st.caption(f"A case becomes training data when {settings.monitor.feedback_min_clinicians} distinct clinicians "
               "agree on its label, or when an adjudicator decides it here.")
    if cases.empty:
        st.info("No open cases: every case with feedback is agreed or decided.")
        return
    st.dataframe(cases[["request_id", "status", "model_version", "predicted_label", "labels", "clinicians"]],
                 hide_index=True)
    rid = st.selectbox("Case", list(cases["request_id"]), key="adj_case")
    case = cases.set_index("request_id").loc[rid]
    image = settings.feedback_log / IMAGES_DIR / f"{rid}.png"
    if image.is_file():
        st.image(str(image), caption=f"Case {rid} (model v{case['model_version']} said {case['predicted_label']}; "
                 f"clinicians said {case['labels'] or '—'})", width=384)
    classes = list(feedback_classes(settings))
    with st.form("adjudicate"):
        label = st.selectbox("Decided label", classes, key="adj_label")
        submitted = st.form_submit_button("Record decision")
    if submitted:
        record = FeedbackRecord(request_id=rid, model_name=str(case["model_name"]),
                                model_version=str(case["model_version"]), predicted_label=str(case["predicted_label"]),
                                probability=float("nan"), verdict="agree" if label == case["predicted_label"] else
                                "disagree", correct_label=label, user_id=user.user_id, kind="adjudication")
        try:
            record_feedback(settings.feedback_log, record, classes=classes)
            st.success(f"Decision recorded: case {rid} is {label}.")
        except FeedbackError as exc:
            st.error(f"Decision not saved: {exc}" + (f" ({exc.hint})" if exc.hint else ""))
