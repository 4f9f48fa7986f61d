"""Clinician sign-off of PACS results: the work list, and the VERIFIED report + feedback record of a review.

:func:`awaiting_review` lists results whose UNVERIFIED SR is in the PACS and nobody has signed off, from our own
de-identified records (request id, salted study reference, model, probability, label; no patient data, no UIDs).

:func:`sign_off` takes a reviewer's verdict (agree / disagree + the correct label) and:

1. checks it (the label one of the model version's classes, the reviewer's pseudonymous id) before anything is
   written;
2. reads the source image and our UNVERIFIED SR back from the PACS (their UIDs are in the link store,
   :mod:`pipeline.pacs.records`), and stores the VERIFIED successor SR in the same study and series
   (VerifyingObserverSequence with the reviewer's pseudonymous name and ``pacs.organisation``, the predecessor
   referenced);
3. records the verdict in the feedback store (:func:`pipeline.monitoring.feedback.record_feedback`, ``source=pacs``,
   with the image's de-identified pixels: decoded by the API's input gate, no header), so PACS cases become
   training data like UI cases;
4. records the sign-off and deletes the link: a result is signed off once.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.config import Settings
from pipeline.data.policy import AdmissionPolicy
from pipeline.errors import FeedbackError, PacsError
from pipeline.monitoring.feedback import FeedbackRecord, check_label, check_user_id, record_feedback
from pipeline.pacs import records
from pipeline.pacs.dicomweb import PacsClient
from pipeline.pacs.process import SR_STORED
from pipeline.pacs.sr import ModelResult, Verification, build_verified_sr, read_result
from pipeline.serving.admission import admit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingResult:
    """A PACS result waiting for a clinician (de-identified)."""

    request_id: str
    study_ref: str
    model_name: str
    model_version: str
    probability: float
    label: str
    threshold: float
    processed_at: datetime


@dataclass(frozen=True)
class Review:
    """A reviewer's verdict. ``user_id`` is the signed-in user's pseudonymous id (``U`` + 16 hex digits);
    ``display_name`` what the report shows as the verifying observer (default: the pseudonymous id)."""

    request_id: str
    user_id: str
    verdict: str  # agree | disagree
    label: str
    comment: str = ""
    display_name: str | None = None


def awaiting_review(settings: Settings) -> list[PendingResult]:
    """Results with a stored UNVERIFIED SR that are not signed off yet, newest first."""
    df = records.read_records(settings)
    if df.empty:
        return []
    signed = set(df.loc[df["event"] == "signed_off", "request_id"])
    done = df[(df["event"] == "processed") & (df["status"] == SR_STORED) & ~df["request_id"].isin(signed)]
    done = done.drop_duplicates("request_id", keep="last").sort_values("processed_at", ascending=False)
    return [PendingResult(r.request_id, r.study_ref, r.model_name, str(r.model_version), float(r.probability),
                          r.label, float(r.threshold), r.processed_at.to_pydatetime())
            for r in done.itertuples() if records.load_link(settings, r.request_id) is not None]


def _classes(settings: Settings, version: str) -> tuple[list[str], str]:
    """The classes and the positive class of a registered version (its lineage tags)."""
    from pipeline.registry.contract import VersionTags
    from pipeline.registry.read import get_version

    tags = VersionTags.from_version(get_version(settings, version))
    _, _, classes = tags.input_shape(f"{settings.registered_model} v{version}")
    return list(classes), tags.positive_class or classes[-1]


def sign_off(settings: Settings, client: PacsClient, review: Review) -> dict[str, Any]:
    """Store the VERIFIED SR of a reviewed result and record the feedback (see the module docstring).

    Returns:
        De-identified summary: request id, study reference, verdict, label, the verified SR stored.

    Raises:
        FeedbackError: not awaiting review, a bad verdict/label/user id (nothing written).
        PacsError: the PACS could not be read or refused the report (no feedback recorded).
    """
    pending = {p.request_id: p for p in awaiting_review(settings)}
    result = pending.get(review.request_id)
    link = records.load_link(settings, review.request_id)
    if result is None or link is None:
        raise FeedbackError(f"result {str(review.request_id)[:40]!r} is not awaiting review (unknown, not stored "
                            "in the PACS, or already signed off)")
    classes, positive = _classes(settings, result.model_version)
    check_user_id(review.user_id, required=True)
    check_label(review.label, classes, "correct label")
    if review.verdict not in ("agree", "disagree"):
        raise FeedbackError(f"verdict must be 'agree' or 'disagree', got {review.verdict!r}")
    if review.verdict == "agree" and review.label != result.label:
        raise FeedbackError("an 'agree' verdict must keep the model's label")

    source_bytes = client.retrieve_instance_bytes(link.study_uid, link.source_series_uid, link.source_sop_uid)
    predecessor = client.retrieve_instance(link.study_uid, link.sr_series_uid, link.sr_sop_uid)
    import pydicom

    source = pydicom.dcmread(io.BytesIO(source_bytes), stop_before_pixels=True, force=True)
    stored_numbers = read_result(predecessor)
    model = ModelResult(result.model_name, result.model_version, positive,
                        float(stored_numbers.get("probability", result.probability)), result.threshold,
                        result.label == positive)
    verification = Verification(review.display_name or review.user_id, settings.pacs.organisation,
                                review.verdict == "agree", review.label)
    verified = build_verified_sr(predecessor, source, model, verification,
                                 institution=settings.pacs.institution_name)
    stored = client.store_instances([verified], study_uid=link.study_uid)
    if str(verified.SOPInstanceUID) not in stored.stored:
        raise PacsError("the PACS did not store the verified SR (STOW-RS listed it as failed)")

    image = admit(source_bytes, settings.serve, dicom_bit_depth=settings.data.ingest.dicom_bit_depth,
                  policy=AdmissionPolicy.from_config(settings.data.admission))
    record_feedback(settings.feedback_log, FeedbackRecord(
        request_id=result.request_id, model_name=result.model_name, model_version=result.model_version,
        predicted_label=result.label, probability=result.probability, verdict=review.verdict,  # type: ignore[arg-type]
        correct_label=review.label, comment=review.comment, source="pacs", user_id=review.user_id), image,
        classes=classes)
    records.append_record(settings, {"processed_at": datetime.now(UTC), "event": "signed_off",
                                     "request_id": result.request_id, "study_ref": result.study_ref,
                                     "status": "verified", "model_name": result.model_name,
                                     "model_version": result.model_version, "verdict": review.verdict,
                                     "label": review.label, "user_id": review.user_id})
    records.drop_link(settings, result.request_id)
    logger.info("study %s: result %s signed off (%s, %s) by %s; VERIFIED SR stored", result.study_ref,
                result.request_id, review.verdict, review.label, review.user_id)
    return {"request_id": result.request_id, "study_ref": result.study_ref, "verdict": review.verdict,
            "label": review.label, "verified_sr_stored": True}
