"""``dicom``: any folder of DICOM files (e.g. a PACS export) plus a label CSV.

The label CSV (``data.labels`` / ``--labels``, default ``ROOT/labels.csv``) has a ``label``
column and a key column: ``SOPInstanceUID`` (matched against each file's header) or
``file`` (a path relative to ``ROOT``, or a bare file name). Labels go through
``data.label_maps.dicom`` (default: NORMAL/PNEUMONIA, 0/1). The patient id always comes
from the DICOM header (``PatientID``), is pseudonymised at ingestion, and a file without
one is quarantined (``missing_patient``). Files keyed by name whose label the map leaves
out are excluded and counted; UID-keyed ones are only known after reading and are
quarantined (``unknown_label``). Every file below ``ROOT`` except the label CSV is
a candidate whatever its suffix (PACS exports often have none); non-DICOM files are
quarantined, not skipped.

Matching the CSV with the files (``labels_csv`` in the summary): rows keyed by ``file`` are
matched before any file is read, so rows naming no file and files named by no row are counted
and diagnosed as in the other sources. Rows keyed by ``SOPInstanceUID`` can be matched only once
each file's header is read: with such rows, ``files_without_row`` is null (unknowable before
reading), ``files_not_named_by_file`` counts the files no ``file`` row names (each then either
matches a UID row or is quarantined as ``missing_label``: the per-file answer is in
``quarantine_reasons``), and UID rows naming no file are not counted. ``data.ingest.max_label_mismatches``
does not stop this source: its patient id always comes from the DICOM header, so a file without
a row cannot be given a patient of its own, only quarantined (``missing_label``); and a PACS
export holds files outside the label list (other modalities, DICOMDIR) that only their header
tells apart.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import (
    LabelCsvReport,
    LabelRows,
    MappedXraySource,
    RawRecord,
    list_files,
    normalise_key,
    require_dir,
)
from pipeline.errors import SourceError

LAYOUT = "ROOT/**/<any name> DICOM files plus a label CSV (SOPInstanceUID or file, label)"
UID_COLUMNS = ("SOPInstanceUID", "sop_instance_uid", "sopinstanceuid")
FILE_COLUMNS = ("file", "filename", "file_name", "path", "image")
LABEL_COLUMNS = ("label", "Label", "class", "Class", "target", "Target")


class DicomFolderSource(MappedXraySource):
    name = "dicom"

    def read_labels(self, path: Path, rows: LabelRows | None = None) -> tuple[dict[str, str], dict[str, str]]:
        """Raw labels keyed by file (relative path and bare name) and by SOPInstanceUID.

        ``rows`` (when given) receives the file-keyed rows, to match them with the files; the
        number of rows keyed by UID only is ``self.uid_rows``.
        """
        if not path.is_file():
            raise SourceError(f"label CSV {path} not found: the dicom source needs one "
                              "(columns: SOPInstanceUID or file, and label); pass --labels PATH.")
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            label_col = next((c for c in LABEL_COLUMNS if c in header), None)
            uid_col = next((c for c in UID_COLUMNS if c in header), None)
            file_col = next((c for c in FILE_COLUMNS if c in header), None)
            if label_col is None or (uid_col is None and file_col is None):
                raise SourceError(f"{path.name} must have a label column and a SOPInstanceUID or file column; "
                                  f"found {header}")
            by_file: dict[str, str] = {}
            by_uid: dict[str, str] = {}
            self.uid_rows = 0
            if rows is not None and file_col is not None:
                rows.key_column = file_col
            line = reader.line_num + 1
            for row in reader:
                label = (row.get(label_col) or "").strip()
                uid = (row.get(uid_col) or "").strip() if uid_col else ""
                name = normalise_key(row.get(file_col) or "") if file_col else ""
                if uid:
                    by_uid[uid] = label
                if name:
                    by_file[name] = label
                if rows is not None and (name or not uid):
                    rows.add(line, name, usable=bool(label))  # an empty key: a row that names nothing
                elif rows is not None:
                    self.uid_rows += 1
                line = reader.line_num + 1
        return by_file, by_uid

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        require_dir(root, LAYOUT)
        label_file = labels or root / "labels.csv"
        rows = LabelRows("file", "label")
        by_file, by_uid_raw = self.read_labels(label_file, rows)
        by_uid = self._map_uid_labels(by_uid_raw)
        for path in list_files(root, self.notes.ignored):
            if path.resolve() == label_file.resolve():
                continue
            ref = path.relative_to(root).as_posix()
            rows.find(ref, ref, path.name)  # counts a file no file row names
            raw = by_file.get(ref, by_file.get(path.name))
            label = self.label_map(raw) if raw else None
            if raw and label is None:
                self.notes.exclude(raw)
                continue
            yield RawRecord(path=path, ref=ref, label=label, patient_key=None, label_by_uid=by_uid)
        self.notes.set_labels_csv(self._report(rows))

    def _report(self, rows: LabelRows) -> LabelCsvReport:
        """The ``labels_csv`` counts: exact for ``file`` rows; files left to UID rows are counted, not judged."""
        uid_rows = self.uid_rows
        report = rows.report(
            consequence="are quarantined (missing_label) unless a SOPInstanceUID row labels them",
            expected="by its path relative to the input folder or its bare file name (or use a SOPInstanceUID column)",
            enforced=False, files_without_row_known=not uid_rows,
            extra={"rows_by_uid": uid_rows} if uid_rows else None,
            note=("files_without_row is null: rows keyed by SOPInstanceUID match a file only once its header is "
                  "read; files_not_named_by_file of them rely on a UID row, and those without one are quarantined "
                  "as missing_label; UID rows naming no file are not counted") if uid_rows else None)
        report.rows += uid_rows
        if uid_rows:
            report.extra["files_not_named_by_file"] = rows.files_without_row
        return report

    def _map_uid_labels(self, raw: dict[str, str]) -> dict[str, str]:
        """UID-keyed labels through the label map.

        A UID is known only once the file is read, so an unmapped label cannot be excluded
        before reading: it is kept raw and quarantined as ``unknown_label``.
        """
        return {uid: (self.label_map(label) or label) for uid, label in raw.items() if label}
