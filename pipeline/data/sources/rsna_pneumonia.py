"""``rsna-pneumonia``: RSNA Pneumonia Detection Challenge — ``<patientId>.dcm`` + ``stage_2_train_labels.csv``.

The label file (``data.labels``, default ``ROOT/stage_2_train_labels.csv``) has
``patientId,x,y,width,height,Target`` with one row per box, so several rows per image;
an image's label is the maximum ``Target`` over its rows, mapped by
``data.label_maps.rsna-pneumonia`` (default 1 → PNEUMONIA, 0 → NORMAL). The patient id is
the ``patientId`` (the file stem), pseudonymised at ingestion. DICOM files may sit in
``ROOT/stage_2_train_images/`` or anywhere below ``ROOT``; the unlabelled
``stage_2_test_images/`` folder is left out and counted (``ignored_files``).

Rows without an image and images without a row (or whose rows all have an empty ``Target``)
are counted in the summary (``labels_csv``); such an image has no label and is quarantined
(``missing_label``), and ingestion stops when there are more than
``data.ingest.max_label_mismatches`` of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import LabelRows, MappedXraySource, RawRecord, list_files, read_csv_lines, require_dir
from pipeline.errors import SourceError

LAYOUT = "ROOT/stage_2_train_images/<patientId>.dcm plus ROOT/stage_2_train_labels.csv (or --labels CSV)"
COLUMNS = ("patientId", "Target")
TEST_FOLDER = "stage_2_test_images"


def image_targets(label_file: Path) -> dict[str, str]:
    """``patientId`` → maximum ``Target`` over its rows (as text: "0", "1", or the raw value)."""
    return read_targets(label_file)[0]


def read_targets(label_file: Path) -> tuple[dict[str, str], LabelRows]:
    """:func:`image_targets` and the CSV's rows by ``patientId`` (to match them with the files)."""
    best: dict[str, str] = {}
    rows = LabelRows("patientId", "Target")
    for line, row in read_csv_lines(label_file, COLUMNS):
        target = (row["Target"] or "").strip()
        key = rows.add(line, row["patientId"], usable=bool(target))
        if not key or not target:
            continue
        previous = best.get(key)
        best[key] = target if previous is None else max(previous, target, key=_as_number)
    return best, rows


def _as_number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("-inf")


class RsnaPneumoniaSource(MappedXraySource):
    name = "rsna-pneumonia"

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        require_dir(root, LAYOUT)
        label_file = labels or root / "stage_2_train_labels.csv"
        if not label_file.is_file():
            raise SourceError(f"label file {label_file} not found. Expected layout: {LAYOUT}")
        targets, rows = read_targets(label_file)
        for path in list_files(root, self.notes.ignored):
            rel = path.relative_to(root)
            if path == label_file or (path.parent == root and path.suffix.lower() in (".csv", ".txt", ".md")):
                self.notes.ignored["metadata_files"] += 1
                continue
            if rel.parts[0] == TEST_FOLDER:
                self.notes.ignored["unlabelled_test_images"] += 1
                continue
            key = path.stem if path.suffix.lower() in (".dcm", ".dicom") else path.name
            rows.find(rel.as_posix(), key)  # counts a file without a usable row
            target = targets.get(key.strip())
            label = None
            if target is not None:
                label = self.label_map(target)
                if label is None:
                    self.notes.exclude(f"Target={target}")
                    continue
            yield RawRecord(path=path, ref=rel.as_posix(), label=label, patient_key=key)
        self.notes.set_labels_csv(rows.report(
            consequence="have no label and are quarantined (missing_label)",
            expected="by the file name without .dcm (stage_2_train_images/<patientId>.dcm)"))
