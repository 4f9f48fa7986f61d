"""The per-file work of ingestion: read, hash, decode, check, store, describe one file.

Kept apart from :mod:`pipeline.data.manifest` (which writes Parquet) so that process
workers do not import pandas or pyarrow (NumPy, Pillow, and the sources package with
its config models; pydicom on the first DICOM file):
``read_one`` runs in worker processes, threads or Dask workers alike and returns a
picklable :class:`ReadOutcome`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.deid import age_band, pseudonymise
from pipeline.data.features import IMAGE_FEATURES, describe
from pipeline.data.image_store import store_image
from pipeline.data.imaging import PNG_INFLATERS, DecodedImage, decode_bytes
from pipeline.data.policy import AdmissionPolicy, OutOfPolicy
from pipeline.data.quarantine import QuarantineEntry, quarantine_ref
from pipeline.data.sources.base import RawRecord, SourceProfile
from pipeline.errors import BadImage

FEATURE_COLUMNS = [f for f in IMAGE_FEATURES if f not in ("width", "height", "bit_depth")]


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
    executor: str = "auto"  # pipeline.data.parallel: auto | process | thread
    png_inflate: str = "isal"  # pipeline.data.png_inflate: isal | pillow
    policy: AdmissionPolicy | None = None  # data.admission: which DICOM files are admitted (None: any)

    def __post_init__(self) -> None:  # a wrong value would otherwise quarantine every PNG as decode_error
        if self.png_inflate not in PNG_INFLATERS:
            raise ValueError(f"png_inflate must be one of {PNG_INFLATERS}, not {self.png_inflate!r}")


@dataclass
class ReadOutcome:
    """A manifest row (accepted file), a quarantine entry (unusable file) or an exclusion (a valid
    file outside the admission policy, e.g. a CT: listed in ``excluded.csv``)."""

    row: dict[str, Any] | None = None
    quarantine: QuarantineEntry | None = None
    excluded: QuarantineEntry | None = None


def read_one(record: RawRecord, out_dir: Path, opts: IngestOptions) -> ReadOutcome:
    """Read, hash, decode and check one file; store its de-identified copy and describe it."""
    qref = quarantine_ref(record.ref, opts.salt)
    try:
        size = record.path.stat().st_size
        if size > opts.max_bytes:
            raise BadImage("too_large_file", f"{size} bytes > {opts.max_bytes}")
        data = record.path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        image = _decode(data, opts)
        _check_view(record, opts)
        _check_image(image, opts)
        label = record.label
        if not label and record.label_by_uid:
            label = record.label_by_uid.get(image.identifiers.get("sop_instance_uid", "")) or None
        label_index = _check_label(label, opts.classes)
        patient = record.patient_key or image.identifiers.get("patient_id") or None
        if not patient:
            raise BadImage("missing_patient", "no patient id in the label file or the DICOM header")
    except OutOfPolicy as exc:
        return ReadOutcome(excluded=QuarantineEntry(qref, exc.reason, exc.detail))
    except BadImage as exc:
        return ReadOutcome(quarantine=QuarantineEntry(qref, exc.reason, exc.detail))
    except OSError as exc:
        detail = f"unreadable: {exc.strerror or type(exc).__name__}"
        return ReadOutcome(quarantine=QuarantineEntry(qref, "truncated", detail))
    image_id = sha[:16]
    rel = store_image(image, data, record, out_dir, image_id)
    return ReadOutcome(row={**_row(image, record, opts, label, label_index, patient), "image_id": image_id,
                            "path": rel, "sha256": sha, "_qref": qref})


def _row(image: DecodedImage, record: RawRecord, opts: IngestOptions, label: str, label_index: int,
         patient: str) -> dict[str, Any]:
    """Manifest fields of one accepted image (pseudonymised patient, features, PHI-free header fields)."""
    # one downscaled view serves the features and the pHash; serving reaches the same code from
    # gray01() (pipeline.data.features.describe), so production features compare exactly
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
        "site": _clean(extra.get("site")),
        "sex": _clean(extra.get("sex")),
        "age_band": age_band(_to_float(extra.get("age"))),
        "modality": image.meta.get("modality") or opts.profile.modality,
        "manufacturer": image.meta.get("manufacturer") or _clean(extra.get("manufacturer")),
        "photometric": image.meta.get("photometric"),
    }


def _decode(data: bytes, opts: IngestOptions) -> DecodedImage:
    """Decode; an unexpected decoder exception on odd input quarantines the file instead of
    stopping the whole ingestion (the detail names its type only: messages may quote file
    content; ingestion logs it in the parent process)."""
    try:
        return decode_bytes(data, max_pixels=opts.max_pixels, dicom_bit_depth=opts.dicom_bit_depth,
                            png_inflate=opts.png_inflate, dicom_policy=opts.policy)
    except BadImage:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party decoders raise anything on hostile input
        raise BadImage("decode_error", f"{type(exc).__name__} while decoding") from None


def _check_view(record: RawRecord, opts: IngestOptions) -> None:
    """A view the source's CSV declares (PNG/JPEG sources) is judged like a DICOM header's ViewPosition."""
    view = _clean(record.extra.get("view_position"))
    if opts.policy is not None and view:  # absent: nothing declared, the DICOM header (if any) decides
        opts.policy.check_view(view, "view_position in the labels CSV")


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
