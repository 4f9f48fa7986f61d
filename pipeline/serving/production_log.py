"""Append-only prediction log: partitioned Parquet (``date=YYYY-MM-DD/part-*.parquet``).

Each append writes new files atomically and durably (a unique hidden temporary name,
flushed and fsynced, renamed, then the folder fsynced), so readers never see half-written
data, concurrent writers never collide and a power cut cannot leave a renamed but empty
part. A part that is unreadable anyway (a damaged disk, a file copied in by hand) is
skipped, counted (:attr:`LogWindow.skipped_parts`) and named in one warning line; the
rest of the log stays readable. No PHI and no pixels: rows hold request metadata, image
features, embedding components and outputs. Rejected requests go to
``rejected/date=…/`` with their reason only.

Every row carries its ``source``: ``api``, ``ui`` or ``pacs`` for real traffic.
Simulated traffic (``source=simulation``, the main job's drift demo) has its own log
(``paths.simulation_log``); :class:`LogWriter` — the writer of the API and the UI —
refuses simulated rows.

The API does not write one file per request: :class:`LogWriter` buffers rows and a
background thread flushes them every ``serve.log_flush_s`` seconds (one atomic file per
flush and day), so a request never waits for disk and the log stays a few large files.
Rows still in the buffer when the process is killed (not stopped) are lost: at most
``log_flush_s`` seconds of traffic.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.durable import fsync_path
from pipeline.errors import ServingError

logger = logging.getLogger(__name__)

REJECTED_DIR = "rejected"
MAX_BUFFER_ROWS = 200_000
REAL_SOURCES = ("api", "ui", "pacs")
SIMULATION = "simulation"
PART_GLOB = "date=*/part-*.parquet"


@dataclass
class LogWindow:
    """Rows read from a log, and the part files that could not be read (skipped, not fatal)."""

    rows: pd.DataFrame
    skipped_parts: list[str] = field(default_factory=list)
    excluded_rows: int = 0  # rows of the files read that ``exclude`` left out


def append(log_dir: Path, rows: pd.DataFrame, time_column: str = "request_time") -> list[Path]:
    """Append ``rows`` (with a UTC time column) as one new Parquet file per day, atomically and durably."""
    if rows.empty:
        return []
    rows = rows.assign(**{time_column: pd.to_datetime(rows[time_column], utc=True)})
    days = rows[time_column].dt.strftime("%Y-%m-%d")
    written = []
    for day, part in rows.groupby(days, sort=True):
        part_dir = log_dir / f"date={day}"
        if not part_dir.is_dir():
            part_dir.mkdir(parents=True, exist_ok=True)
            fsync_path(part_dir.parent)
        name = f"part-{datetime.now(UTC).strftime('%H%M%S%f')}-{uuid.uuid4().hex[:8]}.parquet"
        written.append(_write_part(part.reset_index(drop=True), part_dir / name))
    return written


def _write_part(frame: pd.DataFrame, target: Path) -> Path:
    """Write to a unique hidden temporary file, flush + fsync it, rename it, fsync the folder."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            frame.to_parquet(fh, index=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)
    return target


def part_files(log_dir: Path) -> list[Path]:
    """The log's part files, oldest first (names sort by day, then time of writing)."""
    return sorted(log_dir.glob(PART_GLOB))


def _files(log_dir: Path, hours: float | None) -> tuple[list[Path], datetime | None]:
    files = part_files(log_dir)
    since = None
    if hours is not None:
        since = datetime.now(UTC) - timedelta(hours=hours)
        files = [f for f in files if f.parent.name >= f"date={since:%Y-%m-%d}"]
    return files, since


def read_part(path: Path, time_column: str = "request_time") -> pd.DataFrame | None:
    """One part file, or None when it cannot be read (damaged, not Parquet, or without ``time_column``)."""
    import pyarrow as pa

    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException):  # truncated / garbage / unreadable file
        return None
    return df if time_column in df.columns else None


def warn_skipped(log_dir: Path, skipped: list[str]) -> None:
    """One warning line naming the unreadable parts (never a traceback)."""
    if skipped:
        names = ", ".join(Path(p).relative_to(log_dir).as_posix() for p in skipped[:3])
        logger.warning("%s: skipped %d unreadable part file(s) (%s%s); the rest of the log was read — move "
                       "damaged files out of the folder", log_dir, len(skipped), names,
                       ", …" if len(skipped) > 3 else "")


def _filter(df: pd.DataFrame, where: dict[str, Any] | None,
            exclude: dict[str, Collection[Any]] | None) -> tuple[pd.DataFrame, int]:
    """Rows equal to every ``where`` value and to none of the ``exclude`` values; and how many ``exclude`` dropped."""
    keep = np.ones(len(df), bool)
    for col, value in (where or {}).items():
        if col not in df:
            return df.iloc[0:0], 0
        column = df[col]
        same = column == value if column.dtype == object else column.astype(str) == str(value)
        keep &= same.to_numpy()
    dropped = 0
    for col, values in (exclude or {}).items():
        if col in df:
            hit = df[col].astype(str).isin([str(v) for v in values]).to_numpy() & keep
            dropped += int(hit.sum())
            keep &= ~hit
    return df[keep], dropped


def read_window(log_dir: Path, *, last_k: int | None = None, hours: float | None = None,
                where: dict[str, Any] | None = None,
                exclude: dict[str, Collection[Any]] | None = None) -> LogWindow:
    """Rows of the current window: the last ``hours`` hours, else the last ``last_k`` rows (else all).

    ``where`` keeps rows whose columns equal the given values (e.g. one model version);
    ``exclude`` drops rows whose column holds one of the given values (e.g. simulated traffic).
    With ``last_k`` only the newest files needed are read. Unreadable parts are skipped and
    listed in the result (one warning line), never fatal.
    """
    files, since = _files(log_dir, hours)
    frames: list[pd.DataFrame] = []
    skipped: list[str] = []
    excluded = 0
    for path in reversed(files):  # newest first
        raw = read_part(path)
        if raw is None:
            skipped.append(str(path))
            continue
        frame, dropped = _filter(raw, where, exclude)
        frames.append(frame)
        excluded += dropped
        if last_k and hours is None and sum(len(f) for f in frames) >= last_k:
            break
    warn_skipped(log_dir, skipped)
    frames = [f for f in reversed(frames) if not f.empty]
    if not frames:
        return LogWindow(pd.DataFrame(), skipped[::-1], excluded)
    df = pd.concat(frames, ignore_index=True)
    df["request_time"] = pd.to_datetime(df["request_time"], utc=True)
    df = df.sort_values("request_time", kind="stable").reset_index(drop=True)
    if since is not None:
        df = df[df["request_time"] >= pd.Timestamp(since)].reset_index(drop=True)
    elif last_k:
        df = df.tail(last_k).reset_index(drop=True)
    return LogWindow(df, skipped[::-1], excluded)


def read(log_dir: Path, *, last_k: int | None = None, hours: float | None = None,
         where: dict[str, Any] | None = None) -> pd.DataFrame:
    """The rows of :func:`read_window` (unreadable parts skipped with a warning)."""
    return read_window(log_dir, last_k=last_k, hours=hours, where=where).rows


def count_rows(log_dir: Path) -> int:
    """Rows in the log (reads only Parquet footers; unreadable parts count 0, with a warning)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total, skipped = 0, []
    for f in part_files(log_dir):
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except (OSError, ValueError, pa.ArrowException):
            skipped.append(str(f))
    warn_skipped(log_dir, skipped)
    return total


class LogWriter:
    """Thread-safe buffered writer: ``add`` never touches disk unless ``flush_s`` is 0."""

    def __init__(self, log_dir: Path, flush_s: float) -> None:
        self.log_dir = log_dir
        self.flush_s = flush_s
        self._rows: list[dict[str, Any]] = []
        self._rejected: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, row: dict[str, Any]) -> None:
        """Buffer one prediction row of real traffic.

        Raises:
            ServingError: the row is simulated traffic (it belongs in ``paths.simulation_log``).
        """
        if row.get("source") == SIMULATION:
            raise ServingError(f"simulated rows never go to the production log {self.log_dir}: write them to "
                               "paths.simulation_log (pipeline.monitoring.simulate)")
        self._add(self._rows, row)

    def add_rejection(self, row: dict[str, Any]) -> None:
        self._add(self._rejected, row)

    def _add(self, buffer: list[dict[str, Any]], row: dict[str, Any]) -> None:
        with self._lock:
            buffer.append(row)
            if len(buffer) > MAX_BUFFER_ROWS:
                del buffer[: len(buffer) - MAX_BUFFER_ROWS]
                logger.error("production log buffer full: dropped the oldest rows (is %s writable?)", self.log_dir)
        if self.flush_s <= 0:
            self.flush()

    def flush(self) -> int:
        """Write buffered rows now; returns how many were written."""
        with self._write_lock:
            with self._lock:
                rows, rejected = self._rows, self._rejected
                self._rows, self._rejected = [], []
            written = 0
            for buffer, target in ((rows, self.log_dir), (rejected, self.log_dir / REJECTED_DIR)):
                written += self._write(buffer, target)
            return written

    def _write(self, rows: list[dict[str, Any]], target: Path) -> int:
        if not rows:
            return 0
        try:
            append(target, pd.DataFrame(rows))
            return len(rows)
        except Exception:
            logger.exception("cannot write %d rows to %s; keeping them for the next flush", len(rows), target)
            with self._lock:
                buffer = self._rejected if target.name == REJECTED_DIR else self._rows
                buffer[:0] = rows
            return 0

    def start(self) -> LogWriter:
        if self.flush_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="production-log-writer", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()

