"""Prefect set-up done once at an entry point (the CLI, before it runs a flow or talks to a server).

- points Prefect at its home under the configured state folder when no API URL is set,
  with a start-up timeout long enough for slow machines; when one is set, checks that the
  server answers (:func:`check_prefect_api`), so a stopped server is one line naming the fix;
- console logs show expected errors (:class:`~pipeline.errors.XrayopsError`) without a traceback.

This lives in ``flows/`` because it imports Prefect; ``pipeline/`` stays free of it.
"""

from __future__ import annotations

import logging
import os

from pipeline.config import Settings
from pipeline.connections import connection_reason, mask_uri
from pipeline.errors import OrchestratorUnavailable, XrayopsError
from pipeline.runtime import quiet_tools


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
        reason = (f"no connection within {PREFECT_CHECK_TIMEOUT_S:g} s" if isinstance(failure, httpx.TimeoutException)
                  else connection_reason(failure))
        raise OrchestratorUnavailable(
            f"Prefect server at {mask_uri(url)} (PREFECT_API_URL) is not reachable ({reason})",
            hint="is it running? start it (`uv run prefect server start`, or `docker compose up -d prefect-server` "
                 "in infra/), or fix PREFECT_API_URL"
                 + ("" if required else " (unset it to run the flow on a temporary local server)"))
