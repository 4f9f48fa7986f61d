"""The Prefect flow wiring: the listener's default dispatch runs ``pacs_inference_flow`` per stable study, and the
run gets the study's salted reference only (Prefect's database and UI never hold a study UID)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.pacs import records
from pipeline.pacs.dicomweb import PacsClient
from tests.pacs.conftest import Orthanc
from tests.pacs.test_process import TOKENS, pacs_settings, send_study, sr_instances

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_flow_processes_a_study_and_fails_only_transiently(prefect_harness: None, orthanc: Orthanc,
                                                            champion_project: Settings, make_settings,
                                                            tmp_path: Path) -> None:
    from flows.pacs import pacs_inference_flow, run_flow
    from pipeline.pacs.process import hand_over

    settings, sets = pacs_settings(champion_project, tmp_path)
    params = str(champion_project.root / "params.yaml")
    study = send_study(orthanc, tmp_path / "in", 61)
    outcome = run_flow(settings, study, orthanc.dicomweb_url, params, sets)
    assert outcome.status == "sr_stored" and len(sr_instances(PacsClient(orthanc.dicomweb_url), study)) == 1
    assert records.load_pending(settings, outcome.study_ref) is None  # final outcome: the kept UID is gone
    again = pacs_inference_flow(hand_over(settings, study), orthanc.dicomweb_url, params, sets, return_state=True)
    assert again.is_completed() and again.result().status == "already_processed"

    empty = make_settings("data.version_with_dvc=false", f"pacs.state_dir={tmp_path / 'empty-pacs'}")
    ref = hand_over(empty, study)
    state = pacs_inference_flow(ref, orthanc.dicomweb_url, str(empty.root / "params.yaml"), [], return_state=True)
    assert state.is_failed() and "model_unavailable" in (state.message or "")
    assert records.load_pending(empty, ref) == study  # transient: kept for the retry, readable by us only
    assert stat.S_IMODE((records.state_dir(empty) / "pending" / f"{ref}.json").stat().st_mode) == 0o600
    assert run_flow(empty, study, orthanc.dicomweb_url, str(empty.root / "params.yaml"), []).transient


def test_prefect_stores_the_study_reference_never_the_uid(prefect_harness: None, orthanc: Orthanc,
                                                          champion_project: Settings, tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    from flows.pacs import pacs_inference_flow, run_flow

    settings, sets = pacs_settings(champion_project, tmp_path)
    params = str(champion_project.root / "params.yaml")
    study = send_study(orthanc, tmp_path / "in", 71)
    outcome = run_flow(settings, study, orthanc.dicomweb_url, params, sets)  # what `pacs listen` calls per study
    assert outcome.status == "sr_stored", outcome.line()
    assert len(sr_instances(PacsClient(orthanc.dicomweb_url), study)) == 1

    # a reference nothing was kept for, and a UID passed by mistake: a clear outcome, never a crash or an echo
    unknown = pacs_inference_flow("S" + "0" * 16, orthanc.dicomweb_url, params, sets, return_state=True)
    assert unknown.is_failed() and "study_unknown" in (unknown.message or "")
    wrong = pacs_inference_flow("1.2.826.0.1.99", orthanc.dicomweb_url, params, sets, return_state=True)
    assert wrong.is_failed() and "study_unknown" in wrong.message and "1.2.826" not in wrong.message

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["xrayops-pacs-inference"])))
        ours = [r for r in runs if r.parameters.get("study_ref") == outcome.study_ref]
        assert len(ours) == 1 and ours[0].state is not None and ours[0].state.is_completed()
        assert ours[0].parameters == {"study_ref": outcome.study_ref, "url": orthanc.dicomweb_url,
                                      "params_path": params, "overrides": sets}
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])))
    stored = json.dumps([r.model_dump(mode="json") for r in [*runs, *tasks]])
    assert study not in stored
    assert not [t for t in TOKENS if t.lower() in stored.lower()]
    statuses = records.read_records(settings).set_index("study_ref")["status"]
    assert statuses[outcome.study_ref] == "sr_stored" and statuses["S" + "0" * 16] == "study_unknown"
