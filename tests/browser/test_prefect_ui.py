"""The Prefect UI on a real server (issue 18 items 4 and 5): the training deployment's "Custom run" form offers
drop-downs of the valid sources and zoo models with the params.yaml values as defaults; a run started by
filling it completes on a process worker, and its drift artefact is visible in the UI."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.stack import FORM_MODEL

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]


def test_a_run_started_from_the_form_completes_and_shows_its_drift_artefact(
        form_run: Any, training_stack: Any, page: Any, screenshot: Any) -> None:
    from flows.training import SIMULATED_DRIFT_ARTIFACT
    from pipeline.data.sources import SOURCES
    from pipeline.training.models import list_models

    # the form opened with the deployed params.yaml values (tiny: 2 epochs) and simulation off
    assert form_run.defaults_shown == {"source": "synthetic", "model": "xray_cnn", "epochs": "2", "simulate": False}
    # it offered every registered source and zoo model, nothing else (the fixture picked from them)
    assert form_run.sources_offered == list(SOURCES)
    assert form_run.models_offered == sorted(spec.name for spec in list_models())
    assert form_run.state == "Completed", f"the run ended {form_run.state}:\n{form_run.worker_log}"
    sent = form_run.parameters["params"]
    # what the form sent: the choices made, the shown defaults (tiny params.yaml: 2 epochs), no nulls
    assert (sent["source"], sent["model"], sent["simulate_production"]) == ("synthetic", FORM_MODEL, True)
    assert sent["epochs"] == 2 and sent["require_approval"] is False and None not in sent.values()

    # the run's page in the UI
    page.set_viewport_size({"width": 1280, "height": 1400})
    page.goto(f"{training_stack.prefect_ui}/runs/flow-run/{form_run.flow_run_id}")
    page.get_by_text("Completed").first.wait_for()

    # its artifacts: the simulated-traffic drift report, rendered
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text(SIMULATED_DRIFT_ARTIFACT, exact=True).first.wait_for()
    page.wait_for_timeout(1_000)  # the task graph is a canvas: no element says it has been drawn
    screenshot(page, "prefect-flow-run")
    page.get_by_text(SIMULATED_DRIFT_ARTIFACT, exact=True).first.click()
    page.get_by_role("heading", name="Drift report — xrayops-synthetic v1").wait_for()
    body = page.inner_text("body")
    assert "drift share" in body and "Simulated traffic" in body, body[:2000]
    screenshot(page, "prefect-drift-artifact")
