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
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import MappedXraySource, RawRecord, list_files, require_dir
from pipeline.errors import SourceError

LAYOUT = "ROOT/**/<any name> DICOM files plus a label CSV (SOPInstanceUID or file, label)"
UID_COLUMNS = ("SOPInstanceUID", "sop_instance_uid", "sopinstanceuid")
FILE_COLUMNS = ("file", "filename", "file_name", "path", "image")
LABEL_COLUMNS = ("label", "Label", "class", "Class", "target", "Target")


class DicomFolderSource(MappedXraySource):
    name = "dicom"

    def read_labels(self, path: Path) -> tuple[dict[str, str], dict[str, str]]:
        """Raw labels keyed by file (relative path and bare name) and by SOPInstanceUID."""
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
            for row in reader:
                label = (row.get(label_col) or "").strip()
                if uid_col and (row.get(uid_col) or "").strip():
                    by_uid[row[uid_col].strip()] = label
                if file_col and (row.get(file_col) or "").strip():
                    name = row[file_col].strip().replace("\\", "/")
                    by_file[name] = label
        return by_file, by_uid

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        require_dir(root, LAYOUT)
        label_file = labels or root / "labels.csv"
        by_file, by_uid_raw = self.read_labels(label_file)
        by_uid = self._map_uid_labels(by_uid_raw)
        for path in list_files(root, self.notes.ignored):
            if path.resolve() == label_file.resolve():
                continue
            ref = path.relative_to(root).as_posix()
            raw = by_file.get(ref, by_file.get(path.name))
            label = self.label_map(raw) if raw else None
            if raw and label is None:
                self.notes.exclude(raw)
                continue
            yield RawRecord(path=path, ref=ref, label=label, patient_key=None, label_by_uid=by_uid)

    def _map_uid_labels(self, raw: dict[str, str]) -> dict[str, str]:
        """UID-keyed labels through the label map.

        A UID is known only once the file is read, so an unmapped label cannot be excluded
        before reading: it is kept raw and quarantined as ``unknown_label``.
        """
        return {uid: (self.label_map(label) or label) for uid, label in raw.items() if label}
