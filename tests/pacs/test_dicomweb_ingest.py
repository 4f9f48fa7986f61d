"""``xrayops ingest --source dicomweb`` against a real Orthanc.

The same PHI-bearing CR instances are ingested from the PACS and from a folder: the manifests must
match row for row (same de-identified image ids and pseudonymised patients, same labels) and the
accounting must be the same (excluded by policy, quarantined per reason). A pull interrupted by a
PACS outage is resumed fetching only what is missing; an unreachable PACS is one line, exit 2; the
planted patient names and ids reach neither the dataset nor the logs.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import pytest

from pipeline.data.sources.dicomweb import INSTANCES_FILE, TEMP_SUFFIX, DicomwebSource, cache_path
from pipeline.errors import PacsUnavailable
from pipeline.pacs import PacsClient
from tests.conftest import REPO, TINY, write_params
from tests.data.helpers import PHI, dicom_bytes, edited, find_tokens, xray
from tests.pacs.conftest import Orthanc, storescu, upload
from tests.servers.processes import start_orthanc

pytestmark = [pytest.mark.server, pytest.mark.slow]

SALT = "pacs-test-salt-not-secret-0123456789abcdef"
PATIENT_IDS = [f"MRN-QZ{n:04d}" for n in range(7)]  # planted: must not appear in any output
KEYS = ["image_id", "path", "sha256", "patient_id", "label", "label_index", "width", "height", "phash",
        "view_position", "modality", "photometric"]


@dataclass
class Instance:
    name: str
    data: bytes
    sop: str
    study: str


def _cr(index: int, patient: str, study: str | None = None, **tags: Any) -> bytes:
    """A CR chest PA of synthetic patient ``index`` carrying planted PHI, optionally in study ``study``."""
    data = dicom_bytes(xray(index, positive=index % 2 == 1), patient_id=patient, phi=PHI, modality="CR")
    return edited(data, **({"StudyInstanceUID": study} if study else {}), **tags)


def _cohort() -> tuple[list[Instance], list[tuple[str, str]], list[tuple[str, str]]]:
    """Instances + labels keyed as a PACS user would (study rows, SOP rows) + the same labels by SOP only
    (what the ``dicom`` folder source reads).

    Two studies of two images each labelled by StudyInstanceUID; single images labelled by SOP ("0"/"1"
    through the label map); a lateral (excluded by policy); a file whose header promises more pixels than it
    holds (quarantined: truncated); one without a row (missing_label); one with a label outside the map
    (unknown_label); a CSV row naming an instance the PACS does not have.
    """
    study_a, study_b = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = [
        ("a1", _cr(0, PATIENT_IDS[0], study_a)), ("a2", _cr(2, PATIENT_IDS[0], study_a)),
        ("b1", _cr(1, PATIENT_IDS[1], study_b)), ("b2", _cr(3, PATIENT_IDS[1], study_b)),
        ("c", _cr(4, PATIENT_IDS[2])), ("d", _cr(5, PATIENT_IDS[3])),
        ("lateral", _cr(6, PATIENT_IDS[4], ViewPosition="LL")),
        ("corrupt", _cr(8, PATIENT_IDS[5], Rows=128)),
        ("nolabel", _cr(10, PATIENT_IDS[6])),
        ("unknown", _cr(12, PATIENT_IDS[6])),
    ]
    instances = []
    for name, data in files:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        instances.append(Instance(name, data, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)))
    by = {i.name: i for i in instances}
    pacs_rows = [("StudyInstanceUID", study_a, "PNEUMONIA"), ("StudyInstanceUID", study_b, "NORMAL"),
                 ("SOPInstanceUID", by["c"].sop, "1"), ("SOPInstanceUID", by["d"].sop, "0"),
                 ("SOPInstanceUID", by["lateral"].sop, "NORMAL"), ("SOPInstanceUID", by["corrupt"].sop, "NORMAL"),
                 ("SOPInstanceUID", by["unknown"].sop, "MAYBE"),
                 ("SOPInstanceUID", pydicom.uid.generate_uid(), "NORMAL")]  # names nothing in the PACS
    pacs_csv = [(sop, study) for sop, study in
                ((v if k == "SOPInstanceUID" else "", v if k == "StudyInstanceUID" else "") for k, v, _ in pacs_rows)]
    labels = [label for *_, label in pacs_rows]
    study_label = {study_a: "PNEUMONIA", study_b: "NORMAL"}
    sop_rows = [(i.sop, study_label[i.study]) for i in instances if i.study in study_label]
    sop_rows += [(sop, label) for (k, sop, label) in pacs_rows if k == "SOPInstanceUID"]
    return instances, [(f"{s},{st}", lab) for (s, st), lab in zip(pacs_csv, labels, strict=True)], sop_rows


def _write_csv(path: Path, header: str, rows: list[tuple[str, str]]) -> Path:
    path.write_text(header + "\n" + "".join(f"{key},{label}\n" for key, label in rows))
    return path


def _xrayops(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XRAYOPS_PSEUDONYM_SALT": SALT, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--params", str(root / "params.yaml"),
                           "--no-dvc"], capture_output=True, text=True, cwd=root, env=env, timeout=300)


def _manifest(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet").sort_values("image_id").reset_index(drop=True)


def test_pacs_ingest_equals_folder_ingest_and_leaks_no_phi(fresh_orthanc: Orthanc, tmp_path: Path) -> None:
    write_params(tmp_path, TINY)
    instances, pacs_rows, sop_rows = _cohort()
    folder = tmp_path / "export"
    folder.mkdir()
    for inst in instances:
        (folder / f"{inst.name}.dcm").write_bytes(inst.data)
    for inst in instances:
        upload(fresh_orthanc, inst.data)  # REST: Orthanc keeps the bytes, so image ids (sha256) match too
    pacs_csv = _write_csv(tmp_path / "pacs_labels.csv", "SOPInstanceUID,StudyInstanceUID,label", pacs_rows)
    folder_csv = _write_csv(tmp_path / "folder_labels.csv", "SOPInstanceUID,label", sop_rows)

    pacs = _xrayops(tmp_path, "ingest", "--source", "dicomweb", "--url", fresh_orthanc.dicomweb_url,
                    "--labels", str(pacs_csv), "--input", str(tmp_path / "pull"), "--out", str(tmp_path / "ds-pacs"),
                    "--study-filter", "ModalitiesInStudy=CR")
    assert pacs.returncode == 0, pacs.stderr
    local = _xrayops(tmp_path, "ingest", "--source", "dicom", "--input", str(folder), "--labels", str(folder_csv),
                     "--out", str(tmp_path / "ds-folder"))
    assert local.returncode == 0, local.stderr

    m_pacs, m_folder = _manifest(tmp_path / "ds-pacs"), _manifest(tmp_path / "ds-folder")
    assert len(m_pacs) == 6  # a1 a2 b1 b2 c d
    pd.testing.assert_frame_equal(m_pacs.drop(columns=["source"]), m_folder.drop(columns=["source"]))
    assert set(m_pacs["source"]) == {"dicomweb"} and set(m_folder["source"]) == {"dicom"}
    assert sorted(m_pacs["label"]) == ["NORMAL"] * 3 + ["PNEUMONIA"] * 3
    s_pacs = json.loads((tmp_path / "ds-pacs" / "ingest_summary.json").read_text())
    s_folder = json.loads((tmp_path / "ds-folder" / "ingest_summary.json").read_text())
    for key in ("files_seen", "ingested", "quarantined", "quarantine_reasons", "excluded_by_policy", "patients",
                "excluded_by_label_mapping"):
        assert s_pacs[key] == s_folder[key], key
    assert s_pacs["quarantine_reasons"] == {"missing_label": 1, "truncated": 1, "unknown_label": 1}
    assert sum(s_pacs["excluded_by_policy"].values()) == 1
    assert s_pacs["dicomweb"] == {"instances": 10, "studies": 8, "study_filter_keys": ["ModalitiesInStudy"]}
    assert s_pacs["labels_csv"]["rows"] == 8 and s_pacs["labels_csv"]["rows_without_file"] == 1
    assert s_pacs["labels_csv"]["files_without_row"] == 1  # "nolabel": exact, the UIDs came from the PACS
    assert "10 fetched" in " ".join((pacs.stdout + pacs.stderr).split())

    tokens = [*PATIENT_IDS, *PHI.values(), *(v.split("^")[0] for v in PHI.values() if "^" in v)]
    assert find_tokens([tmp_path / "ds-pacs"], tokens) == {}
    logs = pacs.stdout + pacs.stderr
    assert [t for t in tokens if t.lower() in logs.lower()] == []
    assert not [i.sop for i in instances if i.sop in logs]  # UIDs stay out of the logs too


def test_instances_sent_by_c_store_ingest_to_the_same_pixels(fresh_orthanc: Orthanc, tmp_path: Path) -> None:
    """A modality sends by C-STORE, which carries no file meta header: Orthanc writes its own, so the pulled
    bytes (and the image ids, their sha256) differ from the sender's file, while everything read from the
    data set (pixels, features, pHash, pseudonymised patient, label, view) is the same."""
    write_params(tmp_path, TINY)
    folder = tmp_path / "export"
    folder.mkdir()
    files = [folder / f"{n}.dcm" for n in range(3)]
    for n, path in enumerate(files):
        path.write_bytes(_cr(n, PATIENT_IDS[n]))
    storescu(fresh_orthanc, files)
    rows = [(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), "NORMAL") for p in files]
    labels = _write_csv(tmp_path / "labels.csv", "SOPInstanceUID,label", rows)
    for args in (["--source", "dicomweb", "--url", fresh_orthanc.dicomweb_url, "--input", str(tmp_path / "pull"),
                  "--out", str(tmp_path / "ds-pacs")],
                 ["--source", "dicom", "--input", str(folder), "--out", str(tmp_path / "ds-folder")]):
        done = _xrayops(tmp_path, "ingest", "--labels", str(labels), *args)
        assert done.returncode == 0, done.stderr
    ids = ["image_id", "path", "sha256", "source"]
    m_pacs = _manifest(tmp_path / "ds-pacs").drop(columns=ids).sort_values("phash").reset_index(drop=True)
    m_folder = _manifest(tmp_path / "ds-folder").drop(columns=ids).sort_values("phash").reset_index(drop=True)
    assert len(m_pacs) == 3
    pd.testing.assert_frame_equal(m_pacs, m_folder)


class OutageClient(PacsClient):
    """A real client that stops the real PACS right after its ``stop_after``-th retrieve (a PACS outage
    mid-pull); counts what it fetched."""

    def __init__(self, *args: Any, server: Orthanc | None = None, stop_after: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server, self.stop_after, self.fetched = server, stop_after, []

    def retrieve_instance_bytes(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        data = super().retrieve_instance_bytes(study_uid, series_uid, sop_uid)
        self.fetched.append(sop_uid)
        if self.server is not None and len(self.fetched) == self.stop_after:
            self.server.stop()
        return data


def test_pull_interrupted_by_an_outage_resumes_with_only_the_missing(tmp_path: Path) -> None:
    from pipeline.config import load_settings
    from pipeline.data.ingest import run_ingest

    storage = tmp_path / "orthanc"
    server = start_orthanc(tmp_path, storage)
    try:
        instances = [_cr(i, PATIENT_IDS[i % 3]) for i in range(6)]
        for data in instances:
            upload(server, data)
        settings = load_settings(write_params(tmp_path, [*TINY, "data.source=dicomweb", "data.version_with_dvc=false",
                                                         f"data.input={tmp_path / 'pull'}"]))
        cfg = settings.data.dicomweb
        first = OutageClient(server.dicomweb_url, server=server, stop_after=3)
        with pytest.raises(PacsUnavailable, match="not reachable"):
            DicomwebSource(cfg, client_factory=lambda _cfg: first, show_progress=False).prepare(settings.raw_dir)
        pulled = sorted(settings.raw_dir.rglob("*.dcm"))
        assert len(pulled) == 3 and len(first.fetched) == 3
        assert not list(settings.raw_dir.rglob(f"*{TEMP_SUFFIX}")) and not (settings.raw_dir / INSTANCES_FILE).exists()
        stamps = {p: p.stat().st_mtime_ns for p in pulled}
    finally:
        server.stop()

    server = start_orthanc(tmp_path, storage)  # the PACS is back (new ports, same archive)
    try:
        second = OutageClient(server.dicomweb_url)
        counts = DicomwebSource(cfg, client_factory=lambda _cfg: second, show_progress=False).prepare(settings.raw_dir)
        assert counts == {"instances": 6, "fetched": 3, "cached": 3, "bytes_fetched": counts["bytes_fetched"]}
        assert set(second.fetched).isdisjoint(first.fetched) and len(second.fetched) == 3
        assert {p: p.stat().st_mtime_ns for p in pulled} == stamps  # the first three were not rewritten
        by_sop = {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID: d for d in instances}
        for sop, data in by_sop.items():
            study = pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID
            assert cache_path(settings.raw_dir, study, sop).read_bytes() == data
        third = OutageClient(server.dicomweb_url)
        assert DicomwebSource(cfg, client_factory=lambda _cfg: third, show_progress=False).prepare(
            settings.raw_dir)["fetched"] == 0 and third.fetched == []
        labels = _write_csv(tmp_path / "labels.csv", "SOPInstanceUID,label", [(s, "NORMAL") for s in by_sop])
        summary = run_ingest(load_settings(tmp_path / "params.yaml", [f"data.labels={labels}"]), show_progress=False)
        assert summary["ingested"] == 6 and summary["files_seen"] == 6
    finally:
        server.stop()


def test_a_killed_pull_leaves_only_complete_files_and_resumes(fresh_orthanc: Orthanc, tmp_path: Path) -> None:
    """SIGKILL `xrayops ingest` mid-pull: every file under its final name is complete (written under a temporary
    name, then renamed), and the rerun fetches exactly the instances that are missing."""
    import re
    import signal
    import time

    write_params(tmp_path, TINY)
    files = {}
    for n in range(40):
        data = dicom_bytes(xray(n % 4, side=512), patient_id=PATIENT_IDS[n % 7], modality="CR")
        files[str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = data
        upload(fresh_orthanc, data)
    labels = _write_csv(tmp_path / "labels.csv", "SOPInstanceUID,label", [(s, "NORMAL") for s in files])
    pull = tmp_path / "pull"
    args = [sys.executable, "-m", "pipeline.cli", "ingest", "--source", "dicomweb", "--url", fresh_orthanc.dicomweb_url,
            "--labels", str(labels), "--input", str(pull), "--out", str(tmp_path / "ds"), "--no-dvc",
            "--params", str(tmp_path / "params.yaml")]
    env = {**os.environ, "XRAYOPS_PSEUDONYM_SALT": SALT, "COLUMNS": "200"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(pull.rglob("*.dcm"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = sorted(pull.rglob("*.dcm"))
    assert 3 <= len(done) < len(files), f"the pull was not interrupted mid-way ({len(done)} of {len(files)})"
    for path in done:
        assert path.read_bytes() == files[path.stem], "a file under its final name is incomplete"
    assert not (pull / INSTANCES_FILE).exists()

    rerun = _xrayops(tmp_path, "ingest", "--source", "dicomweb", "--url", fresh_orthanc.dicomweb_url, "--labels",
                     str(labels), "--input", str(pull), "--out", str(tmp_path / "ds"))
    assert rerun.returncode == 0, rerun.stderr
    log = " ".join((rerun.stdout + rerun.stderr).split())
    match = re.search(r"(\d+) fetched .* (\d+) already in the pull cache", log)
    assert match, log
    assert (int(match.group(1)), int(match.group(2))) == (len(files) - len(done), len(done))
    assert not list(pull.rglob(f"*{TEMP_SUFFIX}"))
    assert json.loads((tmp_path / "ds" / "ingest_summary.json").read_text())["ingested"] == len(files)


def test_unreachable_pacs_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from tests.servers.processes import free_port

    write_params(tmp_path, TINY)
    labels = _write_csv(tmp_path / "labels.csv", "SOPInstanceUID,label", [("1.2.3", "NORMAL")])
    url = f"http://radiology:Pw-never-shown@127.0.0.1:{free_port()}/dicom-web"
    done = _xrayops(tmp_path, "ingest", "--source", "dicomweb", "--url", url, "--labels", str(labels),
                    "--input", str(tmp_path / "pull"), "--out", str(tmp_path / "ds"))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: PACS (DICOMweb) at http://radiology:***@127.0.0.1:")
    assert "is not reachable (connection refused)" in lines[0]
    assert lines[1].startswith("hint: ") and len(lines) == 2, done.stderr
    assert "Pw-never-shown" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "ds" / "manifest.parquet").exists()


def test_cli_help_documents_the_pacs_options() -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest", "--help"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert "--study-filter" in done.stdout and "--url" in done.stdout
