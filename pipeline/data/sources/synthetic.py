"""``synthetic``: the embedded default cohort (see :mod:`pipeline.data.synthetic`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import XRAY_PROFILE, RawRecord, list_files, read_csv, require_dir
from pipeline.data.synthetic import CohortSpec, generate_cohort

LAYOUT = ("ROOT/patients.csv (file,patient_id,label,view_position,sex,age[,site,manufacturer]) + "
          "ROOT/<LABEL>/*.png")


class SyntheticSource:
    name = "synthetic"
    profile = XRAY_PROFILE

    def __init__(self, spec: CohortSpec | None = None) -> None:
        self.spec = spec

    def prepare(self, root: Path) -> None:
        if self.spec is not None:
            generate_cohort(root, self.spec)

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        require_dir(root, LAYOUT, "Generate it with `xrayops data generate` (or `xrayops run`).")
        rows = {r["file"]: r for r in read_csv(labels or root / "patients.csv", ("file", "patient_id", "label"))}
        for path in list_files(root):
            if path.parent == root:
                continue  # patients.csv, cohort.json: metadata, not images
            ref = path.relative_to(root).as_posix()
            row = rows.get(ref, {})
            yield RawRecord(
                path=path,
                ref=ref,
                label=row.get("label") or None,
                patient_key=row.get("patient_id") or None,
                extra={k: row.get(k) or None for k in ("view_position", "sex", "age", "site", "manufacturer")},
            )
