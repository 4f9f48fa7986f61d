"""A study from a real Orthanc through the tiny champion and back as an SR in the same study.

Studies are sent with dcmtk's ``storescu`` (C-STORE, as a modality would) and carry planted PHI; the SR is found
again over QIDO-RS, parsed by dcmtk's ``dsrdump`` and by highdicom, and its probability is the API's for the same
file. Nothing identifying reaches our logs, records, production log or MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import Settings, with_overrides
from pipeline.pacs import records
from pipeline.pacs.dicomweb import PacsClient
from pipeline.pacs.sr import device_uid, read_result
from pipeline.serving import production_log
from tests.data.helpers import PHI, dicom_bytes, edited, find_tokens, xray
from tests.pacs.conftest import Orthanc, storescu

pytestmark = [pytest.mark.server, pytest.mark.slow]

MRN = "MRNQZ40917"
TOKENS = [MRN, *PHI.values(), "Zyxqvist", "Henrietta"]


def send_study(orthanc: Orthanc, folder: Path, index: int, views: tuple[str, ...] = ("PA",), side: int = 64,
               modality: str = "CR", study: str | None = None, study_date: str = "20261201", **tags: str) -> str:
    """A PHI-bearing study (one instance per view, ``tags`` set on each) sent over C-STORE; its StudyInstanceUID."""
    study, series = study or generate_uid(), generate_uid()
    paths = []
    for i, view in enumerate(views):
        data = dicom_bytes(xray(index + i, side=side), patient_id=MRN, phi=PHI, view=view, modality=modality)
        data = edited(data, StudyInstanceUID=study, SeriesInstanceUID=series, SeriesNumber=1, InstanceNumber=i + 1,
                      StudyDate=study_date, StudyTime="101500", StudyID="1", **tags)
        paths.append(folder / f"s{index}-{i}-{series[-6:]}.dcm")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        paths[-1].write_bytes(data)
    storescu(orthanc, paths)
    return study


def pacs_settings(champion: Settings, tmp: Path) -> tuple[Settings, list[str]]:
    sets = [f"paths.production_log={tmp / 'production-log'}", f"pacs.state_dir={tmp / 'pacs'}",
            "serve.engine=onnx"]
    return with_overrides(champion, sets), sets


def cli(champion: Settings, sets: list[str], *args: str) -> tuple[int, str]:
    argv = [*args, "--params", str(champion.root / "params.yaml")]
    for s in sets:
        argv += ["--set", s]
    result = CliRunner().invoke(app, argv)
    return result.exit_code, result.output


def sr_instances(client: PacsClient, study: str) -> list[dict]:
    return [i for i in client.search_instances(study, fields=["00080060"])
            if (i.get("00080060") or {}).get("Value") == ["SR"]]


def test_process_stores_an_sr_in_the_study_equal_to_the_api(orthanc: Orthanc, champion_project: Settings,
                                                             tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import highdicom as hd

    from pipeline.serving.model_store import ModelStore
    from pipeline.serving.production_log import LogWriter
    from pipeline.serving.service import InferenceService

    caplog.set_level(logging.DEBUG)
    settings, sets = pacs_settings(champion_project, tmp_path)
    study = send_study(orthanc, tmp_path / "in", 11, views=("LL", "PA"))  # the lateral is skipped
    started = time.perf_counter()
    code, out = cli(champion_project, sets, "pacs", "process", "--url", orthanc.dicomweb_url, "--study", study)
    took = time.perf_counter() - started
    assert code == 0, out
    assert "SR stored" in out and study not in out

    client = PacsClient(orthanc.dicomweb_url)
    found = sr_instances(client, study)
    assert len(found) == 1
    uids = [(i["0020000E"]["Value"][0], i["00080018"]["Value"][0]) for i in found]
    data = client.retrieve_instance_bytes(study, *uids[0])
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    report = hd.sr.srread(path)
    assert report.StudyInstanceUID == study and report.VerificationFlag == "UNVERIFIED"
    got = read_result(report)

    store = ModelStore(settings)
    store.refresh()
    predictor = store.require()
    assert (got["algorithm_name"], got["algorithm_version"]) == (predictor.model_name, predictor.version)
    assert got["device_uids"] == [device_uid(predictor.model_name, predictor.version)]
    pa = next((tmp_path / "in").glob("s11-1-*.dcm"))
    api = InferenceService(settings, store, LogWriter(tmp_path / "api-log", flush_s=0)).predict(pa.read_bytes())
    assert got["probability"] == pytest.approx(api.probability, abs=1e-9)
    assert got["present"] is (api.label == predictor.positive_class)
    rows = production_log.read(settings.production_log)
    assert len(rows) == 1 and rows.loc[0, "source"] == "pacs"
    assert rows.loc[0, "probability"] == api.probability  # the very same number, not a rounding of it
    assert rows.loc[0, "study_ref"].startswith("S") and len(rows.loc[0, "study_ref"]) == 17

    if shutil.which("dsrdump"):
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=30)
        assert dump.returncode == 0 and f'"Algorithm Version")="{predictor.version}"' in dump.stdout

    # idempotent: a second run finds the SR and stores nothing
    code, out = cli(champion_project, sets, "pacs", "process", "--url", orthanc.dicomweb_url, "--study", study)
    assert code == 0 and "already_processed" in out, out
    assert len(sr_instances(client, study)) == 1

    # de-identified everywhere we write: logs, records, production log, MLflow, audit log
    state = records.state_dir(settings)
    ours = [settings.production_log, state / records.RECORDS_DIR, champion_project.home]
    source_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in (tmp_path / "in").glob("s11-*.dcm")]
    assert find_tokens(ours, [*TOKENS, study, *source_uids]) == {}
    assert not any(t in caplog.text + out for t in [*TOKENS, study, *source_uids])
    link = next((state / records.LINKS_DIR).glob("*.json"))
    assert (link.stat().st_mode & 0o777) == 0o600 and json.loads(link.read_text())["study_uid"] == study
    assert find_tokens([state / records.LINKS_DIR, records.fhir_dir(settings)], TOKENS) == {}  # UIDs only
    print(f"pacs process: {took:.2f} s (CLI in process, model load included)")


def test_error_outcomes_store_no_sr_and_exit_1(orthanc: Orthanc, champion_project: Settings, tmp_path: Path) -> None:
    settings, sets = pacs_settings(champion_project, tmp_path)
    client = PacsClient(orthanc.dicomweb_url)
    lateral = send_study(orthanc, tmp_path / "in", 21, views=("LL",))
    tiny = send_study(orthanc, tmp_path / "in", 22, side=32)  # shorter side 32 < serve.min_side 64
    ct = send_study(orthanc, tmp_path / "in", 23, modality="CT")
    expected = {lateral: ("no_frontal_image", "view x1"), tiny: ("gate_rejected", "too_small"),
                ct: ("no_frontal_image", "modality x1")}
    for study, (status, reason) in expected.items():
        code, out = cli(champion_project, sets, "pacs", "process", "--url", orthanc.dicomweb_url, "--study", study)
        assert code == 1 and status in out and reason in out, out
        assert sr_instances(client, study) == []
    done = records.read_records(settings)
    assert sorted(done["status"]) == ["gate_rejected", "no_frontal_image", "no_frontal_image"]
    rejected = production_log.read(settings.production_log / production_log.REJECTED_DIR)
    assert sorted(rejected["reason"]) == ["out_of_policy", "out_of_policy", "too_small"]
    assert set(rejected["source"]) == {"pacs"}
    assert find_tokens([settings.production_log, records.state_dir(settings)], [*TOKENS, *expected]) == {}


def _stable(orthanc: Orthanc, study: str, timeout_s: float = 30) -> None:
    req = urllib.request.Request(f"{orthanc.http_url}/tools/lookup", data=study.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        orthanc_id = next(r["ID"] for r in json.loads(resp.read()) if r["Type"] == "Study")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{orthanc.http_url}/studies/{orthanc_id}", timeout=10) as resp:
            if json.loads(resp.read()).get("IsStable"):
                return
        time.sleep(0.2)
    raise AssertionError("the study did not become stable")


def test_listener_once_processes_each_stable_study_once(fresh_orthanc: Orthanc, champion_project: Settings,
                                                        tmp_path: Path) -> None:
    settings, sets = pacs_settings(champion_project, tmp_path)
    sets = [*sets, "pacs.dispatch=direct", "pacs.start_at=beginning"]
    client = PacsClient(fresh_orthanc.dicomweb_url)
    first = send_study(fresh_orthanc, tmp_path / "in", 31)
    lateral = send_study(fresh_orthanc, tmp_path / "in", 32, views=("LL",))
    for study in (first, lateral):
        _stable(fresh_orthanc, study)
    code, out = cli(champion_project, sets, "pacs", "listen", "--url", fresh_orthanc.dicomweb_url, "--once")
    assert code == 0, out
    assert "2 stable studies processed" in out and "sr_stored" in out and "no_frontal_image" in out
    assert len(sr_instances(client, first)) == 1 and sr_instances(client, lateral) == []
    cursor = records.read_cursor(settings)
    assert cursor is not None and cursor > 0

    # restart: nothing pending, nothing processed twice; a new study is picked up from the cursor
    second = send_study(fresh_orthanc, tmp_path / "in", 33)
    _stable(fresh_orthanc, second)
    code, out = cli(champion_project, sets, "pacs", "listen", "--url", fresh_orthanc.dicomweb_url, "--once")
    assert code == 0 and "'sr_stored': 1}" in out and "no_frontal_image" not in out, out
    # storing our SR changed the first study, so Orthanc announced it stable again: recognised, not re-scored
    assert "already_processed" in out
    assert len(sr_instances(client, first)) == 1 and len(sr_instances(client, second)) == 1
    assert (records.read_cursor(settings) or 0) > cursor


def test_process_without_a_served_model_is_a_logged_outcome(orthanc: Orthanc, make_settings, tmp_path: Path) -> None:
    settings = make_settings("data.version_with_dvc=false", f"pacs.state_dir={tmp_path / 'pacs'}")
    study = send_study(orthanc, tmp_path / "in", 41)
    argv = ["pacs", "process", "--url", orthanc.dicomweb_url, "--study", study, "--params",
            str(settings.root / "params.yaml"), "--set", f"pacs.state_dir={tmp_path / 'pacs'}"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1 and "model_unavailable" in result.output, result.output
    assert list(records.read_records(settings)["status"]) == ["model_unavailable"]
    assert sr_instances(PacsClient(orthanc.dicomweb_url), study) == []

    # the listener treats it as transient: the cursor stays before the study's change, to be retried
    _stable(orthanc, study)
    argv = ["pacs", "listen", "--url", orthanc.dicomweb_url, "--once", "--params", str(settings.root / "params.yaml"),
            "--set", f"pacs.state_dir={tmp_path / 'pacs'}", "--set", "pacs.dispatch=direct",
            "--set", "pacs.start_at=beginning"]
    for _ in range(2):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0 and "model_unavailable" in result.output, result.output
        assert "a transient failure will be retried" in result.output
    with urllib.request.urlopen(f"{orthanc.http_url}/changes?last", timeout=10) as resp:
        last = json.loads(resp.read())["Last"]
    assert (records.read_cursor(settings) or 0) < last


def test_secondary_capture_of_the_explanation_goes_to_the_study(orthanc: Orthanc, champion_project: Settings,
                                                                tmp_path: Path) -> None:
    _, sets = pacs_settings(champion_project, tmp_path)
    study = send_study(orthanc, tmp_path / "in", 71)
    code, out = cli(champion_project, [*sets, "pacs.secondary_capture=true"], "pacs", "process", "--url",
                    orthanc.dicomweb_url, "--study", study)
    assert code == 0, out
    client = PacsClient(orthanc.dicomweb_url)
    series = {s["0020000E"]["Value"][0]: (s.get("0008103E") or {}).get("Value", [""])[0]
              for s in client.search_series(study, fields=["0008103E"])}
    assert len(series) == 3 and any("not for diagnosis" in d for d in series.values())
    sc = [i for i in client.search_instances(study, fields=["00080016"])
          if i["00080016"]["Value"][0] == "1.2.840.10008.5.1.4.1.1.7"]
    assert len(sc) == 1
    ds = client.retrieve_instance(study, sc[0]["0020000E"]["Value"][0], sc[0]["00080018"]["Value"][0])
    assert ds.PhotometricInterpretation == "RGB" and ds.StudyInstanceUID == study


def test_qido_feed_hands_over_quiet_studies_once_per_instance_count(fresh_orthanc: Orthanc,
                                                                    champion_project: Settings,
                                                                    tmp_path: Path) -> None:
    from dataclasses import dataclass
    from datetime import date

    from pipeline.pacs.listen import ListenSummary, QidoStudies

    @dataclass
    class Seen:
        status: str = "sr_stored"
        transient: bool = False

        def line(self) -> str:
            return self.status

    today = f"{date.today():%Y%m%d}"
    study = send_study(fresh_orthanc, tmp_path / "in", 81, study_date=today)
    send_study(fresh_orthanc, tmp_path / "in", 82, study_date="19990101")  # outside the window
    now = [0.0]
    feed = QidoStudies(PacsClient(fresh_orthanc.dicomweb_url), days=1, quiet_s=60, clock=lambda: now[0])
    handed: list[str] = []
    settings, sets = pacs_settings(champion_project, tmp_path)

    def poll(at: float) -> list[str]:
        now[0], before = at, len(handed)
        feed.poll(settings, lambda uid: handed.append(uid) or Seen(), ListenSummary())
        return handed[before:]

    assert poll(0) == [] and poll(59) == [] and poll(61) == [study] and poll(200) == []
    send_study(fresh_orthanc, tmp_path / "in", 83, study=study, study_date=today)  # one more image
    assert poll(201) == [] and poll(262) == [study]

    # through the CLI: quiet 0 = at first sight; a restarted listener re-checks and recognises its SR
    qido = [*sets, "pacs.feed=qido", "pacs.qido_quiet_s=0", "pacs.dispatch=direct"]
    code, out = cli(champion_project, qido, "pacs", "listen", "--url", fresh_orthanc.dicomweb_url, "--once")
    assert code == 0 and "1 stable studies processed ({'sr_stored': 1})" in out, out
    code, out = cli(champion_project, qido, "pacs", "listen", "--url", fresh_orthanc.dicomweb_url, "--once")
    assert code == 0 and "already_processed" in out and "sr_stored" not in out, out
    assert len(sr_instances(PacsClient(fresh_orthanc.dicomweb_url), study)) == 1


def test_an_unexpected_error_is_one_line_without_phi_and_the_listener_goes_on(
        fresh_orthanc: Orthanc, champion_project: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The catch-all ``error`` outcome through a real path: an image whose header passes the admission policy and the
    gate and is scored, but carries a malformed birth date (``17/04/1923``, a real-world DA defect) that highdicom
    refuses while the SR is built, with the date in its message. The outcome names the exception's type only."""
    caplog.set_level(logging.INFO, logger="pipeline.pacs")
    settings, sets = pacs_settings(champion_project, tmp_path)
    sets = [*sets, "pacs.dispatch=direct", "pacs.start_at=beginning"]
    birth = "17/04/1923"
    broken = send_study(fresh_orthanc, tmp_path / "in", 91, PatientBirthDate=birth)
    good = send_study(fresh_orthanc, tmp_path / "in", 92)
    for study in (broken, good):
        _stable(fresh_orthanc, study)
    caplog.clear()  # writing the test file made pydicom warn about the date: only what the listener logs counts
    code, out = cli(champion_project, sets, "pacs", "listen", "--url", fresh_orthanc.dicomweb_url, "--once")
    assert code == 0 and "2 stable studies processed" in out, out
    assert "'error': 1" in out and "'sr_stored': 1" in out and "Traceback" not in out, out
    client = PacsClient(fresh_orthanc.dicomweb_url)
    assert sr_instances(client, broken) == [] and len(sr_instances(client, good)) == 1  # the listener went on

    done = records.read_records(settings)
    ref = done.loc[done["status"] == "error", "study_ref"].item()
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.pacs.process" and "error:" in r.getMessage()]
    assert lines == [f"study {ref}: error: unexpected ValueError while processing the study (a defect: please "
                     "report it)"]
    assert not [r for r in caplog.records if r.exc_info]  # no traceback: its message holds the birth date
    secret = [*TOKENS, birth, broken, good]
    assert not [t for t in secret if t in caplog.text + out]
    assert find_tokens([settings.production_log, records.state_dir(settings) / records.RECORDS_DIR], secret) == {}


def test_pacs_process_command_prints_no_tensorflow_start_up_noise(orthanc: Orthanc, champion_project: Settings,
                                                                  tmp_path: Path) -> None:
    """`xrayops pacs process` in its own process, as an operator runs it: TensorFlow is imported like `xrayops serve`
    does (pipeline.runtime.import_tensorflow_quietly), so a CPU host's stderr shows no CUDA/oneDNN start-up lines."""
    _, sets = pacs_settings(champion_project, tmp_path)
    study = send_study(orthanc, tmp_path / "in", 97)
    exe = Path(sys.executable).with_name("xrayops")
    argv = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "pipeline.cli"]),
            "pacs", "process", "--url", orthanc.dicomweb_url, "--study", study,
            "--params", str(champion_project.root / "params.yaml")]
    for s in sets:
        argv += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "KMP_"))}  # as in a fresh shell
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0 and "SR stored" in done.stdout, done.stdout + done.stderr
    noise = [line for line in done.stderr.splitlines() if any(t in line for t in ("cuInit", "oneDNN", "cudart"))]
    assert noise == [], done.stderr
    assert "Traceback" not in done.stderr, done.stderr
