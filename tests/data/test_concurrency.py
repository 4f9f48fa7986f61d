"""Ingestion under concurrency and faults: two runs of one dataset never mix their files.

Two runs of the training flow may overlap (a schedule and a manual run, or a drift
trigger): both ingest the same dataset into the same folder. Every file ingestion writes
has a temporary name of its own, and a per-dataset lock makes the second ingest wait, so
the manifest, ``quarantine.csv``, ``ingest_summary.json`` and the stored images always form
one consistent set.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import Settings
from pipeline.data.ingest import prepare_raw, run_ingest
from pipeline.data.manifest import IngestOptions, ingest_records
from pipeline.data.sources.base import XRAY_PROFILE, RawRecord
from pipeline.errors import DatasetBusy

SALT = b"concurrency-test-salt-0123456789abcdef"
N_GOOD, N_EMPTY = 120, 7


def tiny_dataset(raw: Path) -> list[RawRecord]:
    """``N_GOOD`` distinct 48x48 PNGs and ``N_EMPTY`` empty files (quarantined)."""
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(N_GOOD):
        path = raw / f"img{i:03d}.png"
        if not path.exists():
            Image.fromarray((rng.random((48, 48)) * 200 + 20).astype(np.uint8)).save(path, compress_level=1)
        records.append(RawRecord(path, path.name, "PNEUMONIA" if i % 3 == 0 else "NORMAL", f"patient{i // 2}"))
    for i in range(N_EMPTY):
        path = raw / f"empty{i}.png"
        path.write_bytes(b"")
        records.append(RawRecord(path, path.name, "NORMAL", f"patient-e{i}"))
    return records


def options(workers: int = 2) -> IngestOptions:
    return IngestOptions(source="test", classes=("NORMAL", "PNEUMONIA"), profile=XRAY_PROFILE, salt=SALT,
                         min_size=32, max_pixels=100_000_000, max_bytes=1 << 20, dicom_bit_depth=8,
                         workers=workers, executor="thread")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_consistent(dataset: Path, *, ingested: int = N_GOOD, quarantined: int = N_EMPTY) -> dict:
    """The files of one ingest, all of them: summary ↔ manifest ↔ quarantine ↔ images, no temp files."""
    summary = json.loads((dataset / "ingest_summary.json").read_text())
    manifest = pq.read_table(dataset / "manifest.parquet").to_pandas()
    quarantine = list(csv.DictReader(open(dataset / "quarantine.csv")))
    assert summary["ingested"] == len(manifest) == ingested
    assert summary["quarantined"] == len(quarantine) == quarantined
    assert summary["manifest_sha256"] == _sha256(dataset / "manifest.parquet")  # what flows/caching.py checks
    assert all((dataset / p).is_file() for p in manifest["path"])
    leftovers = [p.name for p in dataset.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    return summary


# --------------------------------------------------------------------------- two ingests at once


def _ingest_in_child(raw: str, out: str, start: multiprocessing.synchronize.Barrier,
                     results: multiprocessing.Queue, timeout_s: float) -> None:
    records = tiny_dataset(Path(raw))
    start.wait()
    try:
        summary = ingest_records(records, Path(out), options(), lock_timeout_s=timeout_s)
        results.put(("ok", summary["manifest_sha256"]))
    except Exception as exc:  # noqa: BLE001 - the test reports whatever a run died of
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def run_at_once(n: int, raw: Path, out: Path, timeout_s: float = 60) -> list[tuple[str, str]]:
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_ingest_in_child, args=(str(raw), str(out), start, results, timeout_s))
             for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    return got


def test_two_processes_ingesting_one_dataset_at_once_leave_one_consistent_set(tmp_path: Path) -> None:
    tiny_dataset(tmp_path / "raw")
    got = run_at_once(2, tmp_path / "raw", tmp_path / "ds")
    assert [status for status, _ in got] == ["ok", "ok"], got
    assert got[0][1] == got[1][1]  # same data, same salt: the same manifest bytes
    assert_consistent(tmp_path / "ds")


def test_two_threads_ingesting_one_dataset_at_once_leave_one_consistent_set(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    records = tiny_dataset(tmp_path / "raw")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(ingest_records, records, tmp_path / "ds", options(workers=1), lock_timeout_s=60)
                   for _ in range(2)]
        summaries = [f.result() for f in futures]
    assert summaries[0]["manifest_sha256"] == summaries[1]["manifest_sha256"]
    assert_consistent(tmp_path / "ds")


# --------------------------------------------------------------------------- the lock: bounded wait, holder named

HOLD = """
import sys, time
from pathlib import Path
from pipeline.locking import file_lock
with file_lock(Path(sys.argv[1]), what="test holder", timeout_s=1, setting="x"):
    print("locked", flush=True)
    time.sleep(60)
"""


def hold_lock(lock: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_ingest_waits_then_fails_naming_the_holder(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings("data.version_with_dvc=false", "data.synthetic.n_patients=12",
                             "data.ingest.lock_timeout_s=1")
    prepare_raw(settings)
    holder = hold_lock(settings.dataset_dir / ".lock")
    try:
        began = time.monotonic()
        with pytest.raises(DatasetBusy) as err:
            run_ingest(settings, show_progress=False)
        assert 0.9 <= time.monotonic() - began < 10  # it waited the configured second, then stopped
        message = str(err.value)
        assert f"pid {holder.pid}" in message and str(settings.dataset_dir) in message
        assert "data.ingest.lock_timeout_s" in (err.value.hint or "")
        assert not (settings.dataset_dir / "manifest.parquet").exists()  # nothing was written meanwhile
    finally:
        holder.kill()
        holder.wait()
    # a holder that dies (SIGKILL: no clean-up) releases the lock with its process
    summary = run_ingest(settings, show_progress=False)
    assert summary["ingested"] > 0


def test_the_second_ingest_proceeds_as_soon_as_the_first_releases(tmp_path: Path) -> None:
    records = tiny_dataset(tmp_path / "raw")
    holder = hold_lock(tmp_path / "ds" / ".lock")
    release = threading.Timer(0.5, os.kill, (holder.pid, signal.SIGTERM))  # while the ingest below waits
    try:
        began = time.monotonic()
        release.start()
        summary = ingest_records(records, tmp_path / "ds", options(), lock_timeout_s=30)
        assert 0.4 < time.monotonic() - began < 10
    finally:
        release.cancel()
        holder.kill()
        holder.wait()
    assert summary["ingested"] == N_GOOD
    assert_consistent(tmp_path / "ds")


def test_raw_data_preparation_is_locked_too(make_settings: Callable[..., Settings]) -> None:
    from pipeline.data.ingest import raw_lock_path

    settings = make_settings("data.version_with_dvc=false", "data.synthetic.n_patients=12",
                             "data.ingest.lock_timeout_s=0.5")
    holder = hold_lock(raw_lock_path(settings))
    try:
        with pytest.raises(DatasetBusy, match=f"pid {holder.pid}"):
            prepare_raw(settings)
    finally:
        holder.kill()
        holder.wait()
    assert not (settings.raw_dir / "cohort.json").exists()


def test_a_stage_holding_the_dataset_lock_may_ingest_inside_it_while_other_threads_wait(
        make_settings: Callable[..., Settings]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.manifest import dataset_lock

    settings = make_settings("data.version_with_dvc=false", "data.synthetic.n_patients=12",
                             "data.ingest.lock_timeout_s=0.5")
    prepare_raw(settings)
    with dataset_lock(settings), ThreadPoolExecutor(1) as other:
        summary = run_ingest(settings, show_progress=False)  # nested in this thread: no self-deadlock
        with pytest.raises(DatasetBusy, match=f"pid {os.getpid()}"):
            other.submit(run_ingest, settings, show_progress=False).result()
        assert (settings.dataset_dir / ".lock").read_text().startswith(f"pid {os.getpid()}")  # still held
    assert_consistent(settings.dataset_dir, ingested=summary["ingested"], quarantined=0)


# --------------------------------------------------------------------------- a crash mid-ingest


def failing_after(n: int) -> Callable[[Callable, Iterable[RawRecord]], Iterator]:
    """A mapper (the per-file fan-out edge) that dies after ``n`` files, as a killed worker pool would."""

    def mapper(read: Callable, records: Iterable[RawRecord]) -> Iterator:
        for i, record in enumerate(records):
            if i == n:
                raise RuntimeError("worker pool died")
            yield read(record)

    return mapper


def test_a_crash_mid_ingest_keeps_the_previous_set_and_leaves_no_temp_files(tmp_path: Path) -> None:
    records = tiny_dataset(tmp_path / "raw")
    ds = tmp_path / "ds"
    ingest_records(records, ds, options())
    before = {name: (ds / name).read_bytes() for name in ("manifest.parquet", "quarantine.csv", "ingest_summary.json")}
    with pytest.raises(RuntimeError, match="worker pool died"):
        ingest_records(records[::-1], ds, options(), mapper=failing_after(50))
    assert {name: (ds / name).read_bytes() for name in before} == before
    assert_consistent(ds)
    assert not (ds / ".lock").read_text().strip()  # the holder line goes with the holder
