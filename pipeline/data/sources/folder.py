"""``folder``: a generic ``ROOT/<label>/*.png|jpg|jpeg`` tree (the seed notebook's ``dataset/train``).

Without a mapping CSV every image is its own patient (the only safe assumption);
``data.labels`` may name a CSV with ``file,patient_id`` (and optional
``view_position,sex,age``) to group images by patient.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import (
    XRAY_PROFILE,
    RawRecord,
    SourceNotes,
    SourceProfile,
    list_files,
    read_csv,
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
        mapping = {r["file"]: r for r in read_csv(labels, ("file", "patient_id"))} if labels else {}
        for path in list_files(root, self.notes.ignored):
            if path.parent == root:
                continue
            ref = path.relative_to(root).as_posix()
            row = mapping.get(ref) or mapping.get(path.name) or {}
            yield RawRecord(
                path=path,
                ref=ref,
                label=ref.split("/", 1)[0],
                patient_key=row.get("patient_id") or ref,
                extra={k: row.get(k) or None for k in ("view_position", "sex", "age")},
            )
