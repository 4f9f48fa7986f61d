"""A thin, typed, fail-closed client of a PACS's DICOMweb API (over :class:`dicomweb_client.DICOMwebClient`).

* Search (QIDO-RS): :meth:`PacsClient.search_studies`, :meth:`~PacsClient.search_series`,
  :meth:`~PacsClient.search_instances` (one page) and :meth:`~PacsClient.iter_instances` (every
  instance of the studies a filter matches, paged, as :class:`InstanceRef`).
* Retrieve (WADO-RS): :meth:`~PacsClient.retrieve_instance_bytes` (the stored Part-10 bytes, unchanged:
  ingestion keys images by their sha256) and :meth:`~PacsClient.retrieve_instance` (a pydicom Dataset).
* Store (STOW-RS): :meth:`~PacsClient.store_instances`.

Every request has an explicit (connect, read) timeout. Credentials come from environment
variables named in the configuration (:class:`PacsAuth`), are sent as HTTP basic auth or a
bearer token and are never logged or put in a message; a ``user:password@`` in the URL is
moved into the session and masked wherever the URL is printed. Failures raise
:class:`~pipeline.errors.PacsUnavailable` (cannot connect, no answer in time, 5xx) or
:class:`~pipeline.errors.PacsError` (401/403, 404, a malformed URL or answer), one line each,
naming the PACS by its masked URL; never a requests traceback.

``dicomweb_client`` logs each request with its headers at DEBUG and study/instance UIDs at INFO;
its logger is held at WARNING here so neither an Authorization header nor a UID reaches a log.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pipeline.connections import connection_reason, mask_uri
from pipeline.errors import ConfigError, PacsError, PacsUnavailable

if TYPE_CHECKING:
    import pydicom
    import requests
    from dicomweb_client import DICOMwebClient

logger = logging.getLogger(__name__)
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # DEBUG: request headers; INFO: UIDs

T = TypeVar("T")
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_PAGE_SIZE = 100
# DICOM JSON tags of the identifiers a search result carries (PS3.18 F.2)
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS_UID = "0020000D", "0020000E", "00080018", "00080016"


@dataclass(frozen=True)
class PacsAuth:
    """How to authenticate to the PACS: HTTP basic auth, or a bearer token, or neither.

    Built from environment variables by :meth:`from_env` (configuration names the variables, never
    the values). ``repr`` shows which kind, not the secret.
    """

    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ConfigError("PACS basic auth needs both a user name and a password (one of them is unset)")
        if self.token is not None and self.username is not None:
            raise ConfigError("PACS auth: set either a bearer token or a user name and password, not both")

    def __repr__(self) -> str:
        return f"PacsAuth({self.kind})"

    @property
    def kind(self) -> str:
        return "basic" if self.username is not None else "bearer" if self.token is not None else "none"

    @classmethod
    def from_env(cls, username_env: str | None = None, password_env: str | None = None,
                 token_env: str | None = None, environ: Mapping[str, str] | None = None) -> PacsAuth:
        """Credentials from the environment variables named (an unset or empty variable counts as not given).

        Raises:
            ConfigError: only one of user name and password is set, or both basic auth and a token.
        """
        env = os.environ if environ is None else environ

        def get(name: str | None) -> str | None:
            return (env.get(name) or None) if name else None

        user, password, token = get(username_env), get(password_env), get(token_env)
        if (user is None) != (password is None):
            missing = password_env if user is not None else username_env
            raise ConfigError(f"PACS basic auth: environment variable {missing} is not set (the user name and the "
                              f"password are given by {username_env} and {password_env}; set both or neither)")
        if token is not None and user is not None:
            raise ConfigError(f"PACS auth: both a bearer token ({token_env}) and basic auth ({username_env}) are set; "
                              "unset one of them")
        return cls(user, password, token)


@dataclass(frozen=True)
class InstanceRef:
    """The three UIDs that address one instance in a PACS (validated: digits and dots)."""

    study_uid: str
    series_uid: str
    sop_uid: str

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> InstanceRef:
        """From a QIDO-RS instance result (DICOM JSON).

        Raises:
            PacsError: a result without the three UIDs or with a malformed one.
        """
        uids = tuple(json_value(item, tag) for tag in (STUDY_UID, SERIES_UID, SOP_UID))
        for uid in uids:
            if uid is None or not UID.match(uid) or len(uid) > 64:
                raise PacsError("the PACS answered a search with an instance whose Study/Series/SOP Instance UID "
                                "is missing or malformed")
        return cls(*uids)  # type: ignore[arg-type]


@dataclass(frozen=True)
class StoreResult:
    """What a STOW-RS request stored: SOP Instance UIDs stored and failed (with the PACS's failure reason)."""

    stored: tuple[str, ...]
    failed: tuple[tuple[str, int | None], ...]


def json_value(item: Mapping[str, Any], tag: str) -> str | None:
    """The first value of ``tag`` (8 hex digits) in a DICOM JSON object, as a string (None when absent)."""
    values = (item.get(tag) or {}).get("Value") or []
    if not values:
        return None
    first = values[0]
    if isinstance(first, dict):  # person name: {"Alphabetic": ...}
        return str(first.get("Alphabetic", "")) or None
    return str(first)


class PacsClient:
    """One PACS's DICOMweb service at ``url`` (the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``)."""

    def __init__(self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, auth: PacsAuth | None = None,
                 headers: Mapping[str, str] | None = None, retries: int = 0,
                 page_size: int = DEFAULT_PAGE_SIZE) -> None:
        """
        Args:
            url: DICOMweb root; a ``user:password@`` in it is used as basic auth and masked in messages.
            timeout_s: seconds to wait for an answer (read timeout) of each request.
            connect_timeout_s: seconds to wait for a connection.
            auth: basic auth or a bearer token (see :meth:`PacsAuth.from_env`).
            headers: extra request headers (never logged).
            retries: extra attempts of a request answered 429/408/503/504 (exponential back-off).
            page_size: results per QIDO-RS request of :meth:`iter_instances`.

        Raises:
            PacsError: the URL is not an http(s) URL with a host.
        """
        from dicomweb_client import DICOMwebClient

        self.masked_url = mask_uri(url)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(f"PACS URL {self.masked_url!r} is not an http(s) URL with a host name",
                            hint="give the DICOMweb root, e.g. http://pacs.example.org:8042/dicom-web")
        auth = auth or PacsAuth()
        if parts.username is not None and auth.kind == "none":
            from urllib.parse import unquote

            auth = PacsAuth(unquote(parts.username), unquote(parts.password or ""))
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        netloc += f":{parts.port}" if parts.port else ""
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))  # no credentials
        self.timeout = (float(connect_timeout_s), float(timeout_s))
        self.page_size = int(page_size)
        self.auth_kind = auth.kind
        session = _wildcard_session()
        if auth.username is not None:
            session.auth = (auth.username, auth.password or "")
        extra = dict(headers or {})
        if auth.token is not None:
            extra["Authorization"] = f"Bearer {auth.token}"
        session.headers.update(extra)
        self._session = session
        try:
            self._client: DICOMwebClient = DICOMwebClient(self.url, session=session, timeout=self.timeout)
        except ValueError:
            raise PacsError(f"PACS URL {self.masked_url!r} is malformed",
                            hint="give the DICOMweb root, e.g. http://pacs.example.org:8042/dicom-web") from None
        self._client.set_http_retry_params(retry=retries > 0, max_attempts=retries + 1,
                                           wait_exponential_multiplier=500)

    def __repr__(self) -> str:
        return f"PacsClient({self.masked_url!r}, auth={self.auth_kind})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> PacsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_config(cls, cfg: Any, url: str | None = None, environ: Mapping[str, str] | None = None) -> PacsClient:
        """A client from a ``data.dicomweb`` section (:class:`pipeline.config.DicomwebSection`); ``url``
        overrides ``cfg.url``.

        Raises:
            ConfigError: no URL configured, or incomplete credentials in the environment.
        """
        target = url or cfg.url
        if not target:
            raise ConfigError("no PACS URL: set data.dicomweb.url or pass --url (the DICOMweb root, e.g. "
                              "http://pacs.example.org:8042/dicom-web)")
        auth = PacsAuth.from_env(cfg.username_env, cfg.password_env, cfg.token_env, environ)
        return cls(target, timeout_s=cfg.timeout_s, connect_timeout_s=cfg.connect_timeout_s, auth=auth,
                   retries=cfg.retries, page_size=cfg.page_size)

    # ----------------------------------------------------------------------- search (QIDO-RS)

    def ping(self) -> None:
        """One cheap search (``studies?limit=1``): raises :class:`PacsUnavailable`/:class:`PacsError` when the
        PACS cannot be used, before any longer work starts."""
        self.search_studies(limit=1)

    def search_studies(self, filters: Mapping[str, str] | None = None, *, fields: Sequence[str] = (),
                       limit: int | None = None, offset: int | None = None) -> list[dict[str, Any]]:
        """One page of studies matching ``filters`` (attribute keyword or tag → value, e.g.
        ``{"ModalitiesInStudy": "CR", "StudyDate": "20240101-20241231"}``), as DICOM JSON."""
        return self._call("search studies", lambda: self._client.search_for_studies(
            search_filters=dict(filters or {}), fields=list(fields) or None, limit=limit, offset=offset))

    def search_series(self, study_uid: str | None = None, filters: Mapping[str, str] | None = None, *,
                      fields: Sequence[str] = (), limit: int | None = None,
                      offset: int | None = None) -> list[dict[str, Any]]:
        """One page of series (of ``study_uid``, or of every study) matching ``filters``."""
        uid = _checked_uid(study_uid) if study_uid else None
        return self._call("search series", lambda: self._client.search_for_series(
            study_instance_uid=uid, search_filters=dict(filters or {}), fields=list(fields) or None,
            limit=limit, offset=offset))

    def search_instances(self, study_uid: str | None = None, series_uid: str | None = None,
                         filters: Mapping[str, str] | None = None, *, fields: Sequence[str] = (),
                         limit: int | None = None, offset: int | None = None) -> list[dict[str, Any]]:
        """One page of instances (of a study / series, or of every study) matching ``filters``."""
        study = _checked_uid(study_uid) if study_uid else None
        series = _checked_uid(series_uid) if series_uid else None
        return self._call("search instances", lambda: self._client.search_for_instances(
            study_instance_uid=study, series_instance_uid=series, search_filters=dict(filters or {}),
            fields=list(fields) or None, limit=limit, offset=offset))

    def iter_studies(self, filters: Mapping[str, str] | None = None) -> Iterator[str]:
        """Study Instance UIDs of every study matching ``filters``, page by page (``page_size`` per request)."""
        for item in self._pages(lambda limit, offset: self.search_studies(filters, limit=limit, offset=offset)):
            uid = json_value(item, STUDY_UID)
            if uid is None or not UID.match(uid):
                raise PacsError(f"the PACS at {self.masked_url} answered a study search with a result whose "
                                "StudyInstanceUID is missing or malformed")
            yield uid

    def iter_instances(self, study_filters: Mapping[str, str] | None = None) -> Iterator[InstanceRef]:
        """Every instance of every study matching ``study_filters``: studies page by page, then each study's
        instances page by page; a study listed twice (pages shifting under a live PACS) is read once."""
        seen: set[str] = set()
        for study in self.iter_studies(study_filters):
            if study in seen:
                continue
            seen.add(study)
            yield from (InstanceRef.from_json(item) for item in self._pages(
                lambda limit, offset, s=study: self.search_instances(s, limit=limit, offset=offset)))

    def _pages(self, fetch: Callable[[int, int], list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = fetch(self.page_size, offset)
            yield from page
            if len(page) < self.page_size:
                return
            offset += len(page)

    # ----------------------------------------------------------------------- retrieve (WADO-RS)

    def retrieve_instance_bytes(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """The instance as the PACS stores it (a DICOM Part-10 file, its own transfer syntax), unchanged.

        ``dicomweb_client``'s own retrieve parses each part with pydicom; here the part's bytes are kept
        (ingestion hashes them), through the same session, headers and timeout.

        Raises:
            PacsError: no such instance (404), a refusal, or an answer that is not one DICOM part.
            PacsUnavailable: the PACS cannot be reached or failed (5xx).
        """
        path = "/".join(("studies", _checked_uid(study_uid), "series", _checked_uid(series_uid), "instances",
                         _checked_uid(sop_uid)))
        # identity: pixel data barely compresses, and a PACS gzipping each instance costs more than it saves
        # (Orthanc: ~0.25 s per 2 MB instance with gzip, ~0.01 s without, on loopback)
        headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
                   "Accept-Encoding": "identity"}

        def get() -> bytes:
            response = self._session.get(f"{self.url}/{path}", headers=headers, timeout=self.timeout)
            response.raise_for_status()
            return _single_part(response)

        data = self._call("retrieve an instance", get)
        if len(data) < 132 or data[128:132] != b"DICM":
            # a bare data set (no preamble): still DICOM, the ingest reader sniffs it
            logger.debug("PACS returned an instance without a Part-10 preamble")
        return data

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> pydicom.Dataset:
        """The instance as a pydicom Dataset (see :meth:`retrieve_instance_bytes`)."""
        import pydicom

        data = self.retrieve_instance_bytes(study_uid, series_uid, sop_uid)
        try:
            return pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a bad file
            raise PacsError(f"the PACS at {self.masked_url} returned an instance pydicom cannot read "
                            f"({type(exc).__name__})") from None

    # ----------------------------------------------------------------------- store (STOW-RS)

    def store_instances(self, instances: Sequence[pydicom.Dataset | bytes], study_uid: str | None = None
                        ) -> StoreResult:
        """Store ``instances`` (Datasets or Part-10 bytes) with one STOW-RS request.

        Raises:
            PacsError: the PACS refused the request, or stored none of the instances (the failure reasons in
                the message). Partly stored: returned, with ``failed`` listing the rest.
            PacsUnavailable: the PACS cannot be reached or failed (5xx).
        """
        import pydicom

        datasets = [pydicom.dcmread(io.BytesIO(x)) if isinstance(x, bytes) else x for x in instances]
        study = _checked_uid(study_uid) if study_uid else None
        answer = self._call("store instances",
                            lambda: self._client.store_instances(datasets, study_instance_uid=study))
        stored = tuple(str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", []))
        failed = tuple((str(item.get("ReferencedSOPInstanceUID", "")),
                        int(item.FailureReason) if "FailureReason" in item else None)
                       for item in answer.get("FailedSOPSequence", []))
        if failed and not stored:
            reasons = sorted({f"0x{code:04X}" if code is not None else "unknown" for _, code in failed})
            raise PacsError(f"the PACS at {self.masked_url} stored none of {len(failed)} instance(s) "
                            f"(failure reasons {', '.join(reasons)})", status=None)
        return StoreResult(stored, failed)

    # ----------------------------------------------------------------------- errors

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        with self._errors(what):
            return fn()
        raise AssertionError("unreachable")  # pragma: no cover - _errors re-raises

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate what requests / dicomweb_client raise into one-line :class:`PacsError`s."""
        import requests

        where = f"PACS (DICOMweb) at {self.masked_url}"
        fix = ("check data.dicomweb.url (or --url) and that the PACS is running and reachable from this machine; "
               "data.dicomweb.timeout_s sets how long to wait")
        try:
            yield
        except requests.exceptions.ConnectTimeout:
            raise PacsUnavailable(f"{where} is not reachable (no connection within {self.timeout[0]:g} s)",
                                  hint=fix) from None
        except requests.exceptions.ConnectionError as exc:  # refused, unresolvable, reset
            raise PacsUnavailable(f"{where} is not reachable ({connection_reason(exc)})", hint=fix) from None
        except requests.exceptions.Timeout:
            raise PacsUnavailable(f"{where} did not answer within {self.timeout[1]:g} s ({what})",
                                  hint=fix) from None
        except requests.exceptions.HTTPError as exc:
            raise self._http_error(exc.response, what) from None
        except requests.exceptions.RequestException as exc:
            raise PacsError(f"{where}: {what} failed ({type(exc).__name__})", hint=fix) from None
        except PacsError:
            raise
        except (ValueError, KeyError) as exc:  # a malformed answer (JSON, multipart) or a UID dicomweb_client refuses
            raise PacsError(f"{where}: {what} failed, the answer could not be read ({type(exc).__name__})") from None

    def _http_error(self, response: requests.Response | None, what: str) -> PacsError:
        status = response.status_code if response is not None else None
        where = f"PACS (DICOMweb) at {self.masked_url}"
        if status in (401, 403):
            why = "authentication required" if status == 401 else "forbidden"
            return PacsError(
                f"{where} refused to {what} (HTTP {status}: {why}, sent auth: {self.auth_kind})", status=status,
                hint="set the credentials in the environment variables named by data.dicomweb.username_env and "
                     "password_env (basic auth) or token_env (bearer token)")
        if status == 404:
            return PacsError(f"{where}: {what}: not found (HTTP 404)", status=status,
                             hint="check that data.dicomweb.url is the DICOMweb root (e.g. …/dicom-web) and the "
                                  "object exists")
        if status is not None and status >= 500 or status in (408, 429):
            return PacsUnavailable(f"{where} failed to {what} (HTTP {status})", status=status,
                                   hint="the PACS reported an error of its own: see its log, retry later")
        return PacsError(f"{where} refused to {what} (HTTP {status})", status=status)


def _wildcard_session_class() -> type:
    import requests

    class WildcardSession(requests.Session):
        """A session that sends the QIDO-RS wildcards ``*`` and ``?`` of a query string as themselves.

        dicomweb_client percent-encodes them (``%2A``, ``%3F``); Orthanc's DICOMweb plugin then matches them
        literally (``PatientID=CXR-%2A`` finds nothing). Both are legal unencoded in a query (RFC 3986)."""

        def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
            if isinstance(url, str) and "?" in url:
                base, _, query = url.partition("?")
                url = base + "?" + query.replace("%2A", "*").replace("%3F", "?")
            return super().request(method, url, *args, **kwargs)

    return WildcardSession


def _wildcard_session() -> Any:
    return _wildcard_session_class()()


def _checked_uid(uid: str) -> str:
    """``uid`` when it is a DICOM UID (digits and dots, ≤ 64 characters): it becomes part of a URL path."""
    if not isinstance(uid, str) or len(uid) > 64 or not UID.match(uid):
        raise PacsError("not a DICOM UID (digits and dots, at most 64 characters)")
    return uid


def _single_part(response: requests.Response) -> bytes:
    """The body of the one part of a ``multipart/related`` answer (or the body itself when a server sends the
    instance unwrapped as ``application/dicom``)."""
    content_type = response.headers.get("Content-Type", "")
    media, _, params = content_type.partition(";")
    body = response.content
    if media.strip().lower() == "application/dicom":
        return body
    if media.strip().lower() != "multipart/related":
        raise ValueError(f"unexpected media type {media.strip()!r}")
    match = re.search(r'boundary="?([^";]+)"?', params, flags=re.IGNORECASE)
    if match is None:
        raise ValueError("multipart answer without a boundary")
    marker = b"--" + match.group(1).encode()
    parts = body.split(marker)
    # parts[0]: preamble; parts[-1]: "--" epilogue; each part: headers CRLF CRLF content CRLF
    contents = [p for p in parts[1:] if not p.startswith(b"--")]
    if len(contents) != 1:
        raise ValueError(f"{len(contents)} parts where one instance was expected")
    head, sep, content = contents[0].partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("a multipart part without headers")
    return content[:-2] if content.endswith(b"\r\n") else content
