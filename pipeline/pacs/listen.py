"""Watch a PACS for new studies: poll Orthanc's change feed for ``StableStudy`` and process each one.

Why polling ``GET /changes`` rather than a hook inside Orthanc:

- it works with Debian's Orthanc as packaged (``orthanc`` + ``orthanc-dicomweb``): no ``orthanc-python`` plugin, no
  Lua script, nothing installed or configured inside the hospital's PACS, and no inbound connection from the PACS to
  us (the PACS network only has to let us in, as it already does for DICOMweb);
- ``StableStudy`` is Orthanc's own "no new instance for ``StableAge`` seconds" signal, the moment a study is complete
  enough to read (a study sent image by image would otherwise be scored on its first image);
- it is restartable: the feed is numbered (``Seq``), and the last sequence number handled is kept in
  ``<pacs.state_dir>/cursor.json``, replaced atomically after each change. After a crash or a restart the listener
  resumes after the last change it finished; a study being processed when the process died is processed again,
  which the idempotency of :func:`pipeline.pacs.process.process_study` (a study already holding this model
  version's SR is skipped; the SR's UIDs are stable, so a second store is the same instance) turns into
  exactly-once-ish: one SR per study and model version.

A *transient* outcome (the PACS unreachable, no verified model served) stops the batch *before* the cursor moves, so
the study is retried at the next poll; every other outcome (an SR, no frontal image, a gate refusal, a refusal by the
PACS) moves the cursor on. A first start begins at the feed's current end (``pacs.start_at: latest``: the listener
does not process the archive's history) or at its beginning (``beginning``).

The handler is a plain callable (study UID → outcome): the CLI passes one that runs the Prefect flow
``pacs_inference_flow`` in this process, starts a run of a deployment, or calls the library directly
(``pacs.dispatch``). This module never imports Prefect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import Settings
from pipeline.connections import connection_reason, mask_uri
from pipeline.errors import PacsError, PacsUnavailable
from pipeline.pacs import records
from pipeline.pacs.dicomweb import PacsAuth

logger = logging.getLogger(__name__)

STABLE_STUDY = "StableStudy"


class Outcome(Protocol):
    @property
    def transient(self) -> bool: ...

    def line(self) -> str: ...


@dataclass
class ListenSummary:
    """What one listener run did (de-identified lines only)."""

    polls: int = 0
    changes: int = 0
    studies: int = 0
    outcomes: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    last_seq: int | None = None
    pending_retry: bool = False


def orthanc_rest_url(dicomweb_url: str) -> str:
    """Orthanc's REST root from its DICOMweb root: ``http://host:8042/dicom-web`` → ``http://host:8042``."""
    parts = urlsplit(dicomweb_url)
    path = parts.path.rstrip("/")
    path = path.rsplit("/", 1)[0] if path else ""
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class OrthancChanges:
    """Orthanc's change feed (``/changes``) and the study lookup it needs, over one HTTP session."""

    def __init__(self, rest_url: str, *, auth: PacsAuth | None = None, timeout_s: float = 30.0) -> None:
        import requests

        self.masked_url = mask_uri(rest_url)
        parts = urlsplit(rest_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(f"Orthanc URL {self.masked_url!r} is not an http(s) URL with a host name",
                            hint="pass the DICOMweb root (e.g. http://pacs:8042/dicom-web) or set pacs.orthanc_url")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.timeout = timeout_s
        self._session = requests.Session()
        auth = auth or PacsAuth()
        if parts.username is not None and auth.kind == "none":
            auth = PacsAuth(parts.username, parts.password or "")
        if auth.username is not None:
            self._session.auth = (auth.username, auth.password or "")
        if auth.token is not None:
            self._session.headers["Authorization"] = f"Bearer {auth.token}"

    def close(self) -> None:
        self._session.close()

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        import requests

        where = f"Orthanc at {self.masked_url}"
        try:
            resp = self._session.get(f"{self.url}{path}", params=params, timeout=self.timeout)
        except requests.exceptions.Timeout:
            raise PacsUnavailable(f"{where} did not answer within {self.timeout:g} s") from None
        except requests.exceptions.ConnectionError as exc:
            raise PacsUnavailable(f"{where} is not reachable ({connection_reason(exc)})",
                                  hint="check --url / pacs.orthanc_url and that Orthanc is running") from None
        except requests.exceptions.RequestException as exc:
            raise PacsError(f"{where}: request failed ({type(exc).__name__})") from None
        if resp.status_code >= 500:
            raise PacsUnavailable(f"{where} failed (HTTP {resp.status_code})", status=resp.status_code)
        if resp.status_code != 200:
            raise PacsError(f"{where} refused a request of the listener (HTTP {resp.status_code})",
                            status=resp.status_code,
                            hint="the change feed is Orthanc's REST API: check the URL and the credentials")
        try:
            return resp.json()
        except ValueError:
            raise PacsError(f"{where} answered something that is not JSON: is it Orthanc?") from None

    def last_seq(self) -> int:
        """The sequence number of the feed's newest change (0 when empty)."""
        return int(self._get("/changes", {"last": ""}).get("Last", 0))

    def fetch(self, since: int, limit: int) -> tuple[list[dict[str, Any]], int, bool]:
        """Changes after ``since`` (at most ``limit``), the feed's last seq, and whether the feed is exhausted."""
        page = self._get("/changes", {"since": since, "limit": limit})
        return list(page.get("Changes", [])), int(page.get("Last", since)), bool(page.get("Done", True))

    def study_uid(self, orthanc_id: str) -> str | None:
        """The StudyInstanceUID of an Orthanc study id (None when the study was deleted meanwhile)."""
        try:
            study = self._get(f"/studies/{orthanc_id}")
        except PacsError as exc:
            if exc.status == 404:
                return None
            raise
        return (study.get("MainDicomTags") or {}).get("StudyInstanceUID")


def start_cursor(settings: Settings, changes: OrthancChanges) -> int:
    """The persisted cursor, or (first start) where ``pacs.start_at`` says, persisted at once."""
    cursor = records.read_cursor(settings)
    if cursor is None:
        cursor = 0 if settings.pacs.start_at == "beginning" else changes.last_seq()
        records.write_cursor(settings, cursor)
        logger.info("PACS listener: first start, cursor at change %d (pacs.start_at=%s)", cursor,
                    settings.pacs.start_at)
    return cursor


def poll_once(settings: Settings, changes: OrthancChanges, handle: Callable[[str], Outcome | None],
              summary: ListenSummary) -> bool:
    """Handle every pending change; True when the feed is exhausted, False when a transient outcome stopped it."""
    cursor = start_cursor(settings, changes)
    while True:
        batch, _last, done = changes.fetch(cursor, settings.pacs.changes_limit)
        summary.polls += 1
        for change in batch:
            seq = int(change["Seq"])
            summary.changes += 1
            if change.get("ChangeType") == STABLE_STUDY:
                uid = changes.study_uid(str(change.get("ID", "")))
                outcome = handle(uid) if uid else None
                if outcome is not None:
                    summary.studies += 1
                    summary.outcomes.append(outcome.line())
                    status = str(getattr(outcome, "status", "submitted"))
                    summary.statuses[status] = summary.statuses.get(status, 0) + 1
                    if outcome.transient:
                        summary.pending_retry = True
                        return False  # the cursor stays before this change: retried at the next poll
            cursor = seq
            records.write_cursor(settings, cursor)
            summary.last_seq = cursor
        if done or not batch:
            return True


def listen(settings: Settings, changes: OrthancChanges, handle: Callable[[str], Outcome | None], *,
           once: bool = False, max_seconds: float | None = None,
           sleep: Callable[[float], None] = time.sleep) -> ListenSummary:
    """Poll the feed every ``pacs.poll_s`` seconds and hand each stable study to ``handle``.

    ``once``: handle what is pending and return. ``max_seconds``: return after that long (between polls).
    A PACS that cannot be reached is logged (one line) and polled again, except with ``once``, which raises.

    Raises:
        PacsError: with ``once``, the feed could not be read; always, when the PACS refuses (401/403/404).
    """
    summary = ListenSummary()
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    while True:
        try:
            poll_once(settings, changes, handle, summary)
        except PacsUnavailable as exc:
            if once:
                raise
            logger.warning("PACS listener: %s; polling again in %g s", str(exc).splitlines()[0],
                           settings.pacs.poll_s)
        if once or (deadline is not None and time.monotonic() >= deadline):
            return summary
        wait = settings.pacs.poll_s if deadline is None else min(settings.pacs.poll_s, deadline - time.monotonic())
        sleep(max(0.0, wait))
