"""The Prefect flow wiring: the listener's default dispatch runs ``pacs_inference_flow`` per stable study."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.pacs.dicomweb import PacsClient
from tests.pacs.conftest import Orthanc
from tests.pacs.test_process import pacs_settings, send_study, sr_instances

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_flow_processes_a_study_and_fails_only_transiently(prefect_harness: None, orthanc: Orthanc,
                                                            champion_project: Settings, make_settings,
                                                            tmp_path: Path) -> None:
    from flows.pacs import pacs_inference_flow, run_flow

    _, sets = pacs_settings(champion_project, tmp_path)
    params = str(champion_project.root / "params.yaml")
    study = send_study(orthanc, tmp_path / "in", 61)
    outcome = run_flow(study, orthanc.dicomweb_url, params, sets)
    assert outcome.status == "sr_stored" and len(sr_instances(PacsClient(orthanc.dicomweb_url), study)) == 1
    again = pacs_inference_flow(study, orthanc.dicomweb_url, params, sets, return_state=True)
    assert again.is_completed() and again.result().status == "already_processed"

    empty = make_settings("data.version_with_dvc=false", f"pacs.state_dir={tmp_path / 'empty-pacs'}")
    state = pacs_inference_flow(study, orthanc.dicomweb_url, str(empty.root / "params.yaml"), [],
                                return_state=True)
    assert state.is_failed() and "model_unavailable" in (state.message or "")
    assert run_flow(study, orthanc.dicomweb_url, str(empty.root / "params.yaml"), []).transient
