"""The API's limits over real HTTP on loopback.

``xrayops serve`` as a real process: one start-up line and no TensorFlow/CUDA noise; an unauthenticated (or
declared oversize) upload refused from its headers, the body never read; a small version of the load benchmark
(``benchmarks/bench_api_load.py``, the same code). In-process uvicorn: per-key rate limit (429), a full
inference queue (503), the per-request deadline (504) and a model load that does not stall predictions.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.bench_api_load import Server, png_images, proc_value, raw_upload, run_load, start_server, stop_server
from pipeline.config import Settings, with_overrides
from tests.serving.helpers import gated_copy, png, restore_champion, running_server

pytestmark = pytest.mark.slow

KEY = "limits-key-0123456789"
NOISE = ("cuInit", "cudart", "absl", "oneDNN", "cuda", "Uvicorn running", "Started server process",
         "Waiting for application startup", "Traceback")


@pytest.fixture(scope="module")
def served(champion_project: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """``xrayops serve`` in its own process (the params.yaml defaults; no rate limit: the load below measures
    capacity) and everything it printed until it was ready."""
    tmp = tmp_path_factory.mktemp("served")
    server = start_server(champion_project.root / "params.yaml",
                          [f"paths.production_log={tmp / 'log'}", "serve.alias_poll_s=3600",
                           "serve.rate_limit_per_s=null"], tmp / "server.log", key=KEY)
    try:
        yield server, server.text()
    finally:
        stop_server(server)


def test_serve_prints_one_start_up_line_and_no_tensorflow_noise(served: tuple[Server, str],
                                                                 champion_project: Settings) -> None:
    _, startup = served
    lines = [line for line in startup.splitlines() if line.strip()]
    assert len(lines) == 1, startup
    from pipeline.registry.read import get_alias

    champion = get_alias(champion_project, "champion")
    threshold = float(champion.tags["operating_threshold"])
    assert f"serving {champion_project.registered_model} v{champion.version} (alias champion)" in lines[0]
    assert "engine onnx" in lines[0] and f"threshold {threshold:.4g}" in lines[0]
    assert all(word in lines[0] for word in ("workers", "queue", "timeout", "uploads")), "the limits in force"
    assert not [token for token in NOISE if token in startup], startup


def test_unauthenticated_upload_is_refused_from_the_headers_and_never_read(served: tuple[Server, str]) -> None:
    server, _ = served
    pid = server.proc.pid
    before = proc_value(pid, "io", "rchar")  # bytes the server process has read, sockets included
    waited = raw_upload(server.port, 30_000_000, headers_first_s=10)
    assert waited.status == 401 and waited.sent_bytes == 0, "answered from the headers alone, before any body byte"
    assert waited.seconds < 5
    streamed = raw_upload(server.port, 30_000_000)  # a client that does not wait for an answer
    assert streamed.status == 401
    assert streamed.sent_bytes < 30_000_000, "the server closed the connection instead of draining the body"
    read = proc_value(pid, "io", "rchar") - before
    assert read < 1_000_000, f"the server read {read} bytes of two refused 30 MB uploads"


def test_declared_oversize_body_is_refused_with_413_before_it_is_sent(served: tuple[Server, str]) -> None:
    server, _ = served
    refused = raw_upload(server.port, 40_000_000, key=KEY, headers_first_s=10)
    assert refused.status == 413 and refused.sent_bytes == 0


def test_bounded_load_with_big_unauthenticated_uploads_has_no_errors(served: tuple[Server, str]) -> None:
    server, _ = served
    result = run_load(server, png_images(4, side=128), requests=60, in_flight=8, big=5, big_bytes=30_000_000,
                      key=KEY)
    summary = result.summary()
    assert summary["statuses"] == {"200": 60} and summary["errors"] == 0, summary
    assert summary["big_refused_401"] == 5, summary
    assert result.rss_peak - result.rss_before < 100 * 2**20, summary
    assert result.server_read_bytes < result.auth_body_bytes + 2_000_000, "the 150 MB of refused uploads unread"


# --------------------------------------------------------------------------- in-process servers, one setting each


@contextmanager
def api_with(settings: Settings, tmp_path: Path, *sets: str, store: Any = None) -> Iterator[tuple[str, Any]]:
    from pipeline.serving.app import create_app

    settings = with_overrides(settings, [f"paths.production_log={tmp_path / 'log'}", "serve.alias_poll_s=3600",
                                         "serve.log_flush_s=0.1", *sets])
    os.environ[settings.serve.api_key_env] = KEY
    try:
        app = create_app(settings, store=store)
        with running_server(app) as url:
            yield url, app
    finally:
        os.environ.pop(settings.serve.api_key_env, None)


def predict(url: str, index: int = 0, **params: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", files={"file": ("x.png", png(index))}, headers={"X-API-Key": KEY},
                      params=params, timeout=60)


def test_rate_limit_per_key_answers_429_with_retry_after(champion_project: Settings, tmp_path: Path) -> None:
    with api_with(champion_project, tmp_path, "serve.rate_limit_per_s=0.5", "serve.rate_limit_burst=2") as (url, _):
        wrong = [httpx.get(f"{url}/v1/model", headers={"X-API-Key": "nope"}).status_code for _ in range(3)]
        assert wrong == [401] * 3, "refused keys are refused first and spend no one's bucket"
        codes = [httpx.get(f"{url}/v1/model", headers={"X-API-Key": KEY}).status_code for _ in range(2)]
        limited = predict(url)
        assert codes == [200, 200] and limited.status_code == 429, limited.text
        assert limited.json()["error"]["reason"] == "rate_limited" and 1 <= int(limited.headers["Retry-After"]) <= 2
        assert httpx.get(f"{url}/readyz").status_code == 200, "probes are not rate limited"
        time.sleep(2.1)
        assert predict(url).status_code == 200, "the bucket refills at the rate"


def test_full_inference_queue_answers_503_with_retry_after(champion_project: Settings, tmp_path: Path) -> None:
    with api_with(champion_project, tmp_path, "serve.workers=1", "serve.max_queue=0",
                  "serve.rate_limit_per_s=null") as (url, app):
        with ThreadPoolExecutor(6) as pool:  # slow requests (Integrated Gradients), one thread, no queue
            responses = list(pool.map(lambda i: predict(url, i, explain="integrated_gradients"), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 503}, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.json()["error"]["reason"] == "overloaded" and int(busy.headers["Retry-After"]) >= 1
        assert app.state.pool.in_flight == 0 and predict(url).status_code == 200, "capacity comes back"


def test_request_past_its_deadline_answers_504_and_the_late_result_is_dropped(champion_project: Settings,
                                                                              tmp_path: Path) -> None:
    with api_with(champion_project, tmp_path, "serve.request_timeout_s=0.001") as (url, app):
        late = predict(url)
        assert late.status_code == 504, late.text
        assert late.json()["error"]["reason"] == "timeout"
        assert "serve.request_timeout_s=0.001" in late.json()["error"]["detail"]
        deadline = time.monotonic() + 10
        while app.state.pool.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.pool.in_flight == 0, "the dropped work finished and gave its thread back"
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_model_refresh_loads_beside_the_inference_pool(champion_project: Settings, tmp_path: Path) -> None:
    from pipeline.registry.read import get_alias
    from pipeline.registry.write import move_champion
    from pipeline.serving.model_store import ModelStore
    from pipeline.serving.predictor import load_predictor

    slow = threading.Event()

    def slow_loader(settings: Settings, version: Any, alias: str | None = None) -> Any:
        if slow.is_set():
            time.sleep(6)  # a big model loading
        return load_predictor(settings, version, alias=alias)

    settings = with_overrides(champion_project, [f"paths.production_log={tmp_path / 'log'}"])
    v1 = get_alias(settings, "champion")
    store = ModelStore(settings, loader=slow_loader)
    with api_with(champion_project, tmp_path, "serve.workers=1", store=store) as (url, _):
        v2 = gated_copy(settings, v1)
        move_champion(settings, v2.version, reason="refresh test")
        slow.set()
        try:
            with ThreadPoolExecutor(1) as background:
                refreshing = background.submit(httpx.post, f"{url}/v1/model/refresh", headers={"X-API-Key": KEY},
                                               timeout=60)
                time.sleep(0.5)
                for i in range(3):
                    started = time.perf_counter()
                    r = predict(url, 70 + i)
                    assert r.status_code == 200 and r.json()["model"]["version"] == str(v1.version)
                    assert time.perf_counter() - started < 3, "a prediction waited behind the model load"
                assert not refreshing.done(), "the load was still under way while predictions were answered"
                changed = refreshing.result().json()
            assert changed["changed"] and changed["model"]["version"] == str(v2.version)
            assert predict(url).json()["model"]["version"] == str(v2.version)
        finally:
            restore_champion(settings, v1.version)
