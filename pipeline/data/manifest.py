"""Ingestion: raw records → de-identified image store + ``manifest.parquet`` + quarantine.

Streaming and parallel: records are read by a bounded thread pool (PIL, hashlib and
numpy release the GIL) in submission order, and rows are written to Parquet in
batches, so memory stays flat in the number of images. Output under the dataset dir::

    images/<id[:2]>/<image_id>.<ext>   de-identified copies (hard links when safe)
    manifest.parquet                   one row per usable image
    quarantine.csv                     one row per unusable file (path,reason,detail)
    ingest_summary.json                counts; files_seen = ingested + quarantined
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
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
from pipeline.data.imaging import BadImage, DecodedImage, decode_bytes, encode_png
from pipeline.data.quarantine import QuarantineEntry, QuarantineWriter, quarantine_ref
from pipeline.data.sources.base import RawRecord, SourceProfile
from pipeline.features import IMAGE_FEATURES, image_features, perceptual_hash

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "ingest_summary.json"
IMAGES_DIR = "images"
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


def ingest_records(records: Iterable[RawRecord], out_dir: Path, opts: IngestOptions,
                   extra_summary: dict[str, Any] | None = None,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Ingest ``records`` into ``out_dir``; returns the summary (also written as JSON).

    The manifest and summary are written to temporary names and moved into place at the
    end, so a crash mid-run leaves the previous manifest intact.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / IMAGES_DIR).mkdir(exist_ok=True)
    tmp_manifest = out_dir / f".{MANIFEST_FILE}.tmp"
    tmp_quarantine = out_dir / ".quarantine.csv.tmp"
    accepted: dict[str, tuple[str, str]] = {}  # sha256 -> (label, quarantine ref) of the kept copy
    conflicts: set[str] = set()
    files_seen = 0
    writer = pq.ParquetWriter(tmp_manifest, SCHEMA)
    batch: list[dict[str, Any]] = []
    with QuarantineWriter(tmp_quarantine) as quarantine:
        for outcome in _parallel(records, lambda r: _read_one(r, out_dir, opts), opts.workers):
            files_seen += 1
            if progress:
                progress(1)
            if outcome.quarantine:
                quarantine.add(outcome.quarantine)
                continue
            row = outcome.row
            assert row is not None
            sha, qref = row["sha256"], row.pop("_qref")
            if sha in accepted:
                same_label = accepted[sha][0] == row["label"]
                if not same_label:
                    conflicts.add(sha)
                reason = "duplicate_image" if same_label else "conflicting_labels"
                quarantine.add(QuarantineEntry(qref, reason, "identical bytes " +
                                               ("already ingested" if same_label else "with another label")))
                continue
            accepted[sha] = (row["label"], qref)
            batch.append(row)
            if len(batch) >= 512:
                _flush(writer, batch)
        _flush(writer, batch)
        writer.close()
        n_rows = _drop_conflicts(tmp_manifest, {sha: accepted[sha][1] for sha in conflicts}, quarantine)
    counts = dict(sorted(quarantine.counts.items()))
    summary = _summary(out_dir, tmp_manifest, files_seen, n_rows, counts, opts, extra_summary or {})
    os.replace(tmp_quarantine, out_dir / "quarantine.csv")
    os.replace(tmp_manifest, out_dir / MANIFEST_FILE)
    _write_json(out_dir / SUMMARY_FILE, summary)
    logger.info("ingested %d of %d files (%d quarantined)", n_rows, files_seen, files_seen - n_rows)
    return summary


def _flush(writer: pq.ParquetWriter, batch: list[dict[str, Any]]) -> None:
    if batch:
        writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
        batch.clear()


def _drop_conflicts(manifest: Path, conflicts: dict[str, str], quarantine: QuarantineWriter) -> int:
    """Move kept rows whose bytes later turned out to carry another label into quarantine."""
    table = pq.read_table(manifest)
    if not conflicts:
        return table.num_rows
    df = table.to_pandas()
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
        image = decode_bytes(data, max_pixels=opts.max_pixels, dicom_bit_depth=opts.dicom_bit_depth)
        _check_image(image, opts)
        label_index = _check_label(record.label, opts.classes)
        patient = record.patient_key or image.identifiers.get("patient_id") or None
        if not patient:
            raise BadImage("missing_patient", "no patient id in the label file or the DICOM header")
    except BadImage as exc:
        return _Outcome(quarantine=QuarantineEntry(qref, exc.reason, exc.detail))
    except OSError as exc:
        return _Outcome(quarantine=QuarantineEntry(qref, "truncated", f"unreadable: {exc.strerror or type(exc).__name__}"))
    image_id = sha[:16]
    rel = _store(image, data, record, out_dir, image_id)
    gray = image.gray01()
    feats = image_features(gray, bit_depth=image.bit_depth, width=image.width, height=image.height)
    extra = record.extra
    return _Outcome(row={
        "image_id": image_id,
        "path": rel,
        "sha256": sha,
        "patient_id": pseudonymise(str(patient), opts.salt),
        "label": record.label,
        "label_index": label_index,
        "width": image.width,
        "height": image.height,
        "channels": image.channels,
        "bit_depth": image.bit_depth,
        **{name: feats[name] for name in FEATURE_COLUMNS},
        "phash": perceptual_hash(gray),
        "format": image.format,
        "source": opts.source,
        "source_split": record.source_split,
        "view_position": _clean(extra.get("view_position") or image.meta.get("view_position")),
        "sex": _clean(extra.get("sex")),
        "age_band": age_band(_to_float(extra.get("age"))),
        "modality": image.meta.get("modality") or opts.profile.modality,
        "manufacturer": image.meta.get("manufacturer"),
        "_qref": qref,
    })


def _check_image(image: DecodedImage, opts: IngestOptions) -> None:
    if image.channels == 3 and not opts.profile.allow_colour:
        raise BadImage("colour_image", "colour pixels where grayscale radiographs are expected")
    if min(image.width, image.height) < opts.min_size:
        raise BadImage("too_small", f"{image.width}x{image.height} below {opts.min_size} px")


def _check_label(label: str | None, classes: tuple[str, ...]) -> int:
    if not label:
        raise BadImage("missing_label", "no label for this file")
    if label not in classes:
        raise BadImage("unknown_label", f"label not in {list(classes)}")
    return classes.index(label)


def _store(image: DecodedImage, data: bytes, record: RawRecord, out_dir: Path, image_id: str) -> str:
    """Write the de-identified image; original bytes are linked only when they carry no metadata."""
    if image.format == "dicom" or _has_metadata(data, image.format):
        ext, payload = "png", encode_png(image)
    else:
        ext, payload = ("png" if image.format == "png" else "jpg"), None
    rel = f"{IMAGES_DIR}/{image_id[:2]}/{image_id}.{ext}"
    dest = out_dir / rel
    if dest.exists():
        return rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{id(record)}")
    if payload is not None:
        tmp.write_bytes(payload)
    else:
        try:
            os.link(record.path, tmp)
        except OSError:
            shutil.copyfile(record.path, tmp)
    os.replace(tmp, dest)
    return rel


_PNG_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf"}


def _has_metadata(data: bytes, fmt: str) -> bool:
    """True when a PNG has text/EXIF chunks or a JPEG has APPn (n>0) / comment segments."""
    if fmt == "png":
        pos = 8
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if kind in _PNG_TEXT_CHUNKS:
                return True
            if kind == b"IDAT":
                return False
            pos += 12 + length
        return False
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: header is over
            return False
        if 0xE1 <= marker <= 0xEF or marker == 0xFE:
            return True
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return False


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
    df = pd.read_parquet(manifest, columns=["patient_id", "label"])
    quarantined = sum(counts.values())
    if n_rows + quarantined != files_seen:
        raise RuntimeError(f"ingest accounting error: {n_rows} + {quarantined} != {files_seen}")
    return {
        "source": opts.source,
        "files_seen": files_seen,
        "ingested": n_rows,
        "quarantined": quarantined,
        "quarantine_reasons": counts,
        "patients": int(df["patient_id"].nunique()),
        "classes": list(opts.classes),
        "label_counts": {k: int(v) for k, v in Counter(df["label"]).most_common()},
        "manifest_sha256": _file_sha256(manifest),
        **extra,
    }


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
