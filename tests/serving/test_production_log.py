"""The production log: day partitions, atomic files, windows, per-version filter, buffered writer."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import ServingError
from pipeline.serving import production_log
from pipeline.serving.production_log import REJECTED_DIR, SIMULATION, LogWriter


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


def corrupt(log_dir: Path) -> list[Path]:
    """Damage the log as a crash or a bad disk would: truncate one real part, add garbage under a part name."""
    parts = sorted(log_dir.glob("date=*/part-*.parquet"))
    truncated = parts[0]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage = parts[-1].parent / "part-999999999999-deadbeef.parquet"
    garbage.write_bytes(b"not parquet at all")
    return [truncated, garbage]


def test_corrupt_parts_are_skipped_counted_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    for k in range(3):
        production_log.append(tmp_path, rows(10, start + timedelta(minutes=20 * k), str(k)))
    bad = corrupt(tmp_path)
    with caplog.at_level(logging.WARNING, logger=production_log.__name__):
        window = production_log.read_window(tmp_path)
    assert len(window.rows) == 20 and sorted(window.skipped_parts) == sorted(str(p) for p in bad)
    assert set(window.rows["model_version"]) == {"1", "2"}, "the damaged part (version 0) is left out, nothing else"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is None and "\n" not in warnings[0].getMessage()
    assert "skipped 2 unreadable part" in warnings[0].getMessage()
    # the windowed readers and the footer count skip them too
    assert len(production_log.read(tmp_path, last_k=15)) == 15
    assert len(production_log.read(tmp_path, hours=2)) == 20
    assert production_log.count_rows(tmp_path) == 20


def test_a_part_without_the_time_column_is_skipped(tmp_path: Path) -> None:
    production_log.append(tmp_path, rows(5, datetime.now(UTC)))
    pd.DataFrame({"x": [1.0]}).to_parquet(next(tmp_path.glob("date=*")) / "part-000000000000-foreign0.parquet")
    window = production_log.read_window(tmp_path)
    assert len(window.rows) == 5 and len(window.skipped_parts) == 1


def test_append_fsyncs_the_part_before_the_rename_and_the_folder_after(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    [part] = production_log.append(tmp_path, rows(3, datetime.now(UTC)))
    kinds = [kind for kind, _ in events]
    assert kinds.count("replace") == 1, events
    at = kinds.index("replace")
    tmp_name = events[at][1]
    assert ("fsync", tmp_name) in events[:at], f"the data is on disk before the rename: {events}"
    assert ("fsync", str(part.parent)) in events[at:], f"the rename is on disk after it: {events}"
    assert Path(tmp_name).parent == part.parent and Path(tmp_name).name.startswith(".")


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:  # the data cannot be flushed; folders still sync
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_file():
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        production_log.append(tmp_path, rows(3, datetime.now(UTC)))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_the_production_log_refuses_simulated_rows(tmp_path: Path) -> None:
    writer = LogWriter(tmp_path, flush_s=0)
    with pytest.raises(ServingError, match="simulation_log"):
        writer.add({"request_id": "s", "request_time": datetime.now(UTC), "source": SIMULATION})
    assert production_log.count_rows(tmp_path) == 0
