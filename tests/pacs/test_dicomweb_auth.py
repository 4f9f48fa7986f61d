"""pipeline.pacs.dicomweb against an Orthanc that requires HTTP basic auth: refusals and no secret in any log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.errors import PacsError
from pipeline.pacs import PacsAuth, PacsClient
from tests.data.helpers import dicom_bytes, xray
from tests.servers.processes import orthanc_missing, start_orthanc

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_basic_auth_and_no_secret_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reason = orthanc_missing()
    if reason:
        pytest.skip(reason)
    server = start_orthanc(tmp_path, tmp_path / "orthanc", users={"xrayops": "Pw-7c1d-not-logged"})
    try:
        with pytest.raises(PacsError) as info:
            PacsClient(server.dicomweb_url).ping()
        assert info.value.status == 401 and "auth: none" in str(info.value)
        with pytest.raises(PacsError) as info:
            PacsClient(server.dicomweb_url, auth=PacsAuth("xrayops", "wrong")).ping()
        assert info.value.status == 401
        caplog.set_level(logging.DEBUG)
        client = PacsClient(server.dicomweb_url, auth=PacsAuth("xrayops", "Pw-7c1d-not-logged"))
        client.store_instances([dicom_bytes(xray(1), patient_id="AUTH-1")])
        assert len(list(client.iter_instances({"PatientID": "AUTH-1"}))) == 1
        assert "Pw-7c1d-not-logged" not in caplog.text and "Authorization" not in caplog.text
        # urllib3 logs request lines (query included) at DEBUG; the CLI holds it at WARNING (pipeline.runtime)
        assert not [r for r in caplog.records if "AUTH-1" in r.getMessage() and not r.name.startswith("urllib3")]
    finally:
        server.stop()
