"""The clinician app under streamlit.testing: upload an X-ray, see the answer and Grad-CAM, give feedback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Settings, with_overrides
from pipeline.monitoring.feedback import IMAGES_DIR, read_feedback
from pipeline.serving import production_log
from pipeline.ui.render import SETS_ENV
from tests.conftest import REPO
from tests.serving.helpers import colour_png, png

pytestmark = pytest.mark.slow


def test_upload_prediction_gradcam_and_feedback(champion_project: Settings, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    sets = [f"paths.production_log={tmp_path / 'log'}", f"paths.feedback_log={tmp_path / 'feedback'}"]
    settings = with_overrides(champion_project, sets)
    monkeypatch.setenv("XRAYOPS_PARAMS", str(champion_project.root / "params.yaml"))
    monkeypatch.setenv(SETS_ENV, json.dumps(sets))
    at = AppTest.from_file(str(REPO / "pipeline" / "ui" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception and at.file_uploader

    at.file_uploader[0].upload("chest.png", png(3, side=96), "image/png").run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Model"] == f"{settings.registered_model} v1"
    assert metrics["Decision"] in ("NORMAL", "PNEUMONIA") and metrics["Probability of PNEUMONIA"].endswith("%")
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
    assert (settings.feedback_log / IMAGES_DIR / f"{request_id}.png").is_file()

    # a colour photograph is refused with its reason, and logged as a rejection
    at.file_uploader[0].set_value(None)
    at.file_uploader[0].upload("holiday.png", colour_png(), "image/png").run()
    assert any("colour_photograph" in e.value for e in at.error)
    rejected = production_log.read(settings.production_log / production_log.REJECTED_DIR)
    assert list(rejected["reason"]) == ["colour_photograph"] and rejected["source"].iloc[0] == "ui"
