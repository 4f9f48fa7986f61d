"""The FastAPI app: ``POST /v1/predict``, ``GET /v1/model``, ``POST /v1/model/refresh``, ``/healthz``, ``/readyz``.

Run it with ``xrayops serve --host H --port P`` (uvicorn, one process). Inference runs on a
bounded pool of ``serve.workers`` threads with at most ``serve.max_queue`` waiting and a deadline
per request; model loads (start-up, alias moves, ``/v1/model/refresh``) run on a thread of their own,
so a slow load never stalls predictions. The event loop only parses requests.
The API key comes from the environment variable named by ``serve.api_key_env`` and is
sent in the ``X-API-Key`` header; ``serve.require_api_key=false`` disables it for local use.
Keys, rate limit and sizes are checked from the headers before any body is read
(:mod:`pipeline.serving.limits`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import os
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import Settings
from pipeline.errors import REJECTION_REASONS as REASONS
from pipeline.errors import ApiError, ConfigError, ExplainUnavailable, NotReady, Rejected
from pipeline.registry.contract import VersionTags
from pipeline.serving.limits import (
    API_KEY_HEADER,
    MULTIPART_SLACK,
    InferencePool,
    RequestGuard,
    TokenBucket,
    error_response,
    key_problem,
)
from pipeline.serving.model_store import ModelStore
from pipeline.serving.production_log import LogWriter
from pipeline.serving.schemas import (
    ErrorOut,
    ExplanationOut,
    Health,
    MetricOut,
    ModelInfo,
    ModelRef,
    PredictionOut,
    Readiness,
    RefreshOut,
    error_example,
)
from pipeline.serving.service import EXPLAIN_CHOICES, InferenceService, explain_method
from pipeline.serving.trust import REASONS as TRUST_REASONS

logger = logging.getLogger(__name__)

def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    by_status: dict[int, dict[str, Any]] = {}
    extra = {401: ("invalid_api_key", "missing or wrong X-API-Key header (checked before the body is read)"),
             429: ("rate_limited", "more than serve.rate_limit_per_s requests a second with this key; see "
                                   "Retry-After"),
             503: ("overloaded", "serve.workers + serve.max_queue predictions already in flight; see Retry-After"),
             504: ("timeout", "no answer within serve.request_timeout_s"),
             501: ("explain_unavailable", "Grad-CAM is not available for this model"),
             400: ("unknown_explain_method", f"`explain` is not one of {', '.join(EXPLAIN_CHOICES)}")}
    table = {**{r: v for r, v in REASONS.items()}, **{v[0]: (s, v[1]) for s, v in extra.items()},
             "model_not_ready": (503, "no model loaded yet for alias 'champion'"),
             **{r: (503, meaning) for r, meaning in TRUST_REASONS.items()}}
    for reason, (status, meaning) in table.items():
        if status in statuses:
            by_status.setdefault(status, {"model": ErrorOut, "description": "", "content": {
                "application/json": {"examples": {}}}})
            by_status[status]["description"] += f"`{reason}`: {meaning}. "
            by_status[status]["content"]["application/json"]["examples"][reason] = {
                "summary": meaning, "value": error_example(reason, meaning)}
    if 422 in statuses:
        by_status[422]["content"]["application/json"]["examples"]["invalid_request"] = {
            "summary": "the request is malformed (e.g. no `file` part)",
            "value": error_example("invalid_request", "body.file: Field required")}
    return dict(by_status)


class RequestId:
    """Pure ASGI middleware: a request id in ``request.state.request_id`` and the ``X-Request-ID`` header."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def api_key_from_env(settings: Settings) -> str | None:
    """The configured API key, or None when keys are disabled.

    Raises:
        ConfigError: keys are required but the environment variable is unset or empty.
    """
    cfg = settings.serve
    if not cfg.require_api_key:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise ConfigError(f"serve.require_api_key is true but ${cfg.api_key_env} is not set: export "
                          f"{cfg.api_key_env}=<a long random secret> (clients send it as {API_KEY_HEADER}), or "
                          "pass --set serve.require_api_key=false for local use only")
    return key


def model_info(store: ModelStore) -> ModelInfo:
    p = store.require()
    lineage = VersionTags.from_tags(p.tags)
    metrics: dict[str, MetricOut] = {}
    for name, metric in lineage.test_metrics.items():
        if metric.ci is not None and any(b is not None and b != b for b in metric.ci):
            continue  # a NaN interval cannot travel as JSON
        metrics[name] = MetricOut(value=metric.value, ci=list(metric.ci) if metric.ci is not None else None)
    return ModelInfo(name=p.model_name, version=p.version, alias=store.alias, threshold=p.threshold,
                     threshold_policy=lineage.threshold_policy, classes=p.classes,
                     positive_class=p.positive_class, input_size=p.spec.image_size, input_channels=p.spec.channels,
                     engine=getattr(p.engine, "name", "?"), embedding_components=len(p.pca.components) if p.pca else 0,
                     metrics=metrics, run_id=p.run_id, loaded_at=store.loaded_at, reason=store.reason,
                     detail=store.detail)


def create_app(settings: Settings, *, store: ModelStore | None = None, poll: bool = True) -> FastAPI:
    """Build the app; the model loads (and the log writer starts) when the app starts."""
    api_key = api_key_from_env(settings)
    store = store or ModelStore(settings)
    writer = LogWriter(settings.production_log, settings.serve.log_flush_s)
    service = InferenceService(settings, store, writer)
    cfg = settings.serve
    pool = InferencePool(cfg.workers, cfg.max_queue, cfg.request_timeout_s)
    loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")  # never the inference threads

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        writer.start()
        await asyncio.get_running_loop().run_in_executor(loads, store.start if poll else store.refresh)
        line = startup_line(settings, store, getattr(app.state, "bind", None))
        logger.log(logging.INFO if store.current is not None else logging.WARNING, "%s", line)
        try:
            yield
        finally:
            store.stop()
            pool.shutdown()
            loads.shutdown(wait=True)
            writer.close()

    app = FastAPI(title="xrayops inference API", version="1", lifespan=lifespan,
                  description=_DESCRIPTION.format(header=API_KEY_HEADER, env=settings.serve.api_key_env),
                  openapi_tags=[{"name": "inference", "description": "Score chest X-rays."},
                                {"name": "model", "description": "The served model version."},
                                {"name": "operations", "description": "Probes for orchestrators."}])
    app.state.store, app.state.service, app.state.writer, app.state.pool = store, service, writer, pool
    limiter = TokenBucket(cfg.rate_limit_per_s, cfg.rate_limit_burst) if cfg.rate_limit_per_s else None
    app.add_middleware(RequestGuard, api_key=api_key, body_limit=cfg.max_upload_bytes + MULTIPART_SLACK,
                       max_upload_bytes=cfg.max_upload_bytes, limiter=limiter, pool=pool,
                       on_too_large=lambda rid, exc: service.log_rejection(rid, exc, None, "api"))
    app.add_middleware(RequestId)  # added last = outermost: every response, refusals included, has an id
    _handlers(app)
    auth = _auth_dependency(api_key)
    _routes(app, settings, store, service, pool, loads, auth)
    return app


def startup_line(settings: Settings, store: ModelStore, bind: str | None = None) -> str:
    """The one line the server logs when it is up: what it serves (model, version, engine, threshold) and its
    limits, or why it serves nothing."""
    cfg = settings.serve
    rate = f"{cfg.rate_limit_per_s:g}/s per key" if cfg.rate_limit_per_s else "no rate limit"
    limits = (f"workers {cfg.workers}, queue {cfg.max_queue}, timeout {cfg.request_timeout_s:g} s, {rate}, "
              f"uploads ≤ {cfg.max_upload_bytes} B")
    where = f" on {bind}" if bind else ""
    p = store.current
    if p is None:
        return f"xrayops API{where}: NOT serving ({store.reason}: {store.detail}); {limits}"
    threshold = f"{p.threshold:.4g}" if p.threshold is not None else "none (multi-class)"
    return (f"xrayops API{where}: serving {p.model_name} v{p.version} (alias {store.alias}), engine "
            f"{getattr(p.engine, 'name', '?')}, threshold {threshold}; {limits}")


def _auth_dependency(api_key: str | None) -> Any:
    """Documents the key in OpenAPI; :class:`RequestGuard` has already enforced it before the body was read."""
    scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                          description="API key (value of the environment variable named by serve.api_key_env).")

    async def check(key: str | None = Depends(scheme)) -> None:
        problem = key_problem(key, api_key)
        if problem is not None:
            raise problem

    return check


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.reason, exc.detail, exc.request_id, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (a malformed multipart body, an unknown path) in the API's error shape
        reason = _HTTP_REASONS.get(exc.status_code, "http_error")
        return error_response(exc.status_code, reason, str(exc.detail), getattr(request.state, "request_id", None),
                              dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(422, "invalid_request", detail)


_HTTP_REASONS = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


def _routes(app: FastAPI, settings: Settings, store: ModelStore, service: InferenceService,
            pool: InferencePool, loads: ThreadPoolExecutor, auth: Any) -> None:
    cfg = settings.serve

    @app.post("/v1/predict", response_model=PredictionOut, tags=["inference"], dependencies=[Depends(auth)],
              responses=_responses(400, 401, 413, 415, 422, 429, 501, 503, 504), summary="Score one chest X-ray")
    async def predict(
        request: Request,
        file: Annotated[UploadFile, File(description="PNG, JPEG or DICOM file (format detected from the content).")],
        explain: Annotated[str, Query(
            description="Also return an explanation overlay (PNG, base64); slower. `true` = `gradcam`; "
            "`integrated_gradients` and `smoothgrad` are pixel attributions (steps / samples from the `evaluate` "
            "settings, about 0.1-1 s on CPU). Anything else is refused with 400 `unknown_explain_method`.",
            openapi_examples={m: {"summary": m, "value": m} for m in EXPLAIN_CHOICES})] = "false",
        view_position: Annotated[str | None, Form(description="View (PA, AP, LL) when the file has none.")] = None,
    ) -> PredictionOut:
        """Gate the upload, score it with the served version and log the prediction (features only, no pixels).

        The label applies the version's locked operating threshold. Rejections return 4xx with a reason code
        and are logged (reason only)."""
        request_id = request.state.request_id
        try:
            method = explain_method(explain)
        except ValueError as exc:
            raise ApiError(400, "unknown_explain_method", str(exc), request_id) from None
        data = await file.read(cfg.max_upload_bytes + 1)
        call = functools.partial(service.predict, data, request_id=request_id, view_position=view_position,
                                 explain=method or False)
        try:
            result = await pool.run(call, request_id)
        except Rejected as exc:
            raise ApiError(exc.status, exc.reason, exc.detail, request_id) from None
        except NotReady as exc:
            raise ApiError(503, exc.reason, str(exc), request_id) from None
        except ExplainUnavailable as exc:
            raise ApiError(501, "explain_unavailable", str(exc), request_id) from None
        explanation = (ExplanationOut(overlay_png_base64=base64.b64encode(result.explanation.overlay_png).decode(),
                                      method=result.explanation.method) if result.explanation else None)
        return PredictionOut(request_id=request_id, probability=result.probability, label=result.label,
                             threshold=result.threshold, positive_class=result.positive_class,
                             probabilities=result.probabilities, latency_ms=round(result.latency_ms, 2),
                             model=ModelRef(name=result.model_name, version=result.model_version, alias=result.alias),
                             explanation=explanation)

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"], dependencies=[Depends(auth)],
             responses=_responses(401, 429, 503), summary="The served model version")
    async def model() -> ModelInfo:
        """Name, version, alias, locked threshold and headline test metrics of the served version; `reason` says
        when it is the last verified version but no longer verified as the alias's version (e.g. `alias_missing`)."""
        try:
            return model_info(store)
        except NotReady as exc:
            raise ApiError(503, exc.reason, str(exc)) from None

    @app.post("/v1/model/refresh", response_model=RefreshOut, tags=["model"], dependencies=[Depends(auth)],
              responses=_responses(401, 429), summary="Check the alias now")
    async def refresh() -> RefreshOut:
        """Check the registry alias immediately (it is also polled every `serve.alias_poll_s` seconds). A moved
        alias is loaded on a thread of its own: predictions go on with the current version meanwhile."""
        changed = await asyncio.get_running_loop().run_in_executor(loads, store.refresh)
        return RefreshOut(changed=changed, model=model_info(store) if store.current else None)

    @app.get("/healthz", response_model=Health, tags=["operations"], summary="Liveness")
    async def healthz() -> Health:
        """The process is up (no authentication)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, tags=["operations"], summary="Readiness",
             responses={503: {"model": Readiness, "description": "No verified model: `reason` says why and "
                                                                  "`serving` whether predictions are still answered."}})
    async def readyz() -> Any:
        """Ready (200) when a model is served and the last registry check verified it is the gated version holding
        the alias; otherwise 503 with a stable `reason` (no authentication)."""
        state = {k: v for k, v in store.status().items() if k in Readiness.model_fields}
        return state if state["ready"] else JSONResponse(state, status_code=503)


_DESCRIPTION = """Scores chest radiographs with the registry version holding the served alias
(`champion` by default) and logs every prediction's image features, embedding components and output
(never pixels or patient data) for drift monitoring.

**Authentication**: send the API key in the `{header}` header (the server reads it from `${env}`).

**Errors** always look like `{{"error": {{"reason": ..., "detail": ..., "request_id": ...}}}}`; `reason` is a stable
code (see each endpoint's responses).
"""


def run(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve with uvicorn in this process (blocks)."""
    import uvicorn

    host, port = host or settings.serve.host, port or settings.serve.port
    app = create_app(settings)
    app.state.bind = f"http://{host}:{port}"  # for the start-up line, which replaces uvicorn's info lines
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
