"""A real PACS for the hospital-integration tests: Orthanc with its DICOMweb plugin, on loopback.

``orthanc`` is module-scoped (start ≈ 1 s; the tests of one module share it and use distinct
study UIDs); ``fresh_orthanc`` is a function-scoped one for tests that need an empty archive.
``upload`` stores instances over the REST API (``POST /instances``), ``storescu`` over DICOM C-STORE
(dcmtk), the two ways a modality or a gateway sends images to a PACS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.servers.processes import Orthanc, orthanc_missing, start_orthanc

__all__ = ["Orthanc", "instance_count", "storescu", "upload"]


def _start(tmp: Path) -> Iterator[Orthanc]:
    reason = orthanc_missing()
    if reason:
        pytest.skip(reason)
    server = start_orthanc(tmp, tmp / "orthanc")
    try:
        yield server
    finally:
        server.stop()
        assert not server.group.alive(), "Orthanc outlived its test"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the module (DICOMweb at ``orthanc.dicomweb_url``, C-STORE at ``orthanc.dicom_port``)."""
    yield from _start(tmp_path_factory.mktemp("orthanc"))


@pytest.fixture
def fresh_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """An empty Orthanc of its own for one test."""
    yield from _start(tmp_path_factory.mktemp("orthanc-fresh"))


def upload(orthanc: Orthanc, data: bytes | Path | str) -> dict[str, str]:
    """Store one DICOM instance (bytes or a file path) with ``POST /instances``; Orthanc's answer
    (``ID``, ``ParentStudy``, ``Status`` = ``Success`` or ``AlreadyStored``). Raises on a rejected file."""
    body = data if isinstance(data, bytes) else Path(data).read_bytes()
    req = urllib.request.Request(f"{orthanc.http_url}/instances", data=body, method="POST",
                                 headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer: dict[str, str] = json.loads(resp.read())
    return answer


def storescu(orthanc: Orthanc, paths: Iterable[Path | str], *, calling_aet: str = "XRAYOPS_TEST") -> None:
    """Send files to Orthanc over DICOM C-STORE with dcmtk's ``storescu`` (skips when dcmtk is absent)."""
    exe = shutil.which("storescu")
    if exe is None:
        pytest.skip("dcmtk's storescu is not installed (apt-get install dcmtk)")
    files = [str(p) for p in paths]
    done = subprocess.run([exe, "-aet", calling_aet, "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port),
                           *files], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def instance_count(orthanc: Orthanc) -> int:
    """How many instances Orthanc stores (``GET /statistics``)."""
    with urllib.request.urlopen(f"{orthanc.http_url}/statistics", timeout=10) as resp:
        return int(json.loads(resp.read())["CountInstances"])
