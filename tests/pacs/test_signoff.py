"""Sign-off against a real Orthanc: the review page lists the result, a verdict stores a VERIFIED SR that references
the UNVERIFIED one, and the feedback store gets the case (de-identified pixels, pseudonymous reviewer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Settings, with_overrides
from pipeline.errors import FeedbackError
from pipeline.monitoring.feedback import read_feedback
from pipeline.pacs import records
from pipeline.pacs.dicomweb import PacsClient
from pipeline.pacs.process import PacsContext, process_study
from pipeline.pacs.signoff import Review, awaiting_review, sign_off
from tests.data.helpers import find_tokens
from tests.pacs.conftest import Orthanc
from tests.pacs.test_process import TOKENS, pacs_settings, send_study, sr_instances

pytestmark = [pytest.mark.server, pytest.mark.slow]

REVIEWER = "U0123456789abcdef"


def test_sign_off_stores_a_verified_sr_and_feedback(orthanc: Orthanc, champion_project: Settings,
                                                    tmp_path: Path) -> None:
    from streamlit.testing.v1 import AppTest

    settings, sets = pacs_settings(champion_project, tmp_path)
    settings = with_overrides(settings, [f"paths.feedback_log={tmp_path / 'feedback'}"])
    client = PacsClient(orthanc.dicomweb_url)
    study = send_study(orthanc, tmp_path / "in", 51)
    ctx = PacsContext(settings, client)
    ctx.refresh()
    outcome = process_study(ctx, study)
    assert outcome.status == "sr_stored"
    pending = awaiting_review(settings)
    assert [p.request_id for p in pending] == [outcome.request_id] and pending[0].study_ref == outcome.study_ref

    wrong = "NOT_A_CLASS"
    with pytest.raises(FeedbackError, match="not one of the model's classes"):
        sign_off(settings, client, Review(outcome.request_id, REVIEWER, "disagree", wrong))
    with pytest.raises(FeedbackError, match="pseudonymous"):
        sign_off(settings, client, Review(outcome.request_id, "Dr Real Name", "agree", outcome.label))
    assert len(sr_instances(client, study)) == 1  # nothing stored by refused sign-offs

    # the page, driven like a browser would: pick the result, disagree, sign off
    script = (f"from pipeline.config import load_settings, with_overrides\n"
              f"from pipeline.ui.pacs_review import render_pacs_review\n"
              f"s = with_overrides(load_settings({str(champion_project.root / 'params.yaml')!r}), {sets!r} + "
              f"['paths.feedback_log={tmp_path / 'feedback'}', 'data.dicomweb.url={orthanc.dicomweb_url}'])\n"
              f"render_pacs_review(s, {REVIEWER!r})\n")
    at = AppTest.from_string(script, default_timeout=60).run()
    assert not at.exception, at.exception
    assert outcome.study_ref in at.selectbox(key="pacs_review_result").value
    at.radio(key="pacs_review_verdict").set_value("disagree")
    other = at.selectbox(key="pacs_review_label").value
    at.button[0].click().run()
    assert not at.exception and at.success, [e.value for e in at.error]
    assert awaiting_review(settings) == []

    found = sr_instances(client, study)
    assert len(found) == 2
    flags = {}
    for item in found:
        ds = client.retrieve_instance(study, item["0020000E"]["Value"][0], item["00080018"]["Value"][0])
        flags[str(ds.VerificationFlag)] = ds
    verified, first = flags["VERIFIED"], flags["UNVERIFIED"]
    assert str(verified.VerifyingObserverSequence[0].VerifyingObserverName) == f"{REVIEWER}^"
    assert verified.VerifyingObserverSequence[0].VerifyingOrganization == settings.pacs.organisation
    ref = verified.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID and verified.StudyInstanceUID == study

    fb = read_feedback(tmp_path / "feedback")
    assert list(fb["request_id"]) == [outcome.request_id] and list(fb["source"]) == ["pacs"]
    assert (fb.loc[0, "verdict"], fb.loc[0, "correct_label"], fb.loc[0, "user_id"]) == ("disagree", other, REVIEWER)
    assert (tmp_path / "feedback" / "images" / f"{outcome.request_id}.png").is_file()
    assert records.load_link(settings, outcome.request_id) is None
    with pytest.raises(FeedbackError, match="not awaiting review"):
        sign_off(settings, client, Review(outcome.request_id, REVIEWER, "agree", outcome.label))
    assert find_tokens([tmp_path / "feedback", records.state_dir(settings) / records.RECORDS_DIR],
                       [*TOKENS, study]) == {}
