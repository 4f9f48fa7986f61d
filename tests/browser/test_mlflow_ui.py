"""The MLflow UI on a real server (issue 18 item 5): the registered model shows its aliases, the version its
gate verdict and operating threshold tags, and the model card artefact opens from the version's description.

Reads the version the Prefect UI test's form run registered (``form_run``): the suite trains once. The MLflow
UI polls and never reaches network idle, so each step waits for ``load`` and then for an element."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.stack import FORM_MODEL, REGISTERED_MODEL

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]


def close_assistant(page: Any) -> None:
    """MLflow 3.17 opens its "Assistant" side panel on a first visit; it is not what these pages show."""
    close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    try:
        close.wait_for(timeout=5_000)
    except Exception:  # noqa: BLE001 - no panel this time
        return
    close.click()


def test_registered_model_shows_aliases_gate_tags_and_model_card(
        form_run: Any, training_stack: Any, page: Any, screenshot: Any) -> None:
    from mlflow import MlflowClient

    assert form_run.state == "Completed", f"the training run ended {form_run.state}:\n{form_run.worker_log}"
    url = training_stack.mlflow_url
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    version = client.get_model_version(REGISTERED_MODEL, "1")
    assert client.get_run(version.run_id).data.params["train.model"] == FORM_MODEL, "the form's model choice"
    page.set_viewport_size({"width": 1400, "height": 1000})

    # the registered model: its version 1 carries both aliases
    page.goto(f"{url}/#/models/{REGISTERED_MODEL}", wait_until="load")
    close_assistant(page)
    page.get_by_title("champion", exact=True).first.wait_for()
    page.get_by_title("challenger", exact=True).first.wait_for()
    assert page.get_by_role("link", name="Version 1").count() >= 1
    screenshot(page, "mlflow-registered-model")

    # the version: aliases, and the gate verdict and operating threshold among its tags
    page.goto(f"{url}/#/models/{REGISTERED_MODEL}/versions/1", wait_until="load")
    close_assistant(page)
    for tag, value in (("operating_threshold", version.tags["operating_threshold"]), ("gate_verdict", "pass")):
        row = page.get_by_role("row").filter(has=page.get_by_text(tag, exact=True))
        row.first.scroll_into_view_if_needed()
        assert value in row.first.inner_text(), f"{tag}: {row.first.inner_text()!r}, expected {value}"
    assert {"champion", "challenger"} <= {a for a in ("champion", "challenger")
                                          if page.get_by_title(a, exact=True).count()}
    screenshot(page, "mlflow-model-version")

    # the model card: the description links to the training run's artifacts, where the card renders
    link = page.get_by_role("link", name="model_card-v1.md").get_attribute("href") or ""
    experiment = client.get_run(version.run_id).info.experiment_id
    assert link.endswith(f"#/experiments/{experiment}/runs/{version.run_id}/artifacts"), link
    page.goto(f"{url}/{link.lstrip('/')}/model_card/model_card-v1.md", wait_until="load")
    close_assistant(page)
    page.get_by_role("heading", name=f"Model card — {REGISTERED_MODEL} v1").wait_for()
    body = page.inner_text("body")
    assert "Intended use" in body and FORM_MODEL in body
    screenshot(page, "mlflow-model-card")
