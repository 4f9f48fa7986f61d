"""The production log: day partitions, atomic files, windows, per-version filter, buffered writer."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from pipeline.serving import production_log
from pipeline.serving.production_log import REJECTED_DIR, LogWriter


def rows(n: int, start: datetime, version: str = "1", step: timedelta = timedelta(minutes=1)) -> pd.DataFrame:
    return pd.DataFrame({"request_id": [f"r{version}-{i}" for i in range(n)],
                         "request_time": [start + i * step for i in range(n)],
                         "model_name": "m", "model_version": version, "mean": [i / n for i in range(n)]})


def test_append_partitions_by_day_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    start = datetime(2026, 3, 1, 23, 58, tzinfo=UTC)
    written = production_log.append(tmp_path, rows(4, start))
    assert sorted(p.parent.name for p in written) == ["date=2026-03-01", "date=2026-03-02"]
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*"))
    assert production_log.count_rows(tmp_path) == 4


def test_read_last_k_filters_by_version_and_reads_newest_first(tmp_path: Path) -> None:
    now = datetime.now(UTC) - timedelta(hours=3)
    production_log.append(tmp_path, rows(50, now, "1"))
    production_log.append(tmp_path, rows(30, now + timedelta(hours=1), "2"))
    got = production_log.read(tmp_path, last_k=20, where={"model_version": "1"})
    assert len(got) == 20 and set(got["model_version"]) == {"1"}
    assert got["request_id"].iloc[-1] == "r1-49", "the newest rows of that version"
    assert got["request_time"].is_monotonic_increasing
    assert len(production_log.read(tmp_path)) == 80


def test_read_hours_window(tmp_path: Path) -> None:
    production_log.append(tmp_path, rows(10, datetime.now(UTC) - timedelta(hours=30), step=timedelta(seconds=1)))
    production_log.append(tmp_path, rows(5, datetime.now(UTC) - timedelta(minutes=30), "2", timedelta(seconds=1)))
    got = production_log.read(tmp_path, hours=2)
    assert len(got) == 5 and set(got["model_version"]) == {"2"}
    assert production_log.read(tmp_path / "missing", hours=2).empty


def test_writer_buffers_flushes_in_background_and_on_close(tmp_path: Path) -> None:
    writer = LogWriter(tmp_path, flush_s=0.1).start()
    threads = [threading.Thread(target=lambda k=k: [writer.add({"request_id": f"{k}-{i}",
                                                               "request_time": datetime.now(UTC), "x": float(i)})
                                                   for i in range(50)]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.add_rejection({"request_id": "bad", "request_time": datetime.now(UTC), "reason": "too_small"})
    deadline = time.monotonic() + 5
    while production_log.count_rows(tmp_path) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert production_log.count_rows(tmp_path) == 200, "background flush wrote every row exactly once"
    writer.add({"request_id": "last", "request_time": datetime.now(UTC), "x": 1.0})
    writer.close()
    assert production_log.count_rows(tmp_path) == 201
    rejected = production_log.read(tmp_path / REJECTED_DIR)
    assert list(rejected["reason"]) == ["too_small"] and "x" not in rejected


def test_writer_with_zero_interval_writes_at_once(tmp_path: Path) -> None:
    writer = LogWriter(tmp_path, flush_s=0)
    writer.add({"request_id": "a", "request_time": datetime.now(UTC)})
    assert production_log.count_rows(tmp_path) == 1
