"""The clinician app in a real browser: `xrayops ui` started as people start it, driven by the system Chromium.

Sign in, upload a radiograph, see probability + explanation overlay + model version, submit feedback; the feedback
store holds the record with the user's pseudonymous id (never the name); a visit without signing in never reaches
the upload; Streamlit's developer toolbar (Deploy) is hidden. Screenshots go to docs/screenshots/.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings, with_overrides
from pipeline.monitoring.feedback import read_feedback
from pipeline.serving import production_log
from pipeline.ui.auth import UserStore, user_id_for
from tests.serving.helpers import free_port, png

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.server]

PASSWORD = "correct horse battery"
FIRST_MODEL_S = 180  # Streamlit loads the model on the first signed-in run (≈ 20-30 s, more on a busy machine)


@pytest.fixture
def clinician_app(champion_project: Settings, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """`xrayops ui` on a free loopback port with its own logs and a user file holding alice (clinician)."""
    sets = [f"paths.production_log={tmp_path / 'log'}", f"paths.feedback_log={tmp_path / 'feedback'}",
            f"ui.users_file={tmp_path / 'users.json'}"]
    settings = with_overrides(champion_project, sets)
    UserStore(settings.ui_users_file).add("alice", "clinician", PASSWORD)
    port = free_port()
    argv = [sys.executable, "-m", "pipeline.cli", "ui", "--host", "127.0.0.1", "--port", str(port),
            "--params", str(champion_project.root / "params.yaml")]
    for item in sets:
        argv += ["--set", item]
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "XRAYOPS_SET": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"xrayops ui did not come up: {(tmp_path / 'ui.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, settings
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def wait_until_idle(page: Any) -> None:
    """Streamlit finished this run: no running indicator, every image decoded."""
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=120_000)
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)


def assert_signed_out(page: Any) -> None:
    """The sign-in form, and nothing of the app behind it."""
    page.get_by_label("User name").wait_for(state="visible", timeout=60_000)
    assert page.locator('[data-testid="stFileUploader"]').count() == 0
    assert page.get_by_text("Upload a radiograph").count() == 0


def test_sign_in_upload_see_the_answer_and_give_feedback(clinician_app: tuple[str, Settings], page: Any,
                                                         chromium: Any, tmp_path: Path,
                                                         screenshot: Callable[[Any, str], Path]) -> None:
    url, settings = clinician_app
    page.goto(url)
    assert_signed_out(page)
    wait_until_idle(page)
    assert page.get_by_role("button", name="Deploy").count() == 0, "developer toolbar hidden (toolbarMode viewer)"
    assert page.locator('[data-testid="stAppDeployButton"]').count() == 0
    screenshot(page, "clinician-ui-sign-in")

    page.get_by_label("User name").fill("alice")
    page.get_by_label("Password", exact=True).fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Unknown user name or wrong password.").wait_for(timeout=30_000)
    assert page.locator('[data-testid="stFileUploader"]').count() == 0

    page.get_by_label("User name").fill("alice")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    uploader = page.locator('[data-testid="stFileUploader"]')
    uploader.wait_for(state="visible", timeout=FIRST_MODEL_S * 1000)
    page.get_by_text("Signed in as").wait_for()
    banner = page.get_by_text("locked operating threshold")
    banner.wait_for()
    assert f"{settings.registered_model} v1" in banner.inner_text()

    image = tmp_path / "chest.png"
    image.write_bytes(png(5, side=96))
    uploader.locator('input[type="file"]').set_input_files(str(image))
    probability = page.locator('[data-testid="stMetric"]', has_text="Probability of PNEUMONIA")
    probability.wait_for(timeout=120_000)
    assert probability.locator('[data-testid="stMetricValue"]').inner_text().endswith("%")
    model = page.locator('[data-testid="stMarkdownContainer"]', has_text=re.compile(r"^Model "))
    assert model.inner_text().startswith(f"Model {settings.registered_model} v1 (alias champion)")
    overlay = page.get_by_text(f"Grad-CAM of {settings.registered_model} v1")
    overlay.wait_for(timeout=120_000)  # the explanation comes from the model that scored, named with its version
    page.get_by_role("img", name="Grad-CAM overlay").wait_for(timeout=60_000)
    wait_until_idle(page)
    assert page.get_by_role("img", name="the uploaded radiograph").evaluate("i => i.naturalWidth") > 0
    assert page.get_by_role("img", name="Grad-CAM overlay").evaluate("i => i.naturalWidth") > 0
    page.set_viewport_size({"width": 1280, "height": 1500})  # the app scrolls inside: show all of it
    wait_until_idle(page)
    screenshot(page, "clinician-ui-prediction")

    page.get_by_role("button", name="Submit feedback").click()
    page.get_by_text("Feedback saved").wait_for(timeout=60_000)
    wait_until_idle(page)
    screenshot(page, "clinician-ui-feedback-saved")

    logged = production_log.read(settings.production_log)
    records = read_feedback(settings.feedback_log)
    assert len(records) == 1 and records["request_id"].iloc[0] == logged["request_id"].iloc[0]
    record = records.iloc[0]
    assert record["user_id"] == user_id_for(settings, "alice") and record["verdict"] == "agree"
    assert record["model_version"] == "1" and record["kind"] == "feedback"
    assert not any("alice" in str(v) for v in records.to_numpy().ravel()), "the user name never reaches the store"

    other = chromium.new_context(viewport={"width": 1280, "height": 900})  # another browser, not signed in
    try:
        visitor = other.new_page()
        visitor.goto(url)
        assert_signed_out(visitor)
        visitor.wait_for_timeout(1000)  # give a wrongly rendered app a moment to show itself
        assert visitor.locator('[data-testid="stFileUploader"]').count() == 0
    finally:
        other.close()
