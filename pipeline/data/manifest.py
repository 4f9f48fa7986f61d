"""Ingestion: raw records → de-identified image store + ``manifest.parquet`` + quarantine.

Streaming and parallel: records are read by a bounded thread pool (PIL, hashlib and
numpy release the GIL) in submission order, and rows are written to Parquet in
batches, so memory stays flat in the number of images. Output under the dataset dir::

    images/<id[:2]>/<image_id>.<ext>   de-identified copies (hard links when safe)
    manifest.parquet                   one row per usable image
    quarantine.csv                     one row per unusable file (path,reason,detail)
    patient_links.csv                  pseudonymised patient pairs sharing identical bytes
    ingest_summary.json                counts; files_seen = ingested + quarantined

Accounting: ``files_seen`` counts every file the source hands to ingestion, and
``ingested + quarantined = files_seen`` always (checked; a mismatch raises). Files a
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
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.deid import age_band, pseudonymise
from pipeline.data.imaging import BadImage, DecodedImage, decode_bytes
from pipeline.data.quarantine import QuarantineEntry, QuarantineWriter, quarantine_ref
from pipeline.data.sources.base import RawRecord, SourceProfile
from pipeline.data.store import IMAGES_DIR, store_image
from pipeline.features import IMAGE_FEATURES, describe

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "ingest_summary.json"
LINKS_FILE = "patient_links.csv"
FEATURE_COLUMNS = [f for f in IMAGE_FEATURES if f not in ("width", "height", "bit_depth")]

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
        ("sex", pa.string()),
        ("age_band", pa.string()),
        ("modality", pa.string()),
        ("manufacturer", pa.string()),
        ("photometric", pa.string()),
    ]
)


@dataclass(frozen=True)
class IngestOptions:
    """How to read and judge files (from ``data.ingest`` and the source profile)."""

    source: str
    classes: tuple[str, ...]
    profile: SourceProfile
    salt: bytes
    min_size: int
    max_pixels: int
    max_bytes: int
    dicom_bit_depth: int
    workers: int


@dataclass
class _Outcome:
    row: dict[str, Any] | None = None
    quarantine: QuarantineEntry | None = None


# mapper(read, records) -> outcomes in input order (see ingest_records)
Mapper = Callable[[Callable[[RawRecord], _Outcome], Iterable[RawRecord]], Iterable[_Outcome]]


def ingest_records(records: Iterable[RawRecord], out_dir: Path, opts: IngestOptions,
                   extra_summary: dict[str, Any] | None = None,
                   progress: Callable[[int], None] | None = None,
                   mapper: Mapper | None = None) -> dict[str, Any]:
    """Ingest ``records`` into ``out_dir``; returns the summary (also written as JSON).

    The manifest and summary are written to temporary names and moved into place at the
    end, so a crash mid-run leaves the previous manifest intact. ``mapper(read, records)``
    replaces the local thread pool for the per-file work (read, hash, decode, features),
    e.g. to run it on a Dask cluster; it must yield outcomes in input order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / IMAGES_DIR).mkdir(exist_ok=True)
    tmp_manifest = out_dir / f".{MANIFEST_FILE}.tmp"
    tmp_quarantine = out_dir / ".quarantine.csv.tmp"
    dedup = _Dedup()
    files_seen = 0
    writer = pq.ParquetWriter(tmp_manifest, SCHEMA)
    batch: list[dict[str, Any]] = []
    with QuarantineWriter(tmp_quarantine) as quarantine:
        read = functools.partial(_read_one, out_dir=out_dir, opts=opts)
        outcomes = mapper(read, records) if mapper else _parallel(records, read, opts.workers)
        for outcome in outcomes:
            files_seen += 1
            if progress:
                progress(1)
            if outcome.quarantine:
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
        writer.close()
        n_rows = _drop_conflicts(tmp_manifest, dedup.conflicted_refs(), quarantine)
    counts = dict(sorted(quarantine.counts.items()))
    summary = _summary(out_dir, tmp_manifest, files_seen, n_rows, counts, opts,
                       {**(extra_summary or {}), "patient_links": len(dedup.links)})
    _write_links(out_dir / f".{LINKS_FILE}.tmp", dedup.links)
    os.replace(out_dir / f".{LINKS_FILE}.tmp", out_dir / LINKS_FILE)
    os.replace(tmp_quarantine, out_dir / "quarantine.csv")
    os.replace(tmp_manifest, out_dir / MANIFEST_FILE)
    _write_json(out_dir / SUMMARY_FILE, summary)
    logger.info("ingested %d of %d files (%d quarantined)", n_rows, files_seen, files_seen - n_rows)
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


def _parallel(records: Iterable[RawRecord], fn: Callable[[RawRecord], _Outcome], workers: int) -> Iterator[_Outcome]:
    """Map ``fn`` over ``records`` on a bounded pool, yielding results in input order."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        yield from map(fn, records)
        return
    pending: deque[Future[_Outcome]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        for record in records:
            pending.append(pool.submit(fn, record))
            if len(pending) >= workers * 4:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _read_one(record: RawRecord, out_dir: Path, opts: IngestOptions) -> _Outcome:
    qref = quarantine_ref(record.ref, opts.salt)
    try:
        size = record.path.stat().st_size
        if size > opts.max_bytes:
            raise BadImage("too_large_file", f"{size} bytes > {opts.max_bytes}")
        data = record.path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        image = _decode(data, opts)
        _check_image(image, opts)
        label = record.label
        if not label and record.label_by_uid:
            label = record.label_by_uid.get(image.identifiers.get("sop_instance_uid", "")) or None
        label_index = _check_label(label, opts.classes)
        patient = record.patient_key or image.identifiers.get("patient_id") or None
        if not patient:
            raise BadImage("missing_patient", "no patient id in the label file or the DICOM header")
    except BadImage as exc:
        return _Outcome(quarantine=QuarantineEntry(qref, exc.reason, exc.detail))
    except OSError as exc:
        detail = f"unreadable: {exc.strerror or type(exc).__name__}"
        return _Outcome(quarantine=QuarantineEntry(qref, "truncated", detail))
    image_id = sha[:16]
    rel = store_image(image, data, record, out_dir, image_id)
    return _Outcome(row={**_row(image, record, opts, label, label_index, patient), "image_id": image_id,
                          "path": rel, "sha256": sha, "_qref": qref})


def _row(image: DecodedImage, record: RawRecord, opts: IngestOptions, label: str, label_index: int,
         patient: str) -> dict[str, Any]:
    """Manifest fields of one accepted image (pseudonymised patient, features, PHI-free header fields)."""
    # one downscaled view serves the features and the pHash; serving reaches the same code from
    # gray01() (pipeline.features.describe), so production features compare exactly
    feats, phash = describe(image.pixels if image.channels == 1 else image.gray01(), bit_depth=image.bit_depth,
                            width=image.width, height=image.height)
    extra = record.extra
    return {
        "patient_id": pseudonymise(str(patient), opts.salt),
        "label": label,
        "label_index": label_index,
        "width": image.width,
        "height": image.height,
        "channels": image.channels,
        "bit_depth": image.bit_depth,
        **{name: feats[name] for name in FEATURE_COLUMNS},
        "phash": phash,
        "format": image.format,
        "source": opts.source,
        "source_split": record.source_split,
        "view_position": _clean(extra.get("view_position") or image.meta.get("view_position")),
        "sex": _clean(extra.get("sex")),
        "age_band": age_band(_to_float(extra.get("age"))),
        "modality": image.meta.get("modality") or opts.profile.modality,
        "manufacturer": image.meta.get("manufacturer"),
        "photometric": image.meta.get("photometric"),
    }


def _decode(data: bytes, opts: IngestOptions) -> DecodedImage:
    """Decode; an unexpected decoder exception on odd input quarantines the file instead of
    stopping the whole ingestion (logged with its type only: messages may quote file content)."""
    try:
        return decode_bytes(data, max_pixels=opts.max_pixels, dicom_bit_depth=opts.dicom_bit_depth)
    except BadImage:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party decoders raise anything on hostile input
        logger.warning("decoder raised %s on one file; quarantined as decode_error", type(exc).__name__)
        raise BadImage("decode_error", f"{type(exc).__name__} while decoding") from None


def _check_image(image: DecodedImage, opts: IngestOptions) -> None:
    if image.channels == 3 and not opts.profile.allow_colour:
        raise BadImage("colour_image", "colour pixels where grayscale radiographs are expected")
    if min(image.width, image.height) < opts.min_size:
        raise BadImage("too_small", f"{image.width}x{image.height} below {opts.min_size} px")
    largest = opts.profile.size_range[1]
    if max(image.width, image.height) > largest:  # validation's size range would reject it
        raise BadImage("too_large_image", f"{image.width}x{image.height}: a side exceeds {largest} px")


def _check_label(label: str | None, classes: tuple[str, ...]) -> int:
    if not label:
        raise BadImage("missing_label", "no label for this file")
    if label not in classes:
        raise BadImage("unknown_label", f"label not in {list(classes)}")
    return classes.index(label)


def _clean(value: object) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _to_float(value: object) -> float | None:
    try:
        return float(str(value).rstrip("Yy")) if value not in (None, "") else None
    except ValueError:
        return None


def _summary(out_dir: Path, manifest: Path, files_seen: int, n_rows: int, counts: dict[str, int],
             opts: IngestOptions, extra: dict[str, Any]) -> dict[str, Any]:
    df = pd.read_parquet(manifest, columns=["patient_id", "label", "sha256"])
    quarantined = sum(counts.values())
    if n_rows + quarantined != files_seen:
        raise RuntimeError(f"ingest accounting error: {n_rows} + {quarantined} != {files_seen}")
    content = hashlib.sha256("\n".join(sorted(df["sha256"])).encode()).hexdigest()
    dvc = extra.get("dvc") or {}
    summary = {
        "source": opts.source,
        "files_seen": files_seen,
        "ingested": n_rows,
        "quarantined": quarantined,
        "quarantine_reasons": counts,
        "patients": int(df["patient_id"].nunique()),
        "classes": list(opts.classes),
        "label_counts": {k: int(v) for k, v in Counter(df["label"]).most_common()},
        "manifest_sha256": _file_sha256(manifest),
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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_manifest(dataset_dir: Path) -> pd.DataFrame:
    """Load ``manifest.parquet``, with a clear error when ingest has not run."""
    path = dataset_dir / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `xrayops ingest --out {dataset_dir}` first")
    return pd.read_parquet(path)


def read_summary(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else {}
