"""Clinician page: sign off the model's results that went back to the PACS.

``render_pacs_review(settings, user_id)`` is self-contained (the app wires it in as a page): it lists the results
awaiting review from our de-identified records (salted study reference, model version, probability, label — the
reviewer finds the study in the PACS viewer, where our UNVERIFIED report sits in it), and for the chosen result
takes agree / disagree + the correct label + an optional comment. Submitting stores the VERIFIED report in the PACS
and the feedback record (:func:`pipeline.pacs.signoff.sign_off`). ``user_id`` is the signed-in user's pseudonymous id
(``U`` + 16 hex digits); it is what the report names as the verifying observer and what the feedback store keeps.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from pipeline.errors import XrayopsError
from pipeline.pacs.signoff import PendingResult, Review, awaiting_review, sign_off


def _classes(settings: Any, version: str) -> list[str]:
    from pipeline.pacs.signoff import _classes as version_classes

    return version_classes(settings, version)[0]


def _table(pending: list[PendingResult]) -> list[dict[str, Any]]:
    return [{"study": p.study_ref, "model": f"{p.model_name} v{p.model_version}",
             "probability": round(p.probability, 3), "label": p.label, "threshold": round(p.threshold, 3),
             "processed (UTC)": f"{p.processed_at:%Y-%m-%d %H:%M}"}
            for p in pending]


def render_pacs_review(settings: Any, user_id: str) -> None:
    """The PACS sign-off page for the signed-in user ``user_id`` (pseudonymous id)."""
    st.header("PACS results awaiting review")
    st.caption("Model results stored in the PACS as UNVERIFIED reports. Signing off stores a VERIFIED report in "
               "the same study and records your verdict as feedback.")
    try:
        pending = awaiting_review(settings)
    except (XrayopsError, OSError) as exc:
        st.error(f"Cannot read the PACS results: {exc}")
        return
    if not pending:
        st.info("Nothing awaits review.")
        return
    st.dataframe(_table(pending), hide_index=True, width="stretch")
    by_label = {f"{p.study_ref} — {p.label} (p={p.probability:.2f}, {p.model_name} v{p.model_version})": p
                for p in pending}
    chosen = by_label[st.selectbox("Result", list(by_label), key="pacs_review_result")]
    try:
        classes = _classes(settings, chosen.model_version)
    except XrayopsError as exc:
        st.error(f"Cannot read the classes of {chosen.model_name} v{chosen.model_version}: {exc}")
        return
    with st.form("pacs_review_form", clear_on_submit=True):
        verdict = st.radio("Your verdict", ["agree", "disagree"], horizontal=True, key="pacs_review_verdict")
        others = [c for c in classes if c != chosen.label] or classes
        label = st.selectbox("Correct label (when you disagree)", others, key="pacs_review_label")
        comment = st.text_input("Comment (optional, no patient details)", max_chars=500, key="pacs_review_comment")
        submitted = st.form_submit_button("Sign off")
    if submitted:
        _submit(settings, Review(chosen.request_id, user_id, verdict,
                                 chosen.label if verdict == "agree" else label, comment))


def _submit(settings: Any, review: Review) -> None:
    from pipeline.pacs.process import pacs_client

    try:
        with pacs_client(settings) as client:
            done = sign_off(settings, client, review)
    except XrayopsError as exc:
        st.error(f"Not signed off: {' '.join(str(exc).split())}")
        return
    st.success(f"Signed off study {done['study_ref']} ({done['verdict']}, {done['label']}): VERIFIED report stored.")
