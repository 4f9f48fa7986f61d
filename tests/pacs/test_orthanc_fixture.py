"""The PACS test fixture itself: Orthanc starts, accepts instances by REST and by C-STORE, serves DICOMweb."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.data.helpers import write_dicom
from tests.pacs.conftest import Orthanc, instance_count, storescu, upload

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _qido(orthanc: Orthanc, query: str) -> list[dict[str, object]]:
    req = urllib.request.Request(f"{orthanc.dicomweb_url}/{query}", headers={"Accept": "application/dicom+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
    return json.loads(body) if body else []


def test_rest_upload_and_storescu_reach_dicomweb(fresh_orthanc: Orthanc, tmp_path: Path) -> None:
    a = write_dicom(tmp_path / "a.dcm", 0, patient_id="FIXTURE-A")
    b = write_dicom(tmp_path / "b.dcm", 1, patient_id="FIXTURE-B")
    assert instance_count(fresh_orthanc) == 0
    assert upload(fresh_orthanc, a)["Status"] == "Success"
    assert upload(fresh_orthanc, a.read_bytes())["Status"] == "AlreadyStored"
    storescu(fresh_orthanc, [b])
    assert instance_count(fresh_orthanc) == 2
    studies = _qido(fresh_orthanc, "studies?PatientID=FIXTURE-B")
    assert len(studies) == 1
    assert studies[0]["00100020"]["Value"] == ["FIXTURE-B"]  # type: ignore[index]


def test_http_is_refused_to_non_local_clients_by_config(fresh_orthanc: Orthanc) -> None:
    cfg = json.loads((fresh_orthanc.storage_dir / "orthanc.json").read_text())
    assert cfg["RemoteAccessAllowed"] is False and cfg["AuthenticationEnabled"] is False
    assert cfg["DicomWeb"]["Enable"] is True
