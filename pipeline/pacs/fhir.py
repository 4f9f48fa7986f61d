"""The model's result as FHIR for the hospital's EHR: a transaction Bundle of one ``Observation`` and one
``DiagnosticReport`` (fhir.resources 8.3, package ``fhir.resources.R4B``).

fhir.resources' top-level package is FHIR R5 (``__fhir_version__`` 5.0.0); EHRs speak R4. ``fhir.resources.R4B``
(4.3.0) is the R4 line: Observation, DiagnosticReport and Bundle have the same elements in R4 (4.0.1) and R4B, so
the JSON validates against both.

What the bundle carries, and where it goes: it is written for the hospital, so it names the imaging study by its
StudyInstanceUID (``DiagnosticReport.imagingStudy`` and ``Observation.derivedFrom``, logical references with
``urn:dicom:uid`` identifiers) and the SR we stored; no patient name or id (the EHR resolves the study to its
patient). The file goes to the outbox folder (``pacs.fhir_dir``, files 0600, named by our request id, never by a
study UID) and, when ``serve.fhir_url`` is set, is POSTed there. The outbox is hospital-bound data like the PACS
itself: it is never logged, copied to MLflow or read by monitoring; our logs name a delivery by request id and the
salted study reference only.

Delivery fails closed: a POST that times out, is refused or answers other than 2xx is reported as ``failed`` with
the reason (one line, logged) and the file stays in the outbox; it is never reported as delivered.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.durable import write_atomic
from pipeline.pacs.sr import SCHEME, ModelResult, device_uid, finding_code

logger = logging.getLogger(__name__)

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
LOCAL_SYSTEM = "urn:xrayops:codes"
_CODE_SYSTEMS = {"SCT": SNOMED, SCHEME: LOCAL_SYSTEM}


@dataclass(frozen=True)
class FhirDelivery:
    """Where the bundle went: ``status`` is ``posted``, ``failed`` or ``not_configured`` (no ``serve.fhir_url``)."""

    path: Path
    status: str
    detail: str = ""
    http_status: int | None = None


def _coding(code: Any) -> dict[str, str]:
    return {"system": _CODE_SYSTEMS.get(code.scheme_designator, LOCAL_SYSTEM), "code": code.value,
            "display": code.meaning}


def _uid_identifier(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID, "value": f"urn:oid:{uid}"}


def build_bundle(result: ModelResult, *, request_id: str, study_uid: str, sr_uid: str | None,
                 issued: datetime) -> dict[str, Any]:
    """A FHIR R4 transaction Bundle (JSON-ready dict) with the Observation and the DiagnosticReport, validated by
    fhir.resources. Resource ids are stable per ``request_id``, so a resend is recognisable."""
    from fhir.resources.R4B.bundle import Bundle

    obs_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'xrayops:{request_id}:observation')}"
    report_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'xrayops:{request_id}:report')}"
    finding = finding_code(result.positive_class)
    present = {"system": SNOMED, "code": "52101004", "display": "Present"} if result.present else \
        {"system": SNOMED, "code": "2667000", "display": "Absent"}
    study_ref = {"identifier": _uid_identifier(study_uid), "type": "ImagingStudy"}
    model = f"{result.model_name} v{result.model_version}"
    observation = {
        "resourceType": "Observation", "status": "preliminary",
        "identifier": [{"system": "urn:xrayops:request", "value": request_id}],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "imaging", "display": "Imaging"}]}],
        "code": {"coding": [_coding(finding)], "text": f"{finding.meaning} (AI model output)"},
        "issued": issued.isoformat(),
        "valueCodeableConcept": {"coding": [present], "text": "Present" if result.present else "Absent"},
        "method": {"text": f"AI model {model}, threshold {result.threshold:.6g}; not verified by a clinician"},
        "device": {"identifier": _uid_identifier(device_uid(result.model_name, result.model_version)),
                   "display": f"xrayops {model}"},
        "derivedFrom": [study_ref],
        "component": [
            {"code": {"coding": [{"system": LOCAL_SYSTEM, "code": "AI-PROBABILITY",
                                  "display": "Model probability of finding"}]},
             "valueQuantity": {"value": float(result.probability), "unit": "1", "system": UCUM, "code": "1"}},
            {"code": {"coding": [{"system": LOCAL_SYSTEM, "code": "AI-THRESHOLD",
                                  "display": "Model operating threshold"}]},
             "valueQuantity": {"value": float(result.threshold), "unit": "1", "system": UCUM, "code": "1"}}],
    }
    report = {
        "resourceType": "DiagnosticReport", "status": "preliminary",
        "identifier": [{"system": "urn:xrayops:request", "value": request_id},
                       *([_uid_identifier(sr_uid)] if sr_uid else [])],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": "AI chest X-ray classification"},
        "issued": issued.isoformat(), "imagingStudy": [study_ref], "result": [{"reference": obs_url}],
        "conclusion": (f"AI ({model}): {finding.meaning} {'present' if result.present else 'absent'} "
                       f"(probability {result.probability:.3f}, threshold {result.threshold:.3f}). "
                       "Preliminary, not verified by a clinician."),
    }
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": obs_url, "resource": observation, "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": report_url, "resource": report, "request": {"method": "POST", "url": "DiagnosticReport"}}]}
    return json.loads(Bundle.model_validate(bundle).model_dump_json(exclude_none=True))


def write_bundle(bundle: dict[str, Any], folder: Path, request_id: str) -> Path:
    """``<folder>/<request_id>.json`` (mode 0600), written whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_atomic(folder / f"{request_id}.json", json.dumps(bundle, indent=2, sort_keys=True).encode(),
                        mode=0o600)


def post_bundle(bundle: dict[str, Any], url: str, timeout_s: float) -> tuple[str, str, int | None]:
    """POST the transaction bundle to the FHIR base ``url``: (``posted`` | ``failed``, reason, HTTP status)."""
    import httpx

    try:
        resp = httpx.post(url.rstrip("/"), content=json.dumps(bundle),
                          headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
                          timeout=timeout_s)
    except httpx.TimeoutException:
        return "failed", f"no answer within {timeout_s:g} s (pacs.fhir_timeout_s)", None
    except httpx.HTTPError as exc:
        return "failed", f"cannot reach the FHIR server: {type(exc).__name__}", None
    if 200 <= resp.status_code < 300:
        return "posted", f"HTTP {resp.status_code}", resp.status_code
    return "failed", f"the FHIR server answered HTTP {resp.status_code}", resp.status_code


def deliver(bundle: dict[str, Any], *, folder: Path, request_id: str, url: str | None,
            timeout_s: float) -> FhirDelivery:
    """Write the bundle to the outbox and POST it when ``url`` is set; the outcome is logged by request id."""
    path = write_bundle(bundle, folder, request_id)
    if not url:
        return FhirDelivery(path, "not_configured", "serve.fhir_url is not set: written to the outbox only")
    status, detail, code = post_bundle(bundle, url, timeout_s)
    if status == "posted":
        logger.info("FHIR bundle of request %s posted (%s)", request_id, detail)
    else:
        logger.warning("FHIR bundle of request %s not delivered: %s; it stays in the outbox", request_id, detail)
    return FhirDelivery(path, status, detail, code)
