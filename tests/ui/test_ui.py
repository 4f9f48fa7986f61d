"""The clinician app under streamlit.testing: sign in, upload an X-ray, see the answer and Grad-CAM, give feedback;
roles decide the pages; an adjudicator resolves a disagreement."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings, with_overrides
from pipeline.monitoring.feedback import IMAGES_DIR, adjudicate, read_feedback
from pipeline.serving import production_log
from pipeline.ui.auth import UserStore, user_id_for
from pipeline.ui.render import SETS_ENV
from tests.conftest import REPO
from tests.serving.helpers import colour_png, png

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
PACS_TAB = ["PACS results"] if importlib.util.find_spec("pipeline.ui.pacs_review") else []  # optional page


def app_for(champion: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> tuple[Any, Settings]:
    """An AppTest of the app with its own logs and user file (alice: clinician, bob: adjudicator, rita: reviewer)."""
    from streamlit.testing.v1 import AppTest

    sets = [f"paths.production_log={tmp_path / 'log'}", f"paths.feedback_log={tmp_path / 'feedback'}",
            f"ui.users_file={tmp_path / 'users.json'}", "ui.failed_login_delay_s=0", *extra]
    settings = with_overrides(champion, sets)
    store = UserStore(settings.ui_users_file)
    if not store.path.exists():
        for name, role in (("alice", "clinician"), ("bob", "adjudicator"), ("rita", "reviewer")):
            store.add(name, role, PASSWORD)
    monkeypatch.setenv("XRAYOPS_PARAMS", str(champion.root / "params.yaml"))
    monkeypatch.setenv(SETS_ENV, json.dumps(sets))
    at = AppTest.from_file(str(REPO / "pipeline" / "ui" / "app.py"), default_timeout=120)
    return at, settings


def sign_in(at: Any, name: str, password: str = PASSWORD) -> Any:
    at.text_input(key="login_name").input(name)
    at.text_input(key="login_password").input(password)
    return next(b for b in at.button if b.label == "Sign in").click().run()


def test_sign_in_upload_prediction_gradcam_and_feedback(champion_project: Settings, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    at, settings = app_for(champion_project, tmp_path, monkeypatch)
    at.run()
    assert not at.exception and not at.file_uploader, "nothing but the sign-in before signing in"
    sign_in(at, "alice", "wrong password!")
    assert not at.file_uploader and "wrong password" in at.error[0].value
    sign_in(at, "alice")
    assert not at.exception and at.file_uploader
    assert [t.label for t in at.tabs] == ["Review an X-ray", *PACS_TAB], "a clinician reviews; no adjudication"
    assert any("locked operating threshold" in c.value for c in at.caption), "the served model before any upload"

    at.file_uploader[0].upload("chest.png", png(3, side=96), "image/png").run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert any(m.value.startswith(f"Model **{settings.registered_model} v1**") for m in at.markdown)
    assert metrics["Decision"] in ("NORMAL", "PNEUMONIA") and metrics["Probability of PNEUMONIA"].endswith("%")
    assert metrics["Locked threshold"].replace(".", "").isdigit() or metrics["Locked threshold"] == "argmax"
    logged = production_log.read(settings.production_log)
    assert len(logged) == 1 and logged["source"].iloc[0] == "ui"
    request_id = logged["request_id"].iloc[0]
    assert len(at.image) == 2, "the image and its Grad-CAM overlay"
    at.slider(key="opacity").set_value(0.8).run()
    assert not at.exception and len(production_log.read(settings.production_log)) == 1, "no re-scoring on rerun"

    other = "NORMAL" if metrics["Decision"] == "PNEUMONIA" else "PNEUMONIA"
    at.radio(key="verdict").set_value("disagree")
    at.selectbox(key="correct_label").select(other)
    at.text_area(key="comment").input("subtle opacity, right lower zone")
    next(b for b in at.button if b.label == "Submit feedback").click().run()
    assert not at.exception and "Feedback saved" in at.success[0].value
    records = read_feedback(settings.feedback_log)
    assert len(records) == 1
    rec = records.iloc[0]
    assert (rec["request_id"], rec["model_version"], rec["verdict"], rec["correct_label"]) == (
        request_id, "1", "disagree", other)
    assert rec["predicted_label"] == metrics["Decision"] and rec["comment"] == "subtle opacity, right lower zone"
    assert rec["user_id"] == user_id_for(settings, "alice") and rec["kind"] == "feedback"
    assert "alice" not in json.dumps(records.astype(str).to_dict("records")), "no user name in the store"
    assert (settings.feedback_log / IMAGES_DIR / f"{request_id}.png").is_file()
    cases = adjudicate(records, min_clinicians=settings.monitor.feedback_min_clinicians, adjudicator_decides=True)
    assert cases["status"].tolist() == ["pending"], "one clinician is not a consensus"

    # a colour photograph is refused with the gate's reason, and logged as a rejection
    at.file_uploader[0].set_value(None)
    at.file_uploader[0].upload("holiday.png", colour_png(), "image/png").run()
    assert any("rejected by the input gate — colour_photograph" in e.value for e in at.error)
    rejected = production_log.read(settings.production_log / production_log.REJECTED_DIR)
    assert list(rejected["reason"]) == ["colour_photograph"] and rejected["source"].iloc[0] == "ui"


def test_roles_pick_the_pages_and_an_adjudicator_decides(champion_project: Settings, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.monitoring.feedback import FeedbackRecord, record_feedback

    at, settings = app_for(champion_project, tmp_path, monkeypatch)
    rid = "ab" * 16
    for user, label in (("alice", "NORMAL"), ("carol", "PNEUMONIA")):  # two clinicians disagree
        record_feedback(settings.feedback_log, FeedbackRecord(rid, settings.registered_model, "1", "NORMAL", 0.3,
                                                              "agree" if label == "NORMAL" else "disagree", label,
                                                              user_id=user_id_for(settings, user)),
                        image=None, classes=("NORMAL", "PNEUMONIA"))
    sign_in(at.run(), "rita")
    assert not at.exception and [t.label for t in at.tabs] == ["Promotions"] and not at.file_uploader

    at, _ = app_for(champion_project, tmp_path, monkeypatch)
    sign_in(at.run(), "bob")
    assert not at.exception and [t.label for t in at.tabs] == ["Review an X-ray", *PACS_TAB, "Resolve disagreements"]
    assert at.selectbox(key="adj_case").value == rid
    at.selectbox(key="adj_label").select("PNEUMONIA")
    next(b for b in at.button if b.label == "Record decision").click().run()
    assert not at.exception and "Decision recorded" in at.success[0].value
    records = read_feedback(settings.feedback_log)
    decision = records[records["kind"] == "adjudication"].iloc[0]
    assert decision["user_id"] == user_id_for(settings, "bob") and decision["correct_label"] == "PNEUMONIA"
    cases = adjudicate(records, min_clinicians=2, adjudicator_decides=True)
    assert cases[["status", "label"]].values.tolist() == [["adjudicated", "PNEUMONIA"]]


def test_sign_in_is_locked_after_repeated_failures(champion_project: Settings, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    at, _ = app_for(champion_project, tmp_path, monkeypatch, "ui.max_failed_logins=2", "ui.lockout_s=600")
    at.run()
    for _ in range(2):
        sign_in(at, "alice", "guess-guess-guess")
    sign_in(at, "alice")  # the right password, but the name is locked now
    assert not at.file_uploader and "Too many failed sign-ins" in at.error[0].value


def test_no_sign_in_is_refused_when_the_address_is_not_loopback(champion_project: Settings, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    at, _ = app_for(champion_project, tmp_path, monkeypatch, "ui.auth=none")
    at.run()  # under AppTest server.address is unset: Streamlit would listen on every interface
    assert not at.exception and not at.file_uploader
    assert "cannot start" in at.error[0].value and "without sign-in" in at.error[0].value
