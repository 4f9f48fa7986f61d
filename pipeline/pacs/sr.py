"""DICOM Structured Reports of a model's result, written back to the PACS (highdicom 0.28).

The report is a Comprehensive SR holding a TID 1500 Measurement Report:

- observation context: the model as a *device observer* whose UID is derived from the registered model's name and
  version (:func:`device_uid`: the same model version always signs with the same UID, which is how a study
  already processed by it is recognised, :func:`observer_device_uids`);
- one measurement group (TID 1501) with the algorithm identification (registered model name and version, the
  locked threshold as parameter), the probability of the positive class and the locked threshold as numbers, a
  qualitative evaluation "<finding> present/absent" at that threshold, and the source image (SOP Class/Instance UID)
  it was computed on;
- ``VerificationFlag`` UNVERIFIED, ``PreliminaryFlag`` PRELIMINARY: a machine result nobody has checked.

It lives in the *same study* as the source image and copies the source's patient and study modules: these are the
PACS's own identifiers, needed for the PACS to file the report with its study. They go back to the PACS only;
nothing here logs them. :func:`build_verified_sr` makes the sign-off version: VERIFIED, FINAL, a
VerifyingObserverSequence (the reviewer's pseudonymous display name, organisation, date-time), the clinician's
verdict as a second measurement group, and the predecessor (the UNVERIFIED report) referenced.

Codes: the finding ``PNEUMONIA`` is SNOMED CT 233604007 "Pneumonia", present/absent are SNOMED CT 52101004 /
2667000, the procedure is SNOMED CT 399208008 "Plain chest X-ray". DICOM has no standard concept for "a model's
probability", so the probability, the threshold and the review verdict use the private coding scheme
:data:`SCHEME` (``99`` prefix, PS3.16 §8.2).
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines name the source dataset's UIDs

SCHEME = "99XRAYOPS"
MANUFACTURER = "xrayops"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
_NAMESPACE = uuid.UUID("0b5c6a1e-7c1f-4e55-9a53-8a3f1f0c2d17")  # fixed: the UIDs below must never change

DEVICE_OBSERVER_UID = "121012"  # DCM "Device Observer UID"
FINDINGS: dict[str, Code] = {"PNEUMONIA": Code("233604007", "SCT", "Pneumonia")}
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = Code("AI-PROBABILITY", SCHEME, "Model probability of finding")
THRESHOLD = Code("AI-THRESHOLD", SCHEME, "Model operating threshold")
AGREEMENT = Code("AI-AGREEMENT", SCHEME, "Reviewer agreement with model result")
AGREE = Code("AGREE", SCHEME, "Agrees")
DISAGREE = Code("DISAGREE", SCHEME, "Disagrees")
NO_UNITS = Code("1", "UCUM", "no units")

# The patient and study modules (and the source image's identity) the report inherits from the source image.
_EVIDENCE_KEYS = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                  "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                  "ReferringPhysicianName", "StudyDescription", "SeriesInstanceUID", "SOPClassUID",
                  "SOPInstanceUID", "Modality")
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
           "AccessionNumber", "ReferringPhysicianName")


@dataclass(frozen=True)
class ModelResult:
    """What the model said about one image (no identifiers)."""

    model_name: str
    model_version: str
    positive_class: str
    probability: float
    threshold: float
    present: bool  # the served label is the positive class (probability >= the locked threshold)


@dataclass(frozen=True)
class Verification:
    """A clinician's sign-off: ``observer_name`` is the reviewer's pseudonymous display name, never a login."""

    observer_name: str
    organisation: str
    agrees: bool
    label: str  # the reviewer's label (one of the model's classes)


def _uid(*parts: str) -> str:
    """A ``2.25.<decimal UUID>`` UID (PS3.5 §B.2), the same for the same parts."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(10).join(parts)).int}"


def device_uid(model_name: str, model_version: str) -> str:
    """The device observer UID of one registered model version."""
    return _uid("device", model_name, str(model_version))


def result_uids(study_uid: str, source_sop_uid: str, device: str) -> tuple[str, str]:
    """(series, instance) UIDs of the result SR of ``device`` on one source image: stable, so storing it twice
    stores one instance."""
    return _uid("sr-series", study_uid, device), _uid("sr", study_uid, source_sop_uid, device)


def finding_code(positive_class: str) -> Code:
    """The coded finding of a positive class (SNOMED CT where known, else :data:`SCHEME`)."""
    return FINDINGS.get(positive_class.upper(), Code(positive_class.upper()[:16], SCHEME, positive_class))


def evidence(source: Dataset) -> Dataset:
    """The source image's identity, patient and study modules only (no pixels); absent type-2 elements empty."""
    ds = Dataset()
    for key in _EVIDENCE_KEYS:
        if key in source and source[key].value is not None:
            setattr(ds, key, source[key].value)
    for key in _TYPE_2:
        if key not in ds:
            setattr(ds, key, "")
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not ds.get(key):
            raise ValueError(f"the source image has no {key}: it cannot be referenced from a report")
    return ds


def _device_context(result: ModelResult) -> Any:
    import highdicom as hd

    return hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(result.model_name, result.model_version),
            name=f"{MANUFACTURER} {result.model_name} v{result.model_version}"[:64], manufacturer_name=MANUFACTURER,
            model_name=result.model_name[:64], serial_number=str(result.model_version)[:64]))


def _source_image(source: Dataset) -> Any:
    import highdicom as hd

    return hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), str(source.SOPInstanceUID))


def _model_group(source: Dataset, result: ModelResult) -> Any:
    """TID 1501 group: algorithm, probability, threshold, finding present/absent, source image."""
    import highdicom as hd

    algorithm = hd.sr.AlgorithmIdentification(name=result.model_name[:64], version=str(result.model_version),
                                               parameters=[f"threshold={result.threshold:.6g}"],
                                               manufacturer=MANUFACTURER)
    measurements = [hd.sr.Measurement(name=PROBABILITY, value=float(result.probability), unit=NO_UNITS,
                                      algorithm_id=algorithm),
                    hd.sr.Measurement(name=THRESHOLD, value=float(result.threshold), unit=NO_UNITS)]
    finding = hd.sr.QualitativeEvaluation(finding_code(result.positive_class), PRESENT if result.present else ABSENT)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid("tracking", source.SOPInstanceUID),
                                                     identifier="AI classification"),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=[finding],
        source_images=[_source_image(source)])


def _review_group(source: Dataset, result: ModelResult, verification: Verification) -> Any:
    """TID 1501 group: the reviewer's finding and whether they agree with the model."""
    import highdicom as hd

    present = verification.label.upper() == result.positive_class.upper()
    evaluations = [hd.sr.QualitativeEvaluation(finding_code(result.positive_class), PRESENT if present else ABSENT),
                   hd.sr.QualitativeEvaluation(AGREEMENT, AGREE if verification.agrees else DISAGREE)]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid("review", source.SOPInstanceUID),
                                                     identifier="Clinician review"),
        qualitative_evaluations=evaluations,
        source_images=[_source_image(source)])


def person_name(display_name: str) -> str:
    """A display name as a DICOM person name (one component ends with ``^``; ``^``/``=``/``\\`` removed)."""
    text = "".join(c for c in display_name if c.isprintable() and c not in "^=\\").strip()[:60] or "reviewer"
    return f"{text}^"


def build_result_sr(source: Dataset, result: ModelResult, *, institution: str | None = None) -> Any:
    """The UNVERIFIED Comprehensive SR of ``result`` on ``source`` (a retrieved image or its metadata).

    Returns:
        ``highdicom.sr.ComprehensiveSR`` in the source's study, with stable series/instance UIDs.
    """
    import highdicom as hd

    ref = evidence(source)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device_context(result)),
        procedure_reported=CHEST_XRAY, imaging_measurements=[_model_group(ref, result)])
    series, instance = result_uids(ref.StudyInstanceUID, ref.SOPInstanceUID,
                                   device_uid(result.model_name, result.model_version))
    sr = hd.sr.ComprehensiveSR(
        evidence=[ref], content=report, series_instance_uid=series, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, institution_name=institution,
        series_description=f"AI result {result.model_name} v{result.model_version} (unverified)"[:64])
    return sr


def build_verified_sr(predecessor: Dataset, source: Dataset, result: ModelResult, verification: Verification, *,
                      institution: str | None = None) -> Any:
    """The VERIFIED successor of an UNVERIFIED result SR: the model's group unchanged, the reviewer's group,
    a person observer, VerifyingObserverSequence and the predecessor referenced.

    Returns:
        ``highdicom.sr.ComprehensiveSR`` in the same study and series as ``predecessor``, FINAL.
    """
    import highdicom as hd

    ref = evidence(source)
    name = person_name(verification.observer_name)
    person = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121006", "DCM", "Person"),
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=name, organization_name=verification.organisation[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=person,
                                                     observer_device_context=_device_context(result)),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=[_model_group(ref, result), _review_group(ref, result, verification)])
    return hd.sr.ComprehensiveSR(
        evidence=[ref], content=report, series_instance_uid=predecessor.SeriesInstanceUID,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=_uid("verified", predecessor.SOPInstanceUID),
        instance_number=2, manufacturer=MANUFACTURER, is_complete=True, is_final=True, is_verified=True,
        verifying_observer_name=name, verifying_organization=verification.organisation[:64],
        institution_name=institution, previous_versions=[predecessor],
        series_description=f"AI result {result.model_name} v{result.model_version} (verified)"[:64])


def build_overlay_sc(source: Dataset, overlay_png: bytes, result: ModelResult) -> Any:
    """A Secondary Capture of the explanation overlay (RGB) in the source's study, labelled not for diagnosis."""
    import highdicom as hd
    from PIL import Image

    ref = evidence(source)
    with Image.open(io.BytesIO(overlay_png)) as img:
        pixels = np.asarray(img.convert("RGB"), np.uint8)
    device = device_uid(result.model_name, result.model_version)
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=_uid("sc-series", ref.StudyInstanceUID, device),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=_uid("sc", ref.StudyInstanceUID, ref.SOPInstanceUID, device),
        instance_number=1, manufacturer=MANUFACTURER, patient_orientation=("L", "F"),
        series_description=f"AI explanation {result.model_name} v{result.model_version} - not for diagnosis"[:64])


def to_bytes(dataset: Dataset) -> bytes:
    """A Part-10 file of ``dataset`` (for STOW-RS or a test)."""
    buf = io.BytesIO()
    dataset.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _content_items(items: Any) -> Iterator[Dataset]:
    for item in items or []:
        yield item
        yield from _content_items(item.get("ContentSequence"))


def _concept(item: Dataset) -> tuple[str, str]:
    seq = item.get("ConceptNameCodeSequence")
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)) if seq else ("", "")


def observer_device_uids(dataset: Dataset) -> set[str]:
    """Device Observer UIDs anywhere in an SR's content tree (a retrieved SR or its metadata)."""
    return {str(item.UID) for item in _content_items(dataset.get("ContentSequence"))
            if _concept(item) == (DEVICE_OBSERVER_UID, "DCM") and item.get("UID")}


def read_result(dataset: Dataset) -> dict[str, Any]:
    """The model's numbers back from a result SR: probability, threshold, finding present, algorithm name/version,
    device UIDs, verification flag (for checks and the review page)."""
    out: dict[str, Any] = {"verification": str(dataset.get("VerificationFlag", "")),
                           "device_uids": sorted(observer_device_uids(dataset))}
    for item in _content_items(dataset.get("ContentSequence")):
        concept = _concept(item)
        if concept == (PROBABILITY.value, SCHEME) and "probability" not in out:
            out["probability"] = float(item.MeasuredValueSequence[0].NumericValue)
        elif concept == (THRESHOLD.value, SCHEME) and "threshold" not in out:
            out["threshold"] = float(item.MeasuredValueSequence[0].NumericValue)
        elif concept in (("111001", "DCM"), ("111003", "DCM")) and item.get("TextValue"):  # algorithm name/version
            out.setdefault("algorithm_name" if concept[0] == "111001" else "algorithm_version", str(item.TextValue))
        elif item.get("ValueType") == "CODE" and item.get("ConceptCodeSequence") and "present" not in out \
                and concept[1] in ("SCT", SCHEME) and concept != (AGREEMENT.value, SCHEME):
            out["present"] = str(item.ConceptCodeSequence[0].CodeValue) == PRESENT.value
    return out

