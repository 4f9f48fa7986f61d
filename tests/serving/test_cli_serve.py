"""`xrayops serve`: refuses to start without an API key; serves, logs and flushes on shutdown as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import Settings
from pipeline.serving import production_log
from tests.conftest import REPO
from tests.serving.helpers import free_port, png


def test_serve_without_api_key_fails_with_a_fix(make_settings: Callable[..., Settings],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings()
    monkeypatch.delenv(settings.serve.api_key_env, raising=False)
    result = CliRunner().invoke(app, ["serve", "--params", str(settings.root / "params.yaml")])
    assert result.exit_code == 2
    assert "XRAYOPS_API_KEY" in result.output and "serve.require_api_key=false" in result.output


@pytest.mark.slow
def test_serve_command_runs_uvicorn_and_flushes_the_log_on_shutdown(champion_project: Settings,
                                                                    tmp_path: Path) -> None:
    port, log_dir = free_port(), tmp_path / "log"
    env = {**os.environ, "XRAYOPS_API_KEY": "k-123"}
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--params", str(champion_project.root / "params.yaml"), "--set", f"paths.production_log={log_dir}",
           "--set", "serve.log_flush_s=600", "--set", "serve.engine=tf"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:] if proc.stdout else ""
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready within 120 s"
            time.sleep(0.5)
        r = httpx.post(f"{url}/v1/predict", files={"file": ("a.png", png(1))}, headers={"X-API-Key": "k-123"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["model"]["version"] == "1"
        assert httpx.get(f"{url}/readyz").json()["engine"] == "tf"
        assert production_log.count_rows(log_dir) == 0, "buffered (flush interval 600 s)"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert production_log.count_rows(log_dir) == 1, "graceful shutdown flushes the buffer"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
