"""The clinician app in a real browser: `xrayops ui` started as people start it, driven by the system Chromium.

Sign in, upload a radiograph, see probability + explanation overlay + model version, submit feedback; the feedback
store holds the record with the user's pseudonymous id (never the name); a visit without signing in never reaches
the upload; Streamlit's developer toolbar (Deploy) is hidden. Screenshots: see tests/browser/conftest.py.
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
from contextlib import contextmanager
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


@contextmanager
def running_ui(champion: Settings, tmp_path: Path, sets: list[str]) -> Iterator[str]:
    """`xrayops ui` as people start it, on a free loopback port, in its own process group; yields its URL."""
    with running_ui_on(champion, tmp_path, sets, free_port()) as url:
        yield url


@contextmanager
def running_ui_on(champion: Settings, tmp_path: Path, sets: list[str], port: int) -> Iterator[str]:
    """The same on ``port`` (an OIDC redirect_uri names the port before the app starts)."""
    argv = [sys.executable, "-m", "pipeline.cli", "ui", "--host", "127.0.0.1", "--port", str(port),
            "--params", str(champion.root / "params.yaml")]
    for item in sets:
        argv += ["--set", item]
    log = (tmp_path / f"ui-{port}.log").open("w")
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
                raise AssertionError(f"xrayops ui did not come up: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def own_logs(tmp_path: Path) -> list[str]:
    """Logs and the user file of this test only."""
    return [f"paths.production_log={tmp_path / 'log'}", f"paths.feedback_log={tmp_path / 'feedback'}",
            f"ui.users_file={tmp_path / 'users.json'}"]


@pytest.fixture
def clinician_app(champion_project: Settings, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """The app with local sign-in, its own logs and a user file holding alice (clinician)."""
    sets = own_logs(tmp_path)
    settings = with_overrides(champion_project, sets)
    UserStore(settings.ui_users_file).add("alice", "clinician", PASSWORD)
    with running_ui(champion_project, tmp_path, sets) as url:
        yield url, settings


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


def test_oidc_sign_in_through_an_identity_provider(champion_project: Settings, chromium: Any, page: Any,
                                                   tmp_path: Path, screenshot: Callable[[Any, str], Path]) -> None:
    """st.login against a local OpenID provider (tests/browser/fake_idp.py): the real redirect, code exchange,
    ID-token check and cookie; the role comes from the user file, an unknown account gets no page."""
    from tests.browser.fake_idp import FakeIdP

    with FakeIdP("xrayops", "client-secret-for-tests") as idp:
        secrets_file = tmp_path / "secrets.toml"
        secrets_file.write_text(
            '[auth]\nredirect_uri = "http://127.0.0.1:{port}/oauth2callback"\n'
            f'cookie_secret = "{"c" * 40}"\nclient_id = "xrayops"\nclient_secret = "client-secret-for-tests"\n'
            f'server_metadata_url = "{idp.metadata_url}"\n')
        sets = [*own_logs(tmp_path), f"ui.secrets_file={secrets_file}"]
        settings = with_overrides(champion_project, sets)
        UserStore(settings.ui_users_file).add("dr.who@example.org", "adjudicator", None)
        port = free_port()
        secrets_file.write_text(secrets_file.read_text().replace("{port}", str(port)))
        with running_ui_on(champion_project, tmp_path, sets, port) as url:
            page.goto(url)
            button = page.get_by_role("button", name="Sign in with your organisation's account")
            button.wait_for(timeout=60_000)
            assert page.locator('[data-testid="stFileUploader"]').count() == 0
            button.click()
            page.locator('[data-testid="stFileUploader"]').wait_for(state="visible", timeout=FIRST_MODEL_S * 1000)
            assert idp.tokens_issued == 1
            page.get_by_text("Signed in as").wait_for()
            assert "dr.who@example.org (adjudicator)" in page.locator('[data-testid="stSidebar"]').inner_text()
            page.get_by_role("tab", name="Resolve disagreements").wait_for()
            wait_until_idle(page)
            screenshot(page, "clinician-ui-oidc-signed-in")

            idp.email = "mallory@example.org"  # signs in at the provider, but has no role here
            other = chromium.new_context(viewport={"width": 1280, "height": 900})
            try:
                visitor = other.new_page()
                visitor.goto(url)
                visitor.get_by_role("button", name="Sign in with your organisation's account").click()
                visitor.get_by_text("not authorised for the clinician app").wait_for(timeout=60_000)
                assert visitor.locator('[data-testid="stFileUploader"]').count() == 0 and idp.tokens_issued == 2
            finally:
                other.close()
