"""Process-wide set-up done once at an entry point (CLI, flow, API): never at import time.

- switches off telemetry and update checks of every tool (MLflow, Prefect, DVC, GX,
  Evidently, Streamlit, TensorFlow noise);
- points Prefect at its home under the configured state folder when no API URL is set,
  with a start-up timeout long enough for slow machines; when one is set, checks that the
  server answers (:func:`check_prefect_api`), so a stopped server is one line naming the fix;
- configures logging once.
"""

from __future__ import annotations

import logging
import os

from pipeline.config import Settings
from pipeline.errors import OrchestratorUnavailable, XrayopsError

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "DVC_IGNORE_UPDATES": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
    "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    "HF_HUB_OFFLINE": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "KMP_WARNINGS": "0",
    "GIT_PYTHON_REFRESH": "quiet",
}


def quiet_tools() -> None:
    """Turn off telemetry of every tool (does not override values the user set)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def configure_prefect(settings: Settings) -> None:
    """Use a local Prefect home and a generous start-up timeout unless a server is configured.

    Raises:
        OrchestratorUnavailable: ``PREFECT_API_URL`` is set but that server does not answer.
    """
    quiet_tools()
    if not os.environ.get("PREFECT_API_URL"):
        home = settings.prefect_home
        home.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PREFECT_HOME", str(home))
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    hide_expected_tracebacks()
    check_prefect_api()


class _NoExpectedTraceback(logging.Filter):
    """Drop the traceback of an :class:`~pipeline.errors.XrayopsError` from a console log record.

    Such an error is worded for the person at the terminal, who sees it once more as the
    command's ``error:`` line; its traceback there is noise. Handlers of the logger that
    emitted the record run first, so Prefect's API log handler still sends the full
    traceback to the server (the run's logs in the UI keep it).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, XrayopsError):
            record.exc_info, record.exc_text = None, None
        return True


def hide_expected_tracebacks() -> None:
    """Console handlers of the root logger print expected errors (XrayopsError) without their traceback."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoExpectedTraceback) for f in handler.filters):
            handler.addFilter(_NoExpectedTraceback())


PREFECT_CHECK_TIMEOUT_S = 5.0


def check_prefect_api(*, required: bool = False) -> None:
    """Fail fast when ``PREFECT_API_URL`` is set and the server does not answer (nothing to check when unset).

    One ``GET /health`` through Prefect's own client (its TLS, auth and proxy settings), no
    retries. Only a failed connection counts: an HTTP error answer is Prefect's to report.

    Args:
        required: the command needs a server (deploy, worker, trigger): an unset URL is an error too.

    Raises:
        OrchestratorUnavailable: the server does not answer, or ``required`` and no URL is set.
    """
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        if required:
            raise OrchestratorUnavailable(
                "PREFECT_API_URL is not set: this command needs a Prefect server",
                hint="start one (`uv run prefect server start`, or `docker compose up -d prefect-server` in infra/) "
                     "and export PREFECT_API_URL=http://127.0.0.1:4200/api")
        return
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    # the URL from the environment now: Prefect reads its settings once, when first imported
    with temporary_settings({PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0}), \
            get_client(sync_client=True, httpx_settings={"timeout": PREFECT_CHECK_TIMEOUT_S}) as client:
        failure = client.api_healthcheck()
    if isinstance(failure, httpx.TransportError) and not isinstance(failure, httpx.ReadTimeout):
        from pipeline.tracking import mask_uri

        reason = (f"no connection within {PREFECT_CHECK_TIMEOUT_S:g} s" if isinstance(failure, httpx.TimeoutException)
                  else _connect_reason(failure))
        raise OrchestratorUnavailable(
            f"Prefect server at {mask_uri(url)} (PREFECT_API_URL) is not reachable ({reason})",
            hint="is it running? start it (`uv run prefect server start`, or `docker compose up -d prefect-server` "
                 "in infra/), or fix PREFECT_API_URL"
                 + ("" if required else " (unset it to run the flow on a temporary local server)"))


def _connect_reason(exc: BaseException) -> str:
    """The OS-level reason of a failed connection, in words (e.g. "connection refused")."""
    link: BaseException | None = exc
    while link is not None:
        if isinstance(link, OSError) and link.strerror:
            return "host name not resolved" if link.errno in (-2, -3, -5, 8, 11001) else str(link.strerror).lower()
        link = link.__cause__ or link.__context__
    return str(exc).lower() or type(exc).__name__


def configure_logging(level: str = "INFO") -> None:
    """Configure the root logger once (rich handler when available)."""
    root = logging.getLogger()
    if getattr(root, "_xrayops_configured", False):
        return
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    except ImportError:  # pragma: no cover
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("alembic", "urllib3", "httpx", "matplotlib", "PIL", "great_expectations", "absl", "h5py", "dvc",
                  "dvc_data", "dvc_objects", "scmrepo", "mlflow.store", "evidently"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root._xrayops_configured = True  # type: ignore[attr-defined]
