"""An append-only, hash-chained audit log of registry and serving actions.

What is recorded: a new registry version (``register``), the gate's verdict (``gate_decision``,
with the failed criteria), a reviewer's decision (``approval``: the reviewer is the actor), every
alias move (``alias_move``: champion, previous-champion, challenger), a ``rollback``, and a model
server starting or stopping to serve a version (``serving_start`` / ``serving_stop``). The log is
one JSON line per record, ``paths.audit_log`` (default ``<home>/audit/audit.jsonl``)::

    {"action", "actor", "details", "hash", "model", "prev_hash", "seq", "time", "version"}

``seq`` counts from 1, ``time`` is UTC ISO 8601, ``actor`` is ``user@host pid N`` (or the
reviewer / the person who rolled back), ``hash`` is the SHA-256 of the record's canonical JSON
(sorted keys, no spaces, ASCII) without ``hash``, and ``prev_hash`` is the previous record's hash
(64 zeros for the first). Changing, deleting, inserting or reordering a line breaks the chain at
that line (:func:`verify`, ``xrayops audit verify``). ``details`` never hold patient data, file
names of raw data or secrets: only versions, verdicts, names of criteria and people's own words;
any URI in them is masked (:func:`pipeline.connections.mask_uri`).

**The head file.** A chain cannot tell that lines were cut from its *end*. Each append therefore
also rewrites ``<log>.head`` (the last ``seq`` and ``hash``, after the line is synced): a log shorter than its
head fails verification. The head is written before the first record, so a missing head beside a
non-empty log is a deletion too. (Someone who may rewrite both files can still forge a shorter
history: keep the head hash that ``xrayops audit verify`` prints somewhere else as an anchor.)

**Concurrent writers.** Reading the end of the chain and appending run under an exclusive file lock
(``<log>.lock``, :func:`pipeline.locking.file_lock`); lines are written with ``O_APPEND`` in one
write and ``fsync``-ed (:mod:`pipeline.durable`) before the head moves, so processes, threads and
machines sharing the file (over NFS) never interleave or fork the chain.

**A torn last line** (no final newline: a crash during the write) is reported by :func:`verify`.
The next append *repairs* it rather than refusing: it moves the torn bytes to a side file
(``<log>.torn-<time>``), truncates the log to its last complete line, records an ``audit_repair``
(bytes, their SHA-256, the side file's name) and then its own record. Refusing would stop every
registry move until someone edited the log by hand, for a state that only a crash produces and
that cannot hide anything: the torn record's action never completed (moves write their intent
first, below) and cutting whole records from the end is caught by the head. Anything else at the
end of the log (a complete line that is not an intact record, a chain shorter than its head) is
*not* repaired: appends refuse with :class:`~pipeline.errors.AuditError` naming the line.

**Fail closed.** An alias move or rollback is bracketed (:func:`audited`): an ``intent`` record is
written before the registry is touched (when that fails, nothing moves), then ``done`` or
``failed`` (with the error's type) after. A crash between the two leaves an intent without an
outcome, which tells the reader to check the registry. Registration, gate decisions and approvals
are recorded after MLflow stored them; a failed audit write raises there, which stops the promotion
before any alias moves. Serving start/stop records are best-effort (logged on failure): the server
keeps serving the version it verified rather than go down because a log volume is full.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.connections import mask_uri
from pipeline.durable import fsync_path
from pipeline.errors import AuditError, XrayopsError
from pipeline.locking import file_lock

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
FIELDS = frozenset({"seq", "time", "actor", "action", "model", "version", "details", "prev_hash", "hash"})

REGISTER, GATE_DECISION, APPROVAL, ALIAS_MOVE, ROLLBACK = "register", "gate_decision", "approval", "alias_move", \
    "rollback"
SERVING_START, SERVING_STOP, AUDIT_REPAIR = "serving_start", "serving_stop", "audit_repair"
INTENT, DONE, FAILED = "intent", "done", "failed"


# --------------------------------------------------------------------------- records


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record is hashed (and stored) as: sorted keys, no spaces, ASCII."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON without its ``hash`` field (``prev_hash`` included)."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def default_actor() -> str:
    """Who this process acts for: ``user@host pid N``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def _clean(value: Any) -> Any:
    """JSON-plain ``value`` (tuples → lists, other objects → str) with every URI's password masked."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    text = str(value)
    return mask_uri(text) if "://" in text else text


def _problem(record: Any) -> str | None:
    """Why a parsed line is not an intact record (None: it is, as far as it alone can tell)."""
    if not isinstance(record, dict) or set(record) != FIELDS:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        return f"not an audit record (fields {got})"
    if not isinstance(record["seq"], int) or not isinstance(record["hash"], str):
        return "not an audit record (seq or hash of the wrong type)"
    if record_hash(record) != record["hash"]:
        return f"altered: its hash does not match its content (seq {record['seq']}, action {record['action']!r})"
    return None


# --------------------------------------------------------------------------- the log


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify` found: ``ok``, the records read, the last hash; else the first bad line."""

    path: Path
    ok: bool
    records: int
    last_hash: str
    line: int | None = None
    problem: str | None = None

    def summary(self) -> str:
        if self.ok:
            return (f"audit log {self.path}: intact, {self.records} records, head {self.last_hash[:16]}…"
                    if self.records else f"audit log {self.path}: no records yet")
        return f"audit log {self.path}: line {self.line}: {self.problem}"


@dataclass(frozen=True)
class AuditLog:
    """One audit log file, its head (``<log>.head``) and its lock (``<log>.lock``)."""

    path: Path
    lock_timeout_s: float = 30.0

    @classmethod
    def of(cls, settings: Settings) -> AuditLog:
        return cls(settings.audit_log, settings.promote.registry_lock_timeout_s)

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def _lock(self) -> Any:
        return file_lock(self.path.with_name(self.path.name + ".lock"), what=f"the audit log {self.path}",
                         timeout_s=self.lock_timeout_s, setting="promote.registry_lock_timeout_s", busy=AuditError,
                         reentrant=False, poll_s=0.005)  # held for milliseconds: waiters try again often

    def append(self, action: str, *, model: str | None, version: Any = None, details: Mapping[str, Any] | None = None,
               actor: str | None = None) -> dict[str, Any]:
        """Chain one record onto the log (created with its head when missing); returns the record.

        Raises:
            AuditError: the log could not be written, its lock was held too long, or its end is not intact.
        """
        try:
            with self._lock():
                seq, prev = self._chain_end()
                record = {"seq": seq + 1, "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                          "actor": actor or default_actor(), "action": action, "model": model,
                          "version": None if version is None else str(version), "details": _clean(details or {}),
                          "prev_hash": prev}
                record["hash"] = record_hash(record)
                self._write(record)
                return record
        except OSError as exc:
            raise AuditError(f"could not write the audit log {self.path}: {exc.strerror or exc}",
                             hint="make its folder writable (or point paths.audit_log at a writable file); "
                                  "registry moves wait for it") from exc

    def _write(self, record: dict[str, Any]) -> None:
        """Append the line (one write, fsync), then move the head to it."""
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = canonical(record) + b"\n"
            while data:
                data = data[os.write(fd, data):]
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_path(self.path.parent)
        self._write_head(record["seq"], record["hash"])

    def _write_head(self, seq: int, last_hash: str) -> None:
        """Overwrite the head in place: one fixed-width line (86 bytes, inside one disk sector), synced."""
        created = not self.head_path.exists()
        fd = os.open(self.head_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, f"{seq:020d} {last_hash}\n".encode(), 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_path(self.head_path.parent)

    def _read_head(self) -> dict[str, Any] | None:
        try:
            seq, last_hash = self.head_path.read_text().split()
            return {"seq": int(seq), "hash": last_hash}
        except FileNotFoundError:
            return None
        except ValueError:
            return {"seq": -1, "hash": "unreadable"}

    def _chain_end(self) -> tuple[int, str]:
        """``(seq, hash)`` to chain onto, after repairing a torn last line (under the lock).

        Raises:
            AuditError: the log or its head was removed, or its last line is not an intact record.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = self._read_head()
        if not self.path.exists() or self.path.stat().st_size == 0:
            if head is not None and head.get("seq") != 0:
                raise self._refuse(f"it is missing or empty but its head ({self.head_path.name}) records "
                                   f"{head.get('seq')} records: the log was deleted or replaced")
            if head is None:
                self._write_head(0, GENESIS)
            return 0, GENESIS
        if head is None:
            raise self._refuse(f"its head file {self.head_path.name} is missing (written before the first record): "
                               "it was deleted")
        last_line, torn, offset = _tail(self.path)
        last: dict[str, Any] | None = None
        if last_line is not None:
            try:
                last = json.loads(last_line)
            except ValueError:
                raise self._refuse("its last complete line is not JSON") from None
            why = _problem(last)
            if why:
                raise self._refuse(f"its last complete line is {why}")
        end = (last["seq"], last["hash"]) if last else (0, GENESIS)
        if end != (head.get("seq"), head.get("hash")) and not (
                last and last["seq"] == head.get("seq", -2) + 1 and last["prev_hash"] == head.get("hash")):
            raise self._refuse(f"it ends at seq {end[0]} but its head records seq {head.get('seq')}: records were "
                               "removed from its end, or the log or its head was replaced")
        if torn:
            end = self._quarantine(torn, offset, end, len(torn))
        return end

    def _quarantine(self, torn: bytes, offset: int, end: tuple[int, str], size: int) -> tuple[int, str]:
        """Move a torn last line to a side file, truncate the log before it and record the repair."""
        side = self.path.with_name(f"{self.path.name}.torn-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}")
        side.write_bytes(torn)
        fsync_path(side)
        with self.path.open("r+b") as fh:
            fh.truncate(offset)
            fh.flush()
            os.fsync(fh.fileno())
        logger.warning("audit log %s: moved a torn last line (%d bytes, an interrupted append) to %s",
                       self.path, size, side.name)
        repair = {"seq": end[0] + 1, "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                  "actor": default_actor(), "action": AUDIT_REPAIR, "model": None, "version": None,
                  "details": {"torn_bytes": size, "torn_sha256": hashlib.sha256(torn).hexdigest(),
                              "moved_to": side.name, "after_seq": end[0]}, "prev_hash": end[1]}
        repair["hash"] = record_hash(repair)
        self._write(repair)
        return repair["seq"], repair["hash"]

    def _refuse(self, why: str) -> AuditError:
        return AuditError(f"cannot append to the audit log {self.path}: {why}",
                          hint=f"run `xrayops audit verify --path {self.path}` and restore the log (and its .head) "
                               "from a copy; it is never rewritten automatically")

    def _read(self) -> tuple[bytes, dict[str, Any] | None]:
        with ExitStack() as stack:
            try:
                stack.enter_context(self._lock())  # an append in flight is not a torn line
            except OSError:
                logger.info("audit log %s: cannot take its lock (read-only copy?); reading it as it is", self.path)
            return self.path.read_bytes(), self._read_head()

    def verify(self) -> Verdict:
        """Check every line's hash, link and ``seq``, a torn end and the head; the first bad line is named.

        Raises:
            FileNotFoundError: neither the log nor its head exists.
        """
        if not self.path.exists() and not self.head_path.exists():
            raise FileNotFoundError(f"no audit log at {self.path}")
        data, head = self._read() if self.path.exists() else (b"", self._read_head())
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the log ends with a newline
        prev, n = GENESIS, 0
        for n, line in enumerate(lines, start=1):
            why = _line_problem(line, n, prev)
            if why:
                return Verdict(self.path, False, n - 1, prev, n, why)
            prev = json.loads(line)["hash"]
        if torn:
            return Verdict(self.path, False, n, prev, n + 1,
                           f"torn last line ({len(torn)} bytes, no newline: an append was interrupted); the next "
                           f"append moves it to {self.path.name}.torn-<time> and records the repair")
        return self._check_head(head, n, prev, lines)

    def _check_head(self, head: dict[str, Any] | None, n: int, prev: str, lines: list[bytes]) -> Verdict:
        if head is None:
            if n == 0:
                return Verdict(self.path, True, 0, GENESIS)
            return Verdict(self.path, False, n, prev, 1, f"the head file {self.head_path.name} is missing (it is "
                           "written before the first record): the log was replaced or its head deleted")
        seq = head.get("seq")
        if not isinstance(seq, int) or seq < 0:
            return Verdict(self.path, False, n, prev, n, f"the head file {self.head_path.name} is unreadable")
        if seq > n:
            return Verdict(self.path, False, n, prev, n + 1,
                           f"missing: the head records {seq} records, the log holds {n}: records were deleted "
                           "from its end")
        at = json.loads(lines[seq - 1])["hash"] if seq else GENESIS
        if seq < n - 1 or at != head.get("hash"):
            return Verdict(self.path, False, n, prev, seq + 1,
                           f"the head ({self.head_path.name}: seq {seq}) does not match the log: records after "
                           f"seq {seq} were added by another writer, or the head was replaced")
        return Verdict(self.path, True, n, prev)

    def records(self, last: int | None = None) -> list[dict[str, Any]]:
        """The records (the last ``last``); a line that is not JSON reads as ``{"seq": None, "unreadable": …}``."""
        out: list[dict[str, Any]] = []
        lines = self.path.read_bytes().splitlines() if self.path.exists() else []
        for line in lines[-last:] if last else lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"seq": None, "unreadable": line[:80].decode(errors="replace")})
        return out


def _line_problem(line: bytes, n: int, prev: str) -> str | None:
    """Why line ``n`` does not continue a chain whose last hash is ``prev`` (None: it does)."""
    if not line.strip():
        return "empty line (inserted, or a damaged write)"
    try:
        record = json.loads(line)
    except ValueError:
        return "not JSON (altered or damaged)"
    why = _problem(record)
    if why:
        return why
    if record["prev_hash"] != prev:
        where = "the genesis value (records were deleted from the start)" if n == 1 else \
            f"the hash of line {n - 1} (a line was deleted, inserted or reordered here)"
        return f"broken link: prev_hash is not {where}"
    if record["seq"] != n:
        return f"seq {record['seq']} where {n} was expected (a line was deleted, inserted or reordered)"
    return None


def _tail(path: Path, chunk: int = 8192) -> tuple[bytes | None, bytes, int]:
    """``(last complete line or None, torn bytes after it, offset of the torn bytes)``, reading from the end."""
    with path.open("rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        data, start = b"", size
        while start > 0 and data.count(b"\n") < 2:
            start = max(0, start - chunk)
            fh.seek(start)
            data = fh.read(size - start)
    cut = data.rfind(b"\n")
    torn = data[cut + 1:]
    offset = size - len(torn)
    if cut < 0:
        return None, torn, offset
    begin = data.rfind(b"\n", 0, cut)  # -1: the first line (the loop read back to the start)
    return data[begin + 1:cut], torn, offset


# --------------------------------------------------------------------------- what the registry and server call


def record(settings: Settings, action: str, *, version: Any = None, details: Mapping[str, Any] | None = None,
           actor: str | None = None) -> dict[str, Any]:
    """Append one record about ``settings.registered_model``.

    Raises:
        AuditError: it could not be written (the caller's action must not go on unrecorded).
    """
    return AuditLog.of(settings).append(action, model=settings.registered_model, version=version, details=details,
                                        actor=actor)


@contextmanager
def audited(settings: Settings, action: str, *, version: Any, details: Mapping[str, Any],
            actor: str | None = None) -> Iterator[dict[str, Any]]:
    """Record ``intent`` before the block and ``done`` (or ``failed``, with the error's type) after it.

    The block may add what it learnt to the yielded dict; it goes into the outcome record.

    Raises:
        AuditError: the intent could not be written (the block does not run), or the block succeeded and
            its outcome could not be written (the message says the action was done).
    """
    record(settings, action, version=version, details={**details, "phase": INTENT}, actor=actor)
    outcome: dict[str, Any] = {}
    try:
        yield outcome
    except BaseException as exc:
        try:
            record(settings, action, version=version, actor=actor,
                   details={**details, **outcome, "phase": FAILED, "error": type(exc).__name__})
        except XrayopsError:
            logger.exception("could not record the failure of %s v%s in the audit log", action, version)
        raise
    try:
        record(settings, action, version=version, details={**details, **outcome, "phase": DONE}, actor=actor)
    except AuditError as exc:
        raise AuditError(f"{action} of {settings.registered_model} v{version} was done, but its outcome could not "
                         f"be recorded (its intent record stands): {exc}", hint=exc.hint) from exc


def record_serving(settings: Settings, action: str, version: Any, details: Mapping[str, Any]) -> None:
    """Best-effort serving start/stop record: a failure is logged, never raised (see the module notes)."""
    try:
        record(settings, action, version=version, details=details)
    except XrayopsError:
        logger.exception("could not record %s of v%s in the audit log", action, version)
