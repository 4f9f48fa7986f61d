"""A real browser for end-to-end tests: Playwright driving the distribution's Chromium.

The browser comes from the system package manager (``infra/scripts/ensure-chromium.sh``; `.ci/run` runs it);
Playwright's own browser download is never used. Each test gets a fresh context (no shared cookies) and
saves screenshots through ``screenshot(page, name)``: into a temporary folder of the session, or into
``docs/screenshots/`` (the set the README shows) when ``XRAYOPS_UPDATE_SCREENSHOTS=1`` — so a test run
leaves the working tree clean unless asked to refresh the docs.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"


def chromium_path() -> str | None:
    """The system Chromium (XRAYOPS_CHROMIUM overrides), or None when the machine has none."""
    explicit = os.environ.get("XRAYOPS_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Package scope, not session: Playwright's sync API keeps an asyncio loop *running* in the main thread while
# it is started, and every later test that calls Prefect's sync API there would get coroutines back
# ("'coroutine' object is not subscriptable", "asyncio.run() cannot be called from a running event loop").
# Package-scoped fixtures end with the last test of tests/browser/, before the next folder's tests run.
@pytest.fixture(scope="package")
def chromium() -> Iterator[Any]:
    """A launched headless Chromium (session-wide); skips with the reason when the machine has none."""
    path = chromium_path()
    if path is None:
        pytest.skip("no system Chromium: run infra/scripts/ensure-chromium.sh (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A page in a fresh browser context (no cookies or storage from other tests), 1280×900."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@functools.cache
def screenshot_dir() -> Path:
    """docs/screenshots/ with XRAYOPS_UPDATE_SCREENSHOTS=1, else one temporary folder for this test process."""
    if os.environ.get("XRAYOPS_UPDATE_SCREENSHOTS") == "1":
        return SCREENSHOTS
    return Path(tempfile.mkdtemp(prefix="xrayops-screenshots-"))


def save_screenshot(page: Any, name: str) -> Path:
    """``<screenshot_dir()>/<name>.png`` of the whole page."""
    folder = screenshot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.png"
    page.screenshot(path=str(out), full_page=True)
    return out


@pytest.fixture
def screenshot() -> Callable[[Any, str], Path]:
    """``screenshot(page, "name")`` → the saved PNG (see :func:`screenshot_dir`)."""
    return save_screenshot


# --------------------------------------------------------------------------- one real training run, shared


@pytest.fixture(scope="package")
def training_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """MLflow + Prefect servers (temporary SQLite, Prefect UI on), a tiny deployed project and a worker."""
    from tests.browser.stack import start_training_stack

    stack = start_training_stack(tmp_path_factory.mktemp("ui-stack"))
    try:
        yield stack
    finally:
        left = stack.stop()
        assert not left, f"processes left running: {left}"


@pytest.fixture(scope="package")
def form_run(training_stack: Any, chromium: Any) -> Any:
    """A training run started the way a person does: the deployment's "Custom run" form in Chromium, the
    source and model picked from their drop-downs, simulation switched on; waited for until it ends."""
    from tests.browser.stack import FORM_RUN_TIMEOUT_S, start_run_from_form

    context = chromium.new_context(viewport={"width": 1280, "height": 2000})  # the UI scrolls inside its frame
    context.set_default_timeout(60_000)
    try:
        run = start_run_from_form(training_stack, context.new_page(), save_screenshot, FORM_RUN_TIMEOUT_S)
    finally:
        context.close()
    return run
