"""Quarantine: every file that cannot be used is recorded with a reason, never silently dropped.

``quarantine.csv`` holds ``path,reason,detail``. ``path`` is a de-identified reference to the
original file (a salted hash of its path relative to the raw root, plus its suffix): original
file names often carry patient identifiers, so they never leave the reader. An authorised
user resolves the references back to files with ``xrayops quarantine locate``.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.data.deid import pseudonymise

QUARANTINE_FILE = "quarantine.csv"
COLUMNS = ("path", "reason", "detail")

REASONS = {
    "empty_file": "the file has 0 bytes",
    "too_large_file": "the file exceeds data.ingest.max_bytes",
    "not_an_image": "content is not PNG, JPEG or DICOM",
    "truncated": "the file is cut short or corrupt",
    "decompression_bomb": "width*height exceeds data.ingest.max_pixels",
    "unsupported_mode": "pixel format not supported (e.g. CMYK, float, multi-frame)",
    "colour_image": "a colour photograph where grayscale radiographs are expected",
    "too_small": "an image side is below data.ingest.min_size",
    "too_large_image": "an image side exceeds the source's largest size (validation's size range), or a DICOM "
                       "header promises more than data.ingest.max_pixels (refused before any pixel is read)",
    "dicom_no_pixels": "DICOM file without pixel data",
    "not_dicom": "DICOM signature, but the header does not parse",
    "no_decoder": "DICOM transfer syntax without an installed decoder (detail: the syntax and the package to install)",
    "corrupt_pixel_data": "the decoder failed on the DICOM pixel data, or its codestream contradicts the header",
    "decode_error": "the decoder failed unexpectedly on this file (detail names the error type)",
    "missing_label": "no label for this file",
    "unknown_label": "label not in data.classes",
    "missing_patient": "no patient identifier for this file",
    "duplicate_image": "identical bytes already ingested (kept the first)",
    "conflicting_labels": "identical bytes carry different labels",
}


@dataclass(frozen=True)
class QuarantineEntry:
    path: str
    reason: str
    detail: str


def quarantine_ref(ref: str, salt: bytes) -> str:
    """De-identified, stable reference for an original relative path."""
    return pseudonymise(ref, salt, prefix="q") + PurePosixPath(ref).suffix.lower()


class QuarantineWriter:
    """Append-only ``quarantine.csv`` writer that counts reasons (``reasons``: the allowed codes;
    :data:`pipeline.data.policy.POLICY_REASONS` for ``excluded.csv``)."""

    def __init__(self, path: Path, reasons: Mapping[str, str] = REASONS) -> None:
        self.path = path
        self.reasons = reasons
        self.counts: Counter[str] = Counter()
        self._fh = open(path, "w", newline="")
        self._writer = csv.writer(self._fh)
        self._writer.writerow(COLUMNS)

    def add(self, entry: QuarantineEntry) -> None:
        if entry.reason not in self.reasons:
            raise ValueError(f"unknown reason {entry.reason!r} for {self.path.name}")
        self._writer.writerow((entry.path, entry.reason, entry.detail))
        self.counts[entry.reason] += 1

    def extend(self, entries: Iterable[QuarantineEntry]) -> None:
        for entry in entries:
            self.add(entry)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> QuarantineWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_quarantine(dataset_dir: Path) -> list[QuarantineEntry]:
    path = dataset_dir / QUARANTINE_FILE
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [QuarantineEntry(r["path"], r["reason"], r["detail"]) for r in csv.DictReader(fh)]


def locate(dataset_dir: Path, raw_root: Path, salt: bytes) -> dict[str, Path]:
    """Map quarantine references back to files under ``raw_root`` (needs the salt)."""
    wanted = {e.path for e in read_quarantine(dataset_dir)}
    found: dict[str, Path] = {}
    for path in raw_root.rglob("*"):
        if path.is_file():
            ref = quarantine_ref(path.relative_to(raw_root).as_posix(), salt)
            if ref in wanted:
                found[ref] = path
    return found
