"""Ingestion's parallel map: input order, worker processes for large inputs, errors surface."""

from __future__ import annotations

import csv
import os
import time
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.data.manifest import IngestOptions, ingest_records
from pipeline.data.parallel import ordered_map
from pipeline.data.sources.base import XRAY_PROFILE, RawRecord
from tests.data.helpers import write_png


def pid_of(item: int, fail_on: int = -1) -> tuple[int, int]:
    if item == fail_on:
        raise ValueError(f"bad item {item}")
    time.sleep(0.001)
    return item, os.getpid()


def test_process_executor_keeps_input_order_and_uses_worker_processes() -> None:
    out = list(ordered_map(pid_of, range(100), workers=2, executor="process", chunk=4))
    assert [item for item, _ in out] == list(range(100))
    pids = {pid for _, pid in out}
    assert os.getpid() not in pids and len(pids) == 2  # every chunk ran in one of the two workers


def test_auto_keeps_small_inputs_in_process_and_streams_large_ones_in_order() -> None:
    small = list(ordered_map(pid_of, range(20), workers=2, executor="auto", process_after=64))
    assert small == [(i, os.getpid()) for i in range(20)]  # no worker processes for a few files
    big = list(ordered_map(pid_of, iter(range(300)), workers=2, executor="auto", chunk=8, process_after=16))
    assert [item for item, _ in big] == list(range(300))  # a stream (no len()) in order, whoever ran it
    assert big[0][1] == os.getpid()  # the first chunks run here while the workers start


@pytest.mark.parametrize("executor", ["process", "thread", "auto"])
def test_an_error_in_a_worker_reaches_the_caller(executor: str) -> None:
    with pytest.raises(ValueError, match="bad item 37"):
        list(ordered_map(partial(pid_of, fail_on=37), range(80), workers=2, executor=executor, chunk=4,
                         process_after=8))


def die_on_5(item: int) -> int:
    if item == 5:
        os._exit(3)  # a decoder crash or the OOM killer: the worker process vanishes
    return item


def test_a_dead_worker_process_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="worker process died"):
        list(ordered_map(die_on_5, range(40), workers=2, executor="process", chunk=4))


def test_auto_falls_back_to_this_process_when_workers_cannot_start(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.data import parallel

    def no_processes(workers: int) -> None:
        raise PermissionError("semaphores are not available here")

    monkeypatch.setattr(parallel, "_start_pool", no_processes)
    out = list(ordered_map(pid_of, range(200), workers=2, executor="auto", chunk=8, process_after=16))
    assert out == [(i, os.getpid()) for i in range(200)]
    assert [r.message for r in caplog.records].count(
        "could not start worker processes (PermissionError: semaphores are not available here); "
        "reading files in this process instead") == 1
    with pytest.raises(RuntimeError, match="could not start ingestion worker processes .PermissionError: "
                       "semaphores are not available here.; set data.ingest.executor=auto"):
        list(ordered_map(pid_of, range(200), workers=2, executor="process"))  # forced: no silent fallback


def test_unknown_executor_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown executor 'gpu'"):
        list(ordered_map(pid_of, range(3), executor="gpu"))


def test_process_and_thread_ingestion_and_both_png_inflaters_write_identical_outputs(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    records = [RawRecord(p, p.name, "PNEUMONIA" if i % 3 == 0 else "NORMAL", f"P{i // 2}")
               for i, p in enumerate(write_png(raw / f"x{i}.png", i, positive=i % 3 == 0) for i in range(40))]
    (raw / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (raw / "copy.png").write_bytes((raw / "x3.png").read_bytes())
    records += [RawRecord(raw / "bad.png", "bad.png", "NORMAL", "P90"),
                RawRecord(raw / "copy.png", "copy.png", "PNEUMONIA", "P91")]  # x3's bytes, another patient
    outputs = {}
    for executor, inflate in (("thread", "isal"), ("process", "isal"), ("process", "pillow")):
        opts = IngestOptions(source="test", classes=("NORMAL", "PNEUMONIA"), profile=XRAY_PROFILE, salt=b"s",
                             min_size=32, max_pixels=10**8, max_bytes=10**7, dicom_bit_depth=8, workers=2,
                             executor=executor, png_inflate=inflate)
        out = tmp_path / f"{executor}-{inflate}"
        summary = ingest_records(records, out, opts)
        assert (summary["files_seen"], summary["ingested"], summary["quarantined"]) == (42, 40, 2)
        outputs[executor, inflate] = (pq.read_table(out / "manifest.parquet").to_pylist(),
                                      list(csv.reader((out / "quarantine.csv").read_text().splitlines())),
                                      (out / "patient_links.csv").read_text(),
                                      sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")),
                                      {k: v for k, v in summary.items()})
    # rows, order, quarantine, links, stored files, summary: neither where files are read nor who inflates matters
    assert outputs["process", "isal"] == outputs["thread", "isal"] == outputs["process", "pillow"]
