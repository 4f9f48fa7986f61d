"""``kaggle-pneumonia``: the "Chest X-Ray Images (Pneumonia)" layout.

Layout: ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``; the input may be the
folder holding ``chest_xray/`` or ``chest_xray/`` itself (the Kaggle zip also nests a second
``chest_xray/chest_xray`` copy and ``__MACOSX`` debris: the shallowest copy is used).

The shipped train/val/test folders are recorded as ``source_split`` and ignored by our
split: they are not patient-disjoint (one patient can sit in train and test) and val holds
16 images. Patient ids come from file names:

- ``person1_bacteria_1.jpeg``, ``person1_virus_6.jpeg`` → ``person1``
- ``IM-0115-0001.jpeg`` → ``IM-0115``; ``NORMAL2-IM-0588-0001.jpeg`` → ``NORMAL2-IM-0588``

A name matching neither pattern has no patient id and is quarantined (``missing_patient``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import MappedXraySource, RawRecord, list_files, require_dir
from pipeline.errors import SourceError

LAYOUT = "chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (pass chest_xray/ or the folder holding it)"
SPLITS = ("train", "val", "test")
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^((?:[a-z0-9]+-)?IM-\d+)-\d+", re.IGNORECASE),
)


def patient_from_name(name: str) -> str | None:
    """Patient id encoded in a Kaggle file name, or None when the name follows no known pattern."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            key = match.group(1)
            return key.lower() if key.lower().startswith("person") else key.upper()
    return None


def find_dataset_root(root: Path) -> Path:
    """``chest_xray/`` itself: the shallowest folder below ``root`` that holds a split folder."""
    require_dir(root, LAYOUT)
    frontier = [root]
    for _ in range(4):
        for folder in frontier:
            if _split_dirs(folder):
                return folder
        frontier = [c for f in frontier for c in sorted(f.iterdir())
                    if c.is_dir() and not c.name.startswith((".", "__MACOSX"))]
    raise SourceError(f"{root} holds no train/val/test folder. Expected layout: {LAYOUT}")


def _split_dirs(folder: Path) -> list[Path]:
    return [c for c in sorted(folder.iterdir()) if c.is_dir() and c.name.lower() in SPLITS]


class KagglePneumoniaSource(MappedXraySource):
    name = "kaggle-pneumonia"

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        base = find_dataset_root(root)
        self.notes.ignored["outside_split_folders"] += sum(
            1 for p in base.iterdir() if p.is_file() and not p.name.startswith("."))
        for split_dir in _split_dirs(base):
            for path in list_files(split_dir, self.notes.ignored):
                parts = path.relative_to(split_dir).parts
                if "__MACOSX" in parts:
                    self.notes.ignored["macos_metadata"] += 1
                    continue
                raw_label = parts[0] if len(parts) > 1 else None
                label = self.label_map(raw_label) if raw_label else None
                if raw_label and label is None:
                    self.notes.exclude(raw_label)
                    continue
                yield RawRecord(
                    path=path,
                    ref=path.relative_to(base).as_posix(),
                    label=label,
                    patient_key=patient_from_name(path.name),
                    source_split=split_dir.name.lower(),
                )
