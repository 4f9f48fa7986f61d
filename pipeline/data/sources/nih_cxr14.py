"""``nih-cxr14``: NIH ChestX-ray14 — an image folder plus ``Data_Entry_2017.csv``.

The CSV (``data.labels``, default ``ROOT/Data_Entry_2017*.csv``) has ``Image Index``,
``Finding Labels`` (pipe-separated), ``Patient ID``, ``Patient Age``, ``Patient Gender`` and
``View Position``. Images may sit anywhere below ``ROOT`` (the download spreads them over
``images_001/images/`` … ``images_012/images/``).

Labels: ``data.label_maps.nih-cxr14`` maps findings to classes (default ``Pneumonia`` →
PNEUMONIA, ``No Finding`` → NORMAL). An image takes the class its mapped findings agree on
(``Pneumonia|Effusion`` → PNEUMONIA); images with no mapped finding, or findings mapped to
two classes, are excluded and counted per finding (``excluded_labels``), never read.
View position, age and sex are kept for slicing. ``train_val_list.txt`` / ``test_list.txt``,
when present, give ``source_split`` (recorded, never used by our split).

Rows name images by their bare file name. Rows without an image (a partial download) and
images without a row (or with an empty ``Patient ID``) are counted in the summary
(``labels_csv``); such an image has no label or patient and is quarantined, and
ingestion stops when there are more than ``data.ingest.max_label_mismatches`` of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    LabelRows,
    MappedXraySource,
    RawRecord,
    list_files,
    normalise_key,
    read_csv_lines,
    require_dir,
)
from pipeline.errors import SourceError

LAYOUT = "ROOT/**/<Image Index>.png plus ROOT/Data_Entry_2017.csv (or --labels CSV)"
COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
SPLIT_LISTS = {"train_val_list.txt": "train_val", "test_list.txt": "test"}


def find_label_file(root: Path, labels: Path | None) -> Path:
    if labels is not None:
        return labels
    found = sorted(root.glob("Data_Entry_2017*.csv")) or sorted(root.glob("Data_Entry*.csv"))
    if not found:
        raise SourceError(f"no Data_Entry_2017.csv in {root}. Expected layout: {LAYOUT}; "
                          "pass the CSV with --labels PATH (or data.labels).")
    return found[0]


class NihCxr14Source(MappedXraySource):
    name = "nih-cxr14"

    def classify(self, findings: str) -> tuple[str | None, list[str]]:
        """Class of a ``Finding Labels`` value (None = excluded) and its individual findings."""
        parts = [f.strip() for f in findings.split("|") if f.strip()]
        mapped = {m for m in (self.label_map(f) for f in parts) if m is not None}
        return (mapped.pop() if len(mapped) == 1 else None), parts

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        require_dir(root, LAYOUT)
        label_file = find_label_file(root, labels)
        index = LabelRows("Image Index", "Patient ID")
        rows: dict[str, dict[str, str]] = {}
        for line, r in read_csv_lines(label_file, COLUMNS):
            key = index.add(line, r["Image Index"], usable=bool((r.get("Patient ID") or "").strip()))
            if key:
                rows[key] = r
        shipped = _shipped_splits(root)
        for path in list_files(root, self.notes.ignored):
            if path == label_file or (path.parent == root and path.suffix.lower() not in (*IMAGE_SUFFIXES,
                                                                                          *DICOM_SUFFIXES)):
                self.notes.ignored["metadata_files"] += 1
                continue
            index.find(path.relative_to(root).as_posix(), path.name)  # counts a file without a usable row
            row = rows.get(normalise_key(path.name))
            label = None
            if row is not None:
                label, findings = self.classify(row.get("Finding Labels") or "")
                if label is None and findings:
                    self.notes.exclude(*findings)
                    continue
            row = row or {}
            yield RawRecord(
                path=path,
                ref=path.relative_to(root).as_posix(),
                label=label,
                patient_key=(row.get("Patient ID") or "").strip() or None,
                source_split=shipped.get(path.name),
                extra={"view_position": row.get("View Position"), "sex": row.get("Patient Gender"),
                       "age": row.get("Patient Age")},
            )
        self.notes.set_labels_csv(index.report(
            consequence="have no label or no patient id and are quarantined (missing_label / missing_patient)",
            expected="by its bare file name, as in Data_Entry_2017.csv (e.g. 00000001_000.png)"))


def _shipped_splits(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, split in SPLIT_LISTS.items():
        path = root / name
        if path.is_file():
            out.update({line.strip(): split for line in path.read_text().splitlines() if line.strip()})
    return out
