"""The one interface every dataset source implements.

A source turns a raw dataset folder (in its native layout) into a stream of
:class:`RawRecord`. Records may carry raw identifiers (file names, patient ids):
they exist only in memory between the source and ingestion, which pseudonymises
them, and must never be logged.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import SourceError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
XRAY_CLASSES = ("NORMAL", "PNEUMONIA")


@dataclass(frozen=True)
class SourceProfile:
    """What a source's data looks like; fills ``null`` config fields."""

    classes: tuple[str, ...]
    positive_class: str | None
    min_size: int
    size_range: tuple[int, int]
    allow_colour: bool = False
    modality: str = "CXR"


# Radiograph sources: smallest accepted side 32 px (a tiny thumbnail is not a radiograph,
# but small research exports and test fixtures of 32-64 px must still ingest).
XRAY_PROFILE = SourceProfile(classes=XRAY_CLASSES, positive_class="PNEUMONIA", min_size=32, size_range=(32, 16384))


@dataclass
class RawRecord:
    """One candidate image as the source sees it (may hold PHI; in memory only).

    Attributes:
        path: absolute path of the file to read.
        ref: path relative to the raw root (may contain identifiers; never stored as is).
        label: class name, or None when unknown (quarantined as ``missing_label``).
        patient_key: raw patient identifier; None → taken from the DICOM header, else the file.
        source_split: the split the source shipped the file in (recorded, never used for our split).
        extra: optional slice fields: view_position, sex, age.
        label_by_uid: labels keyed by DICOM SOPInstanceUID, used when ``label`` is None (the
            ``dicom`` source's CSV may be keyed by UID, known only once the header is read).
    """

    path: Path
    ref: str
    label: str | None
    patient_key: str | None = None
    source_split: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
    label_by_uid: Mapping[str, str] | None = None


class Source(Protocol):
    """A dataset source."""

    name: str
    profile: SourceProfile

    def prepare(self, root: Path) -> None:
        """Materialise the raw data under ``root`` when the source can (no-op otherwise)."""

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        """Yield every file of the dataset (bad ones too: ingestion quarantines them).

        Files whose label the source's label mapping excludes are *not* yielded; the source
        counts them (see :class:`SourceNotes`), so nothing is lost silently.
        """


class SourceNotes:
    """What a source skipped on purpose while listing records (counts only, no names).

    Attributes:
        excluded: images whose label the label mapping excludes, by raw label (NIH: by finding).
        excluded_images: number of images excluded by the label mapping.
        ignored: other files left out on purpose, by kind (metadata files, unlabelled test sets, ...).
        label_rows_without_file: rows of the label file whose image is not in the folder.
    """

    def __init__(self) -> None:
        self.excluded: Counter[str] = Counter()
        self.excluded_images = 0
        self.ignored: Counter[str] = Counter()
        self.label_rows_without_file = 0

    def exclude(self, *raw_labels: str) -> None:
        self.excluded_images += 1
        self.excluded.update(raw_labels or ("<empty>",))

    def to_dict(self) -> dict[str, Any]:
        return {
            "excluded_by_label_mapping": self.excluded_images,
            "excluded_labels": dict(sorted(self.excluded.items())),
            "ignored_files": {k: v for k, v in sorted(self.ignored.items()) if v},
            "label_rows_without_file": self.label_rows_without_file,
        }


class LabelMap:
    """Raw source label → class name; ``None`` for labels the mapping leaves out.

    Matching is exact first, then case-insensitive. With no mapping every label is kept as is.
    """

    def __init__(self, mapping: Mapping[str, str] | None) -> None:
        self.mapping = dict(mapping or {})
        self._folded = {str(k).strip().casefold(): v for k, v in self.mapping.items()}

    def __call__(self, raw: str) -> str | None:
        raw = raw.strip()
        if not self.mapping:
            return raw
        if raw in self.mapping:
            return self.mapping[raw]
        return self._folded.get(raw.casefold())


class MappedXraySource:
    """Base of the public X-ray sources: labels go through a :class:`LabelMap`, exclusions are
    counted in :class:`SourceNotes`, and there is nothing to materialise (the data is the user's)."""

    name = "x-ray"
    profile = XRAY_PROFILE

    def __init__(self, label_map: Mapping[str, str] | None = None) -> None:
        self.label_map = LabelMap(label_map)
        self.notes = SourceNotes()

    def prepare(self, root: Path) -> None:
        return None


def require_dir(root: Path, layout: str, hint: str = "") -> None:
    """Raise a :class:`SourceError` naming ``root`` and the expected layout when it is missing."""
    if not root.is_dir():
        raise SourceError(
            f"dataset folder {root} does not exist. Expected layout: {layout}. "
            + (hint or "Set data.input to the folder (e.g. --set data.input=/path/to/data).")
        )


def list_files(folder: Path, ignored: Counter[str] | None = None) -> list[Path]:
    """Regular files below ``folder``, sorted (deterministic order).

    Hidden files and files in hidden folders (``.DS_Store``, ``._*`` AppleDouble files,
    ``.ipynb_checkpoints/``, ``.git/``) are left out, and counted under ``hidden_files`` in
    ``ignored`` (the ingest summary's ``ignored_files``) so that nothing is dropped silently.
    """
    files: list[Path] = []
    hidden = 0
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            hidden += 1
        else:
            files.append(p)
    if ignored is not None and hidden:
        ignored["hidden_files"] += hidden
    return sorted(files)


def read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Read a CSV, checking its header has ``required`` columns."""
    if not path.is_file():
        raise SourceError(f"label file {path} does not exist (set data.labels=PATH)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SourceError(
                f"{path.name} lacks column(s) {missing}; found {reader.fieldnames}. "
                f"Expected a header with {list(required)}."
            )
        return list(reader)
