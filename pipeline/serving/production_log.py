"""Append-only prediction log: partitioned Parquet (``date=YYYY-MM-DD/part-*.parquet``).

Each append writes new files atomically (temporary name, then rename), so readers never
see half-written data and concurrent writers never collide. No PHI and no pixels: rows
hold request metadata, image features, embedding components and outputs. Rejected
requests go to ``rejected/date=…/`` with their reason only.

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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

REJECTED_DIR = "rejected"
MAX_BUFFER_ROWS = 200_000


def append(log_dir: Path, rows: pd.DataFrame, time_column: str = "request_time") -> list[Path]:
    """Append ``rows`` (with a UTC time column) as one new Parquet file per day."""
    if rows.empty:
        return []
    rows = rows.assign(**{time_column: pd.to_datetime(rows[time_column], utc=True)})
    days = rows[time_column].dt.strftime("%Y-%m-%d")
    written = []
    for day, part in rows.groupby(days, sort=True):
        part_dir = log_dir / f"date={day}"
        part_dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{datetime.now(UTC).strftime('%H%M%S%f')}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = part_dir / f".{name}.tmp"
        part.reset_index(drop=True).to_parquet(tmp, index=False)
        os.replace(tmp, part_dir / name)
        written.append(part_dir / name)
    return written


def _files(log_dir: Path, hours: float | None) -> tuple[list[Path], datetime | None]:
    files = sorted(log_dir.glob("date=*/part-*.parquet"))
    since = None
    if hours is not None:
        since = datetime.now(UTC) - timedelta(hours=hours)
        files = [f for f in files if f.parent.name >= f"date={since:%Y-%m-%d}"]
    return files, since


def _load(path: Path, where: dict[str, Any] | None) -> pd.DataFrame:
    df = pd.read_parquet(path)
    if not where:
        return df
    keep = np.ones(len(df), bool)
    for col, value in where.items():
        if col not in df:
            return df.iloc[0:0]
        column = df[col]
        same = column == value if column.dtype == object else column.astype(str) == str(value)
        keep &= same.to_numpy()
    return df[keep]


def read(log_dir: Path, *, last_k: int | None = None, hours: float | None = None,
         where: dict[str, Any] | None = None) -> pd.DataFrame:
    """Rows of the current window: the last ``hours`` hours, else the last ``last_k`` rows (else all).

    ``where`` keeps rows whose columns equal the given values (e.g. one model version).
    With ``last_k`` only the newest files needed are read.
    """
    files, since = _files(log_dir, hours)
    frames: list[pd.DataFrame] = []
    if last_k and hours is None:
        count = 0
        for path in reversed(files):  # names sort by date, then time of writing
            frame = _load(path, where)
            frames.append(frame)
            count += len(frame)
            if count >= last_k:
                break
        frames.reverse()
    else:
        frames = [_load(f, where) for f in files]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    df["request_time"] = pd.to_datetime(df["request_time"], utc=True)
    df = df.sort_values("request_time", kind="stable").reset_index(drop=True)
    if since is not None:
        return df[df["request_time"] >= pd.Timestamp(since)].reset_index(drop=True)
    return df.tail(last_k).reset_index(drop=True) if last_k else df


def count_rows(log_dir: Path) -> int:
    """Rows in the log (reads only Parquet footers)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in log_dir.glob("date=*/part-*.parquet"))


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

