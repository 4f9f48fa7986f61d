"""A real browser for end-to-end tests: Playwright driving the distribution's Chromium.

The browser comes from the system package manager (``infra/scripts/ensure-chromium.sh``; `.ci/run` runs it);
Playwright's own browser download is never used. Each test gets a fresh context (no shared cookies) and
saves screenshots under ``docs/screenshots/`` through ``screenshot(page, name)``.
"""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="session")
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


@pytest.fixture
def screenshot() -> Callable[[Any, str], Path]:
    """``screenshot(page, "name")`` → docs/screenshots/name.png (the README shows the current set)."""

    def take(page: Any, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        out = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(out), full_page=True)
        return out

    return take
