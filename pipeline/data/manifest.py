"""Ingestion: raw records → de-identified image store + ``manifest.parquet`` + quarantine.

Streaming and parallel: records are read (:func:`pipeline.data.reader.read_one`) by worker
processes or threads (:mod:`pipeline.data.parallel`), a bounded number in flight, results
in input order; rows are written to Parquet in batches, so memory stays flat in the number
of images. Output under the dataset dir::

    images/<id[:2]>/<image_id>.<ext>   de-identified copies (hard links when safe)
    manifest.parquet                   one row per usable image
    quarantine.csv                     one row per unusable file (path,reason,detail)
    excluded.csv                       one row per valid file outside data.admission (a CT, a lateral, …)
    patient_links.csv                  pseudonymised patient pairs sharing identical bytes
    ingest_summary.json                counts; files_seen = ingested + quarantined
    .lock                              held by the ingest writing the folder (one at a time)

Accounting: ``files_seen`` counts every file the source hands to ingestion, and
``ingested + quarantined + excluded = files_seen`` always (checked; a mismatch raises), where
``excluded`` is the sum of ``excluded_by_policy`` (per :data:`pipeline.data.policy.POLICY_REASONS`:
valid DICOM files the admission policy leaves out, judged from the header). Files a
source leaves out on purpose are *not* files seen but are counted next to them:
``excluded_by_label_mapping`` (labels the task does not use, e.g. NIH findings other than
Pneumonia / No Finding; per label in ``excluded_labels``) and ``ignored_files``
(metadata files, unlabelled test folders). ``files_found = files_seen +
excluded_by_label_mapping``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.image_store import IMAGES_DIR
from pipeline.data.parallel import ordered_map
from pipeline.data.policy import POLICY_REASONS
from pipeline.data.quarantine import QUARANTINE_FILE, QuarantineEntry, QuarantineWriter
from pipeline.data.reader import FEATURE_COLUMNS, IngestOptions, ReadOutcome, read_one
from pipeline.data.sources.base import RawRecord
from pipeline.durable import fsync_path
from pipeline.locking import file_lock

if TYPE_CHECKING:
    from pipeline.config import Settings

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "ingest_summary.json"
LINKS_FILE = "patient_links.csv"
EXCLUDED_FILE = "excluded.csv"
LOCK_FILE = ".lock"  # held for a whole ingest (pipeline.locking)
TEMP_SUFFIX = ".tmp"
__all__ = ["FEATURE_COLUMNS", "IngestOptions", "Mapper", "ingest_records", "read_links", "read_manifest",
           "read_summary"]

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("patient_id", pa.string()),
        ("label", pa.string()),
        ("label_index", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("channels", pa.int32()),
        ("bit_depth", pa.int32()),
        *[(name, pa.float32()) for name in FEATURE_COLUMNS],
        ("phash", pa.string()),
        ("format", pa.string()),
        ("source", pa.string()),
        ("source_split", pa.string()),
        ("view_position", pa.string()),
        ("site", pa.string()),
        ("sex", pa.string()),
        ("age_band", pa.string()),
        ("modality", pa.string()),
        ("manufacturer", pa.string()),
        ("photometric", pa.string()),
    ]
)


# mapper(read, records) -> outcomes in input order (see ingest_records)
Mapper = Callable[[Callable[[RawRecord], ReadOutcome], Iterable[RawRecord]], Iterable[ReadOutcome]]


def ingest_records(records: Iterable[RawRecord], out_dir: Path, opts: IngestOptions,
                   extra_summary: dict[str, Any] | None = None,
                   progress: Callable[[int], None] | None = None,
                   mapper: Mapper | None = None, *, lock_timeout_s: float = 0.0) -> dict[str, Any]:
    """Ingest ``records`` into ``out_dir``; returns the summary (also written as JSON).

    One ingest of a folder at a time: the whole run holds ``out_dir/.lock``
    (:mod:`pipeline.locking`); another waits up to ``lock_timeout_s`` seconds (0: not at
    all), then raises :class:`~pipeline.errors.DatasetBusy` naming the holder. Outputs are
    written under temporary names of this run (pid + random) and moved into place at the
    end, the summary last, so a crash mid-run leaves the previous set intact (and no
    temporary files). ``mapper(read, records)`` replaces the local worker pool
    (:func:`pipeline.data.parallel.ordered_map`, ``opts.executor``) for the per-file work (read,
    hash, decode, features), e.g. to run it on a Dask cluster; it must yield outcomes in input order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir / LOCK_FILE, what=f"dataset folder {out_dir}", timeout_s=lock_timeout_s,
                   setting="data.ingest.lock_timeout_s"):
        _remove_stale_temp_files(out_dir)
        temp = {name: temp_name(out_dir / name)
                for name in (MANIFEST_FILE, QUARANTINE_FILE, EXCLUDED_FILE, LINKS_FILE, SUMMARY_FILE)}
        try:
            summary = _ingest_locked(records, out_dir, opts, extra_summary, progress, mapper, temp)
        finally:
            for path in temp.values():
                path.unlink(missing_ok=True)
    logger.info("ingested %d of %d files; quarantined %d%s; excluded by data.admission %d%s", summary["ingested"],
                summary["files_seen"], summary["quarantined"], _reasons(summary["quarantine_reasons"]),
                sum(summary["excluded_by_policy"].values()), _reasons(summary["excluded_by_policy"]))
    return summary


def _reasons(counts: dict[str, int]) -> str:
    return f" ({', '.join(f'{k}: {v}' for k, v in counts.items())})" if counts else ""


def temp_name(path: Path) -> Path:
    """A temporary name next to ``path`` that no other process or thread uses: ``.<name>.<pid>.<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def _remove_stale_temp_files(out_dir: Path) -> None:
    """Temporary files of ingests that died (we hold the lock: no live ingest owns any)."""
    for path in out_dir.glob(f".*{TEMP_SUFFIX}"):
        path.unlink(missing_ok=True)


def _ingest_locked(records: Iterable[RawRecord], out_dir: Path, opts: IngestOptions,
                   extra_summary: dict[str, Any] | None, progress: Callable[[int], None] | None,
                   mapper: Mapper | None, temp: dict[str, Path]) -> dict[str, Any]:
    (out_dir / IMAGES_DIR).mkdir(exist_ok=True)
    tmp_manifest = temp[MANIFEST_FILE]
    dedup = _Dedup()
    files_seen = 0
    writer = pq.ParquetWriter(tmp_manifest, SCHEMA)
    batch: list[dict[str, Any]] = []
    with QuarantineWriter(temp[QUARANTINE_FILE]) as quarantine, \
            QuarantineWriter(temp[EXCLUDED_FILE], POLICY_REASONS) as excluded:
        read = functools.partial(read_one, out_dir=out_dir, opts=opts)
        outcomes = mapper(read, records) if mapper else \
            ordered_map(read, records, workers=opts.workers, executor=opts.executor)
        try:
            for outcome in outcomes:
                files_seen += 1
                if progress:
                    progress(1)
                if outcome.excluded:
                    excluded.add(outcome.excluded)
                    continue
                if outcome.quarantine:
                    if outcome.quarantine.reason == "decode_error":  # the detail names the error type only
                        logger.warning("decoder failed on one file (%s); quarantined as decode_error",
                                       outcome.quarantine.detail)
                    quarantine.add(outcome.quarantine)
                    continue
                row = outcome.row
                assert row is not None
                duplicate = dedup.check(row)
                if duplicate:
                    quarantine.add(duplicate)
                    continue
                batch.append(row)
                if len(batch) >= 512:
                    _flush(writer, batch)
            _flush(writer, batch)
        finally:
            writer.close()
        n_rows = _drop_conflicts(tmp_manifest, dedup.conflicted_refs(), quarantine)
    counts = dict(sorted(quarantine.counts.items()))
    summary = _summary(out_dir, tmp_manifest, files_seen, n_rows, counts, dict(sorted(excluded.counts.items())),
                       opts, {**(extra_summary or {}), "patient_links": len(dedup.links)})
    _write_links(temp[LINKS_FILE], dedup.links)
    _write_json(temp[SUMMARY_FILE], summary)
    for name in (LINKS_FILE, QUARANTINE_FILE, EXCLUDED_FILE, MANIFEST_FILE, SUMMARY_FILE):  # the summary last
        fsync_path(temp[name])
        os.replace(temp[name], out_dir / name)
    fsync_path(out_dir)
    return summary


class _Dedup:
    """Identical bytes: keep the first copy; quarantine later copies; record patient links.

    Identical bytes under two patient ids mean one person under two ids (or a mix-up):
    the pair is written to ``patient_links.csv`` so the split keeps both ids on one side.
    """

    def __init__(self) -> None:
        self.accepted: dict[str, tuple[str, str, str]] = {}  # sha256 -> (label, qref, patient) of the kept copy
        self.conflicts: set[str] = set()
        self.links: set[tuple[str, str]] = set()

    def check(self, row: dict[str, Any]) -> QuarantineEntry | None:
        """None when ``row`` is new (it is remembered); else the quarantine entry for it."""
        sha, qref = row["sha256"], row.pop("_qref")
        if sha not in self.accepted:
            self.accepted[sha] = (row["label"], qref, row["patient_id"])
            return None
        label, _, patient = self.accepted[sha]
        if patient != row["patient_id"]:
            self.links.add(tuple(sorted((patient, row["patient_id"]))))  # type: ignore[arg-type]
        if label == row["label"]:
            return QuarantineEntry(qref, "duplicate_image", "identical bytes already ingested")
        self.conflicts.add(sha)
        return QuarantineEntry(qref, "conflicting_labels", "identical bytes with another label")

    def conflicted_refs(self) -> dict[str, str]:
        return {sha: self.accepted[sha][1] for sha in self.conflicts}


def _write_links(path: Path, links: set[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("patient_a", "patient_b", "reason"))
        writer.writerows((a, b, "identical_bytes") for a, b in sorted(links))


def read_links(dataset_dir: Path) -> list[tuple[str, str]]:
    """Pseudonymised patient pairs that share an image (written by ingestion)."""
    path = dataset_dir / LINKS_FILE
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [(r["patient_a"], r["patient_b"]) for r in csv.DictReader(fh)]


def _flush(writer: pq.ParquetWriter, batch: list[dict[str, Any]]) -> None:
    if batch:
        writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
        batch.clear()


def _drop_conflicts(manifest: Path, conflicts: dict[str, str], quarantine: QuarantineWriter) -> int:
    """Move kept rows whose bytes later turned out to carry another label into quarantine."""
    if not conflicts:
        return pq.ParquetFile(manifest).metadata.num_rows
    df = pq.read_table(manifest).to_pandas()
    bad = df["sha256"].isin(list(conflicts))
    for _, row in df[bad].iterrows():
        quarantine.add(QuarantineEntry(conflicts[row["sha256"]], "conflicting_labels",
                                       "identical bytes with another label"))
        (manifest.parent / row["path"]).unlink(missing_ok=True)
    kept = pa.Table.from_pandas(df[~bad], schema=SCHEMA, preserve_index=False)
    pq.write_table(kept, manifest)
    return kept.num_rows


def _summary(out_dir: Path, manifest: Path, files_seen: int, n_rows: int, counts: dict[str, int],
             excluded: dict[str, int], opts: IngestOptions, extra: dict[str, Any]) -> dict[str, Any]:
    df = pd.read_parquet(manifest, columns=["patient_id", "label", "sha256"])
    quarantined, n_excluded = sum(counts.values()), sum(excluded.values())
    if n_rows + quarantined + n_excluded != files_seen:
        raise RuntimeError(f"ingest accounting error: {n_rows} + {quarantined} + {n_excluded} != {files_seen}")
    content = hashlib.sha256("\n".join(sorted(df["sha256"])).encode()).hexdigest()
    dvc = extra.get("dvc") or {}
    summary = {
        "source": opts.source,
        "files_seen": files_seen,
        "ingested": n_rows,
        "quarantined": quarantined,
        "quarantine_reasons": counts,
        "excluded_by_policy": excluded,
        "admission": opts.policy.summary() if opts.policy else None,  # what the files were judged by
        "profile_modality": opts.profile.modality,
        "patients": int(df["patient_id"].nunique()),
        "classes": list(opts.classes),
        "label_counts": {k: int(v) for k, v in Counter(df["label"]).most_common()},
        "manifest_sha256": file_sha256(manifest),
        "content_sha256": content,
        "dataset_hash": dvc.get("dvc_md5") or f"sha256:{content}",
        "dvc_md5": dvc.get("dvc_md5"),
        "dvc_rev": dvc.get("rev"),
        "min_size": opts.min_size,
        "size_range": [opts.min_size, max(opts.min_size, opts.profile.size_range[1])],
        "excluded_by_label_mapping": 0,
        **extra,
    }
    summary["files_found"] = files_seen + int(summary["excluded_by_label_mapping"])
    return summary


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (the manifest binding of summaries, certificates, caches)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_sha256(dataset_dir: Path) -> str | None:
    """The sha256 of ``manifest.parquet`` as it is now; None when there is none."""
    path = dataset_dir / MANIFEST_FILE
    return file_sha256(path) if path.is_file() else None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)


def dataset_lock(settings: Settings, dataset_dir: Path | None = None) -> AbstractContextManager[None]:
    """Exclusive lock of a dataset folder (bounded wait, re-entrant in a thread).

    Every stage that writes into the dataset folder (ingest, validate, split) holds it, so
    overlapping runs take turns instead of writing the same files at once.
    """
    folder = dataset_dir or settings.dataset_dir
    return file_lock(folder / LOCK_FILE, what=f"dataset folder {folder}",
                     timeout_s=settings.data.ingest.lock_timeout_s, setting="data.ingest.lock_timeout_s")


def read_manifest(dataset_dir: Path) -> pd.DataFrame:
    """Load ``manifest.parquet``, with a clear error when ingest has not run."""
    path = dataset_dir / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `xrayops ingest --out {dataset_dir}` first")
    return pd.read_parquet(path)


def read_summary(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else {}
