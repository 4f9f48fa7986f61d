"""``folder``: a generic ``ROOT/<label>/*.png|jpg|jpeg`` tree (the seed notebook's ``dataset/train``).

Without a mapping CSV every image is its own patient (the only safe assumption);
``data.labels`` may name a CSV with ``file,patient_id`` (and optional
``view_position,sex,age``) to group images by patient. ``file`` is the path relative to
``ROOT`` (``NORMAL/img1.png``; ``\\`` separators and a leading ``./`` are accepted) or the bare
file name. With a CSV, the rows without a file and the files without a row (or with an empty
``patient_id``) are counted in the summary (``labels_csv``): such a file would be its own
patient, so ingestion stops when there are more than ``data.ingest.max_label_mismatches``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import (
    XRAY_PROFILE,
    LabelRows,
    RawRecord,
    SourceNotes,
    SourceProfile,
    list_files,
    read_csv_lines,
    require_dir,
)
from pipeline.errors import SourceError

LAYOUT = "ROOT/<label>/<image>.png|jpg|jpeg, one sub-folder per class (e.g. ROOT/NORMAL, ROOT/PNEUMONIA)"


class FolderSource:
    name = "folder"

    def __init__(self, profile: SourceProfile | None = None) -> None:
        self.profile = profile or XRAY_PROFILE
        self.notes = SourceNotes()

    def prepare(self, root: Path) -> None:
        return None

    def class_folders(self, root: Path) -> list[str]:
        require_dir(root, LAYOUT)
        labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not labels:
            raise SourceError(f"{root} has no class sub-folders. Expected layout: {LAYOUT}")
        return labels

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        self.class_folders(root)
        rows = LabelRows("file", "patient_id")
        mapping: dict[str, dict[str, str]] = {}
        for line, row in read_csv_lines(labels, ("file", "patient_id")) if labels else []:
            usable = bool((row.get("patient_id") or "").strip())
            key = rows.add(line, row.get("file"), usable=usable)
            if key and usable:
                mapping[key] = row  # the last usable row of a file wins (as before)
        for path in list_files(root, self.notes.ignored):
            if path.parent == root:
                continue
            ref = path.relative_to(root).as_posix()
            key = rows.find(ref, ref, path.name, where=f" in class folder {ref.split('/', 1)[0]}") if labels else None
            row = mapping[key] if key else {}
            yield RawRecord(
                path=path,
                ref=ref,
                label=ref.split("/", 1)[0],
                patient_key=row["patient_id"] if key else ref,
                extra={k: row.get(k) or None for k in ("view_position", "sex", "age")},
            )
        if labels:
            self.notes.set_labels_csv(rows.report(
                consequence="become one patient each (their patient's other images may land in another split)",
                expected="by its path relative to the input folder (e.g. NORMAL/img1.png) or its bare file name"))
