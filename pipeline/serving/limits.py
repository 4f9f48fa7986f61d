"""What the API refuses before it spends anything on a request, and how it bounds what it accepts.

:class:`RequestGuard` is pure ASGI middleware that answers from the request line and headers alone,
*before* a byte of the body is read (FastAPI parses a multipart body before it runs any dependency,
so a dependency cannot do this). In order:

1. ``/v1/*`` without a valid ``X-API-Key`` → 401 (an unauthenticated client cannot make the server
   receive, parse or spool an upload);
2. a key over its token bucket (``serve.rate_limit_per_s``, ``serve.rate_limit_burst``) → 429 + ``Retry-After``;
3. a ``Content-Length`` over ``serve.max_upload_bytes`` → 413;
4. ``/v1/predict`` while the inference pool is full → 503 ``overloaded`` + ``Retry-After``;
5. a body (chunked, or lying about its length) that grows past the limit while it streams → 413.

Refusals that leave a body unread carry ``Connection: close``, so the server drops the connection instead of
reading the rest of the upload to keep it alive.

:class:`InferencePool` runs predictions on ``serve.workers`` threads with at most ``serve.max_queue``
waiting (503 beyond that) and a deadline per request (``serve.request_timeout_s``, 504): a request still
queued at its deadline never runs; one already running finishes and its answer is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi.responses import JSONResponse

from pipeline.errors import ApiError, Rejected

T = TypeVar("T")

API_KEY_HEADER = "X-API-Key"
MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers around the file
PROTECTED_PREFIX = "/v1/"
PREDICT_PATH = "/v1/predict"


def error_response(status: int, reason: str, detail: str, request_id: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's one error shape: ``{"error": {"reason", "detail", "request_id"}}``."""
    body = {"error": {"reason": reason, "detail": detail, "request_id": request_id}}
    return JSONResponse(body, status_code=status,
                        headers={**(headers or {}), **({"X-Request-ID": request_id} if request_id else {})})


def key_problem(sent: str | None, expected: str | None) -> ApiError | None:
    """Why ``sent`` is not the API key (None: it is, or keys are off). Constant-time comparison."""
    if expected is None:
        return None
    if not sent:
        return ApiError(401, "missing_api_key", f"send the API key in the {API_KEY_HEADER} header",
                        headers={"WWW-Authenticate": "APIKey"})
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        return ApiError(401, "invalid_api_key", f"the {API_KEY_HEADER} header does not hold a valid key",
                        headers={"WWW-Authenticate": "APIKey"})
    return None


class TokenBucket:
    """Per-key token buckets: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, time of last update)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Spend one token of ``key``: 0.0 when allowed, else the seconds until a token is there."""
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class InferencePool:
    """A bounded thread pool with a deadline per call (see the module docstring)."""

    def __init__(self, workers: int, max_queue: int, timeout_s: float, name: str = "inference") -> None:
        self.workers, self.capacity, self.timeout_s = workers, workers + max_queue, timeout_s
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._in_flight = 0  # queued + running, including running work whose caller timed out
        self._mean_s = 0.05  # moving average of one call's run time, for Retry-After

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def full(self) -> bool:
        return self._in_flight >= self.capacity

    def retry_after_s(self) -> int:
        """Whole seconds until a queued request would likely start (≥ 1)."""
        waiting = max(0, self._in_flight - self.workers + 1)
        return max(1, math.ceil(waiting * self._mean_s / self.workers))

    def overloaded(self, request_id: str | None = None) -> ApiError:
        wait = self.retry_after_s()
        return ApiError(503, "overloaded", f"the server is busy ({self._in_flight} predictions in flight, "
                        f"serve.workers + serve.max_queue = {self.capacity}): retry after {wait} s",
                        request_id, headers={"Retry-After": str(wait)})

    async def run(self, fn: Callable[[], T], request_id: str | None = None) -> T:
        """Run ``fn`` on a worker thread and return its result.

        Raises:
            ApiError: 503 ``overloaded`` when the pool is full, 504 ``timeout`` past ``timeout_s``.
        """
        with self._lock:
            if self._in_flight >= self.capacity:
                raise self.overloaded(request_id)
            self._in_flight += 1
        try:
            future = self._executor.submit(self._timed, fn)
        except RuntimeError:  # shut down
            self._release(None)
            raise ApiError(503, "overloaded", "the server is shutting down", request_id) from None
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            future.cancel()  # still queued: it never runs; running: it finishes, the result is dropped
            raise ApiError(504, "timeout", f"no answer within serve.request_timeout_s={self.timeout_s:g} s "
                           "(the server is overloaded or the request is unusually slow): retry later",
                           request_id) from None

    def _timed(self, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return fn()
        finally:
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - started)

    def _release(self, _: Future[Any] | None) -> None:
        with self._lock:
            self._in_flight -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length", b"0")
    return b"chunked" in headers.get(b"transfer-encoding", b"").lower() or not length.isdigit() or int(length) > 0


class RequestGuard:
    """Pure ASGI middleware: auth, rate limit, declared size and pool capacity from the headers, then a streamed
    size limit (see the module docstring). ``on_too_large(request_id, Rejected)`` is told of every 413."""

    def __init__(self, app: Any, *, api_key: str | None, body_limit: int, max_upload_bytes: int,
                 limiter: TokenBucket | None, pool: InferencePool | None,
                 on_too_large: Callable[[str, Rejected], None] | None = None) -> None:
        self.app, self.api_key, self.limit, self.max_upload = app, api_key, body_limit, max_upload_bytes
        self.limiter, self.pool, self.on_too_large = limiter, pool, on_too_large

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refusal = self._refusal(scope["path"], headers, scope.get("state", {}).get("request_id"))
        if refusal is not None:
            extra = {"Connection": "close"} if _has_body(headers) else {}
            return await error_response(refusal.status, refusal.reason, refusal.detail, refusal.request_id,
                                        {**(refusal.headers or {}), **extra})(scope, receive, send)
        await self._streamed(scope, receive, send)

    def _refusal(self, path: str, headers: dict[bytes, bytes], request_id: str | None) -> ApiError | None:
        if path.startswith(PROTECTED_PREFIX):
            sent = headers.get(API_KEY_HEADER.lower().encode())
            problem = key_problem(sent.decode("latin-1") if sent is not None else None, self.api_key)
            if problem is not None:
                problem.request_id = request_id
                return problem
            if self.limiter is not None:
                # the key's bucket (a hash, never the key itself, names it in memory)
                wait = self.limiter.take(_bucket_name(sent))
                if wait > 0:
                    seconds = max(1, math.ceil(wait))
                    return ApiError(429, "rate_limited", f"more than serve.rate_limit_per_s={self.limiter.rate:g} "
                                    f"requests a second with this key: retry after {seconds} s", request_id,
                                    headers={"Retry-After": str(seconds)})
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return self._too_large(int(length), request_id)
        if path == PREDICT_PATH and self.pool is not None and self.pool.full:
            return self.pool.overloaded(request_id)
        return None

    def _too_large(self, size: int, request_id: str | None) -> ApiError:
        request_id = request_id or uuid.uuid4().hex
        detail = f"request body of {size}+ bytes exceeds serve.max_upload_bytes={self.max_upload}"
        if self.on_too_large is not None:
            self.on_too_large(request_id, Rejected("too_large", detail))
        return ApiError(413, "too_large", detail, request_id, headers={"Connection": "close"})

    async def _streamed(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen, started, rejected = 0, False, False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not started:
                    # Answer now; the app sees a disconnect and its own response is dropped.
                    rejected = True
                    exc = self._too_large(seen, scope.get("state", {}).get("request_id"))
                    await error_response(exc.status, exc.reason, exc.detail, exc.request_id,
                                         exc.headers)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, tracking_send)


def _bucket_name(key: bytes | None) -> str:
    return hashlib.sha256(key or b"").hexdigest()[:16]
