"""The API's limits as plain objects (fast): token buckets, the bounded inference pool with its deadline, and the
filter that keeps TensorFlow's native start-up noise off stderr. The same limits over real HTTP: test_api_limits.py."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from pipeline.errors import ApiError
from pipeline.runtime import native_stderr_filtered
from pipeline.serving.limits import InferencePool, TokenBucket, key_problem


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_the_burst_then_the_rate_per_key() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5), "the 4th waits for one token at 2/s"
    assert bucket.take("b") == 0.0, "another key has its own bucket"
    clock.now += 0.25
    assert bucket.take("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.take("a") == 0.0
    clock.now += 60
    assert [bucket.take("a") for _ in range(4)][-1] > 0, "saving up stops at the burst"


def test_key_problem_names_missing_and_wrong_keys() -> None:
    assert key_problem("k", None) is None and key_problem("secret", "secret") is None
    missing, wrong = key_problem(None, "secret"), key_problem("nope", "secret")
    assert (missing.status, missing.reason) == (401, "missing_api_key")
    assert (wrong.status, wrong.reason) == (401, "invalid_api_key")


def test_pool_refuses_beyond_workers_plus_queue_with_retry_after() -> None:
    pool = InferencePool(workers=1, max_queue=1, timeout_s=10)
    release = threading.Event()

    async def scenario() -> list[object]:
        first = asyncio.create_task(pool.run(release.wait))
        second = asyncio.create_task(pool.run(lambda: "queued ran"))
        await asyncio.sleep(0.05)
        assert pool.in_flight == 2 and pool.full
        with pytest.raises(ApiError) as refused:
            await pool.run(lambda: "never")
        assert refused.value.status == 503 and refused.value.reason == "overloaded"
        assert int(refused.value.headers["Retry-After"]) >= 1
        release.set()
        return list(await asyncio.gather(first, second))

    try:
        assert asyncio.run(scenario()) == [True, "queued ran"]
        assert pool.in_flight == 0
    finally:
        pool.shutdown()


def test_pool_deadline_gives_504_drops_queued_work_and_holds_the_slot_of_running_work() -> None:
    pool = InferencePool(workers=1, max_queue=1, timeout_s=0.2)
    release, ran = threading.Event(), []

    async def scenario() -> None:
        running = asyncio.create_task(pool.run(release.wait))
        queued = asyncio.create_task(pool.run(lambda: ran.append("queued")))
        for task in (running, queued):
            with pytest.raises(ApiError) as late:
                await task
            assert late.value.status == 504 and late.value.reason == "timeout"
            assert "serve.request_timeout_s=0.2" in late.value.detail

    try:
        asyncio.run(scenario())
        assert pool.in_flight == 1, "the running call still holds its thread; the queued one was dropped"
        release.set()
        deadline = time.monotonic() + 5
        while pool.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.in_flight == 0 and ran == [], "a call whose caller gave up while it waited never runs"
    finally:
        pool.shutdown()


def test_native_stderr_filter_drops_tensorflow_start_up_noise_only(capfd: pytest.CaptureFixture[str]) -> None:
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        "I0000 00:00:1796118131.904302   13490 port.cc:153] oneDNN custom operations are on.\n",
        "I0000 00:00:1796118131.904578   13490 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n",
        "E0000 00:00:1796118134.486208   13490 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
        "Failed call to cuInit: UNKNOWN ERROR (303)\n",
    ]
    kept = "E0000 00:00:1796118134.5   13490 some_op.cc:1] a real native error\n"
    with native_stderr_filtered():
        for line in [*noise[:2], kept, *noise[2:]]:
            os.write(2, line.encode())
    err = capfd.readouterr().err
    assert err == kept
