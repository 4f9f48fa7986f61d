"""pipeline.pacs.dicomweb against a real Orthanc: search, retrieve (bytes unchanged), store, and fail-closed errors."""

from __future__ import annotations

import io

import pydicom
import pytest

from pipeline.errors import ConfigError, PacsError, PacsUnavailable
from pipeline.pacs import InstanceRef, PacsAuth, PacsClient
from tests.data.helpers import PHI, dicom_bytes, xray
from tests.pacs.conftest import Orthanc, instance_count, upload
from tests.servers.processes import free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _study(patient: str, n: int, **kwargs: object) -> list[bytes]:
    """``n`` instances of one study (same Study/Series UID) of ``patient``."""
    first = pydicom.dcmread(io.BytesIO(dicom_bytes(xray(0), patient_id=patient, phi=PHI, **kwargs)))  # type: ignore[arg-type]
    out = []
    for k in range(n):
        ds = pydicom.dcmread(io.BytesIO(dicom_bytes(xray(k), patient_id=patient, phi=PHI, **kwargs)))  # type: ignore[arg-type]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def test_search_page_and_retrieve_bytes_unchanged(orthanc: Orthanc) -> None:
    files = _study("CLIENT-A", 3) + _study("CLIENT-B", 2)
    for data in files:
        upload(orthanc, data)
    client = PacsClient(orthanc.dicomweb_url, page_size=2)  # pages of 2: three requests for study A
    studies = client.search_studies({"PatientID": "CLIENT-A"})
    assert len(studies) == 1
    series = client.search_series(studies[0]["0020000D"]["Value"][0])
    assert len(series) == 1
    refs = list(client.iter_instances({"PatientID": "CLIENT-A"}))
    assert len(refs) == 3 and len({r.sop_uid for r in refs}) == 3
    by_sop = {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID: d for d in files}
    for ref in refs:
        assert client.retrieve_instance_bytes(ref.study_uid, ref.series_uid, ref.sop_uid) == by_sop[ref.sop_uid]
    ds = client.retrieve_instance(refs[0].study_uid, refs[0].series_uid, refs[0].sop_uid)
    assert ds.SOPInstanceUID == refs[0].sop_uid and ds.pixel_array.shape == (64, 64)
    assert {r.sop_uid for r in client.iter_instances({"PatientID": "CLIENT-*"})} == set(by_sop)
    assert client.search_studies({"PatientID": "NOBODY"}) == []


def test_store_instances_by_stow(orthanc: Orthanc) -> None:
    before = instance_count(orthanc)
    data = dicom_bytes(xray(5), patient_id="STOW-1")
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(xray(6), patient_id="STOW-2")))
    with PacsClient(orthanc.dicomweb_url) as client:
        result = client.store_instances([data, ds])
        assert set(result.stored) == {pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID, ds.SOPInstanceUID}
        assert result.failed == ()
        assert instance_count(orthanc) == before + 2
        ref = next(client.iter_instances({"PatientID": "STOW-2"}))
        assert client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid).PatientID == "STOW-2"


def test_missing_instance_is_a_404_pacs_error(orthanc: Orthanc) -> None:
    client = PacsClient(orthanc.dicomweb_url)
    with pytest.raises(PacsError) as info:
        client.retrieve_instance_bytes("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert info.value.status == 404 and not isinstance(info.value, PacsUnavailable)
    with pytest.raises(PacsError, match="not a DICOM UID"):
        client.retrieve_instance_bytes("1.2.3", "../../system", "1.2")
    with pytest.raises(PacsError, match="missing or malformed"):
        InstanceRef.from_json({"0020000D": {"Value": ["1.2"]}})


def test_unreachable_pacs_fails_closed_with_the_password_masked() -> None:
    port = free_port()  # nothing listens there
    client = PacsClient(f"http://alice:s3cr3t-pw@127.0.0.1:{port}/dicom-web", connect_timeout_s=2)
    with pytest.raises(PacsUnavailable) as info:
        client.ping()
    text = f"{info.value} {info.value.hint}"
    assert "s3cr3t-pw" not in text and "alice:***@" in text and "connection refused" in text
    assert "\n" not in str(info.value) and info.value.__cause__ is None
    assert "s3cr3t-pw" not in repr(client)
    with pytest.raises(PacsUnavailable, match="host name not resolved"):
        PacsClient("http://pacs.invalid:8042/dicom-web", connect_timeout_s=2).ping()
    with pytest.raises(PacsError, match="not an http"):
        PacsClient("pacs.example.org/dicom-web")


def test_credentials_come_from_the_environment_by_name() -> None:
    env = {"PACS_U": "alice", "PACS_P": "pw", "PACS_T": "tok"}
    assert PacsAuth.from_env("PACS_U", "PACS_P", None, env).kind == "basic"
    assert PacsAuth.from_env(None, None, "PACS_T", env).kind == "bearer"
    assert PacsAuth.from_env("NOPE_U", "NOPE_P", "NOPE_T", env).kind == "none"
    assert "pw" not in repr(PacsAuth.from_env("PACS_U", "PACS_P", None, env))
    with pytest.raises(ConfigError, match="NOPE_P is not set"):
        PacsAuth.from_env("PACS_U", "NOPE_P", None, env)
    with pytest.raises(ConfigError, match="not both|unset one"):
        PacsAuth.from_env("PACS_U", "PACS_P", "PACS_T", env)
