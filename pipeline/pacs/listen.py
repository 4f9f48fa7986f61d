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

For a PACS without this feed, :class:`QidoStudies` (``pacs.feed: qido``) finds stable studies with QIDO-RS alone:
studies of the last days by StudyDate whose instance count has not changed for ``pacs.qido_quiet_s`` seconds.

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


class ListenOutcome(Protocol):
    @property
    def transient(self) -> bool: ...

    def line(self) -> str: ...


class Feed(Protocol):
    def poll(self, settings: Settings, handle: Callable[[str], ListenOutcome | None],
             summary: ListenSummary) -> bool: ...


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

    def poll(self, settings: Settings, handle: Callable[[str], ListenOutcome | None], summary: ListenSummary) -> bool:
        """One poll of the feed (:func:`poll_once`)."""
        return poll_once(settings, self, handle, summary)

    def study_uid(self, orthanc_id: str) -> str | None:
        """The StudyInstanceUID of an Orthanc study id (None when the study was deleted meanwhile)."""
        try:
            study = self._get(f"/studies/{orthanc_id}")
        except PacsError as exc:
            if exc.status == 404:
                return None
            raise
        return (study.get("MainDicomTags") or {}).get("StudyInstanceUID")


def _handled(summary: ListenSummary, outcome: ListenOutcome | None) -> bool:
    """Count an outcome; True when it is transient (to be retried)."""
    if outcome is None:
        return False
    summary.studies += 1
    summary.outcomes.append(outcome.line())
    status = str(getattr(outcome, "status", "submitted"))
    summary.statuses[status] = summary.statuses.get(status, 0) + 1
    if outcome.transient:
        summary.pending_retry = True
    return outcome.transient


def start_cursor(settings: Settings, changes: OrthancChanges) -> int:
    """The persisted cursor, or (first start) where ``pacs.start_at`` says, persisted at once."""
    cursor = records.read_cursor(settings)
    if cursor is None:
        cursor = 0 if settings.pacs.start_at == "beginning" else changes.last_seq()
        records.write_cursor(settings, cursor)
        logger.info("PACS listener: first start, cursor at change %d (pacs.start_at=%s)", cursor,
                    settings.pacs.start_at)
    return cursor


def poll_once(settings: Settings, changes: OrthancChanges, handle: Callable[[str], ListenOutcome | None],
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
                if uid and _handled(summary, handle(uid)):
                    return False  # transient: the cursor stays before this change, retried at the next poll
            cursor = seq
            records.write_cursor(settings, cursor)
            summary.last_seq = cursor
        if done or not batch:
            return True


def listen(settings: Settings, feed: Feed, handle: Callable[[str], ListenOutcome | None], *,
           once: bool = False, max_seconds: float | None = None,
           sleep: Callable[[float], None] = time.sleep) -> ListenSummary:
    """Poll ``feed`` (:class:`OrthancChanges` or :class:`QidoStudies`) every ``pacs.poll_s`` seconds and hand each
    stable study to ``handle``.

    ``once``: handle what is pending and return. ``max_seconds``: return after that long (between polls).
    A PACS that cannot be reached is logged (one line) and polled again, except with ``once``, which raises.

    Raises:
        PacsError: with ``once``, the feed could not be read; always, when the PACS refuses (401/403/404).
    """
    summary = ListenSummary()
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    while True:
        try:
            feed.poll(settings, handle, summary)
        except PacsUnavailable as exc:
            if once:
                raise
            logger.warning("PACS listener: %s; polling again in %g s", str(exc).splitlines()[0],
                           settings.pacs.poll_s)
        if once or (deadline is not None and time.monotonic() >= deadline):
            return summary
        wait = settings.pacs.poll_s if deadline is None else min(settings.pacs.poll_s, deadline - time.monotonic())
        sleep(max(0.0, wait))


class QidoStudies:
    """Stable studies found with QIDO-RS alone, for a PACS without Orthanc's change feed (``pacs.feed: qido``).

    Each poll searches the studies dated within the last ``pacs.qido_days`` days (``StudyDate`` range, today
    included) with their instance count (``NumberOfStudyRelatedInstances``). A study whose count has not changed for
    ``pacs.qido_quiet_s`` seconds is taken as stable (Orthanc's StableAge, judged from outside) and handed over
    once per count: more images, or our own SR, make it eligible again, and the idempotency of
    :func:`pipeline.pacs.process.process_study` answers ``already_processed``. Nothing is persisted: a restarted
    listener re-checks the window's studies (one series search each). Studies sent later than their StudyDate
    window (priors, late archives) are not seen: process those with ``xrayops pacs process``.
    """

    def __init__(self, client: Any, *, days: int, quiet_s: float, clock: Callable[[], float] = time.monotonic,
                 today: Callable[[], Any] | None = None) -> None:
        from datetime import date

        self.client, self.days, self.quiet_s, self.clock = client, days, quiet_s, clock
        self.today = today or date.today
        self._state: dict[str, tuple[str | None, float, bool]] = {}  # uid → (count, unchanged since, handed over)

    def _studies(self) -> dict[str, str | None]:
        from datetime import timedelta

        from pipeline.pacs.dicomweb import STUDY_UID, json_value

        today = self.today()
        window = f"{today - timedelta(days=self.days - 1):%Y%m%d}-{today:%Y%m%d}"
        found: dict[str, str | None] = {}
        offset, size = 0, getattr(self.client, "page_size", 100)
        while True:
            page = self.client.search_studies({"StudyDate": window}, fields=["00201208"], limit=size, offset=offset)
            for item in page:
                uid = json_value(item, STUDY_UID)
                if uid:
                    found[uid] = json_value(item, "00201208")
            if len(page) < size:
                return found
            offset += len(page)

    def poll(self, settings: Settings, handle: Callable[[str], ListenOutcome | None], summary: ListenSummary) -> bool:
        """Hand over the studies that became stable; False when a transient outcome stopped the poll."""
        summary.polls += 1
        found, now = self._studies(), self.clock()
        self._state = {uid: state for uid, state in self._state.items() if uid in found}
        for uid, count in found.items():
            seen, since, done = self._state.get(uid, (None, now, False))
            if uid not in self._state or seen != count:
                since, done = now, False
            self._state[uid] = (count, since, done)
            if done or now - since < self.quiet_s:
                continue
            if _handled(summary, handle(uid)):
                return False  # not marked as handed over: retried at the next poll
            self._state[uid] = (count, since, True)
        return True
