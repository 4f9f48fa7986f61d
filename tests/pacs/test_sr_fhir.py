"""SR and FHIR builders without a PACS: the documents are valid, carry the model's numbers and identity, sit in the
source's study, and parse with highdicom, pydicom and dcmtk's dsrdump."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from pipeline.pacs import fhir
from pipeline.pacs.sr import (
    ModelResult,
    Verification,
    build_overlay_sc,
    build_result_sr,
    build_verified_sr,
    device_uid,
    observer_device_uids,
    read_result,
    result_uids,
    to_bytes,
)
from tests.data.helpers import dicom_bytes, xray
from tests.serving.helpers import colour_png

PHI = {"PatientName": "Plantedname^Jane", "PatientBirthDate": "19400229", "AccessionNumber": "ACC9134"}
RESULT = ModelResult("xrayops-cxr", "7", "PNEUMONIA", 0.8123456789, 0.42, True)


def source() -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(dicom_bytes(xray(3), patient_id="MRN-PLANTED-77", phi=PHI)))


def test_device_uid_is_stable_per_model_version_and_valid() -> None:
    uid = device_uid("xrayops-cxr", "7")
    assert uid == device_uid("xrayops-cxr", "7") != device_uid("xrayops-cxr", "8") != device_uid("other", "7")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid.replace(".", "").isdigit()


def test_result_sr_is_in_the_source_study_unverified_and_carries_the_result() -> None:
    src = source()
    sr = build_result_sr(src, RESULT)
    back = pydicom.dcmread(io.BytesIO(to_bytes(sr)))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert back.StudyInstanceUID == src.StudyInstanceUID and back.SeriesInstanceUID != src.SeriesInstanceUID
    assert (back.PatientID, str(back.PatientName), back.AccessionNumber) == ("MRN-PLANTED-77", PHI["PatientName"],
                                                                          "ACC9134")  # the PACS files it by these
    assert back.VerificationFlag == "UNVERIFIED" and back.Modality == "SR"
    ref = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
    got = read_result(back)
    assert got["probability"] == pytest.approx(RESULT.probability, abs=1e-9)
    assert got["threshold"] == pytest.approx(0.42) and got["present"] is True
    assert (got["algorithm_name"], got["algorithm_version"]) == ("xrayops-cxr", "7")
    assert observer_device_uids(back) == {device_uid("xrayops-cxr", "7")}
    assert (back.SeriesInstanceUID, back.SOPInstanceUID) == result_uids(src.StudyInstanceUID, src.SOPInstanceUID,
                                                                        device_uid("xrayops-cxr", "7"))
    absent = read_result(build_result_sr(src, ModelResult("m", "1", "PNEUMONIA", 0.1, 0.42, False)))
    assert absent["present"] is False


def test_result_sr_parses_with_highdicom_and_dsrdump(tmp_path: Path) -> None:
    import highdicom as hd

    path = tmp_path / "sr.dcm"
    path.write_bytes(to_bytes(build_result_sr(source(), RESULT)))
    report = hd.sr.srread(path)
    groups = report.content.get_image_measurement_groups()
    assert len(groups) == 1 and groups[0].get_measurements()[0].value == pytest.approx(RESULT.probability)
    if shutil.which("dsrdump") is None:
        pytest.skip("dcmtk's dsrdump is not installed")
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=30)
    assert dump.returncode == 0, dump.stderr
    assert "Verification Flag   : UNVERIFIED" in dump.stdout and '"Algorithm Version")="7"' in dump.stdout
    assert '(52101004,SCT,"Present")' in dump.stdout and "0.8123456789" in dump.stdout


def test_verified_sr_references_its_predecessor_and_names_the_reviewer() -> None:
    src = source()
    first = pydicom.dcmread(io.BytesIO(to_bytes(build_result_sr(src, RESULT))))
    signed = build_verified_sr(first, src, RESULT, Verification("Reader U1a2b", "Radiology", False, "NORMAL"))
    back = pydicom.dcmread(io.BytesIO(to_bytes(signed)))
    assert back.VerificationFlag == "VERIFIED" and back.PreliminaryFlag == "FINAL"
    observer = back.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "Reader U1a2b^" and observer.VerifyingOrganization == "Radiology"
    assert observer.VerificationDateTime
    pred = back.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == first.SOPInstanceUID != back.SOPInstanceUID
    assert back.SeriesInstanceUID == first.SeriesInstanceUID and back.StudyInstanceUID == src.StudyInstanceUID
    assert read_result(back)["probability"] == pytest.approx(RESULT.probability)  # the model's group is kept
    assert "DISAGREE" in str(back.ContentSequence)


def test_overlay_secondary_capture_sits_in_the_study() -> None:
    src = source()
    sc = build_overlay_sc(src, colour_png(96), RESULT)
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.PhotometricInterpretation == "RGB"
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and "not for diagnosis" in sc.SeriesDescription


def test_fhir_bundle_is_r4_valid_and_carries_no_patient_identifiers(tmp_path: Path) -> None:
    from fhir.resources.R4B.bundle import Bundle

    src = source()
    bundle = fhir.build_bundle(RESULT, request_id="a" * 32, study_uid=src.StudyInstanceUID, sr_uid="2.25.1",
                               issued=datetime(2026, 12, 1, tzinfo=UTC))
    Bundle.model_validate(bundle)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Observation", "DiagnosticReport"] and bundle["type"] == "transaction"
    obs, report = (e["resource"] for e in bundle["entry"])
    assert obs["status"] == report["status"] == "preliminary"
    assert obs["component"][0]["valueQuantity"]["value"] == pytest.approx(RESULT.probability)
    assert obs["valueCodeableConcept"]["coding"][0]["code"] == "52101004"
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{src.StudyInstanceUID}"
    assert report["result"][0]["reference"] == bundle["entry"][0]["fullUrl"]
    text = json.dumps(bundle)
    assert not any(token in text for token in ("MRN-PLANTED-77", "Plantedname", "19400229", "ACC9134"))
    path = fhir.write_bundle(bundle, tmp_path / "outbox", "a" * 32)
    assert json.loads(path.read_text()) == bundle and (path.stat().st_mode & 0o777) == 0o600


def test_fhir_delivery_fails_closed(tmp_path: Path) -> None:
    from tests.serving.helpers import free_port

    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    refused = fhir.deliver(bundle, folder=tmp_path, request_id="b" * 32, url=f"http://127.0.0.1:{free_port()}/fhir",
                           timeout_s=2)
    assert refused.status == "failed" and "cannot reach" in refused.detail and refused.path.is_file()
    none = fhir.deliver(bundle, folder=tmp_path, request_id="c" * 32, url=None, timeout_s=2)
    assert none.status == "not_configured"


def test_fhir_bundle_is_posted_as_fhir_json(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200 if len(received) == 1 else 422)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/fhir/"
        bundle = fhir.build_bundle(RESULT, request_id="d" * 32, study_uid="1.2.3", sr_uid=None,
                                   issued=datetime(2026, 12, 1, tzinfo=UTC))
        ok = fhir.deliver(bundle, folder=tmp_path, request_id="d" * 32, url=url, timeout_s=5)
        refused = fhir.deliver(bundle, folder=tmp_path, request_id="e" * 32, url=url, timeout_s=5)
    finally:
        server.shutdown()
    assert (ok.status, ok.http_status) == ("posted", 200)
    assert (refused.status, refused.http_status) == ("failed", 422) and "HTTP 422" in refused.detail
    path, content_type, body = received[0]
    assert path == "/fhir" and content_type == "application/fhir+json" and json.loads(body) == bundle
