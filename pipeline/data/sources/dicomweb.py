"""``dicomweb``: training data pulled from a PACS over DICOMweb, plus a labels CSV.

``prepare`` (the pull) lists every instance of the studies ``data.dicomweb.study_filter`` matches
(QIDO-RS, paged) and fetches each one not yet in the local pull cache (WADO-RS, one instance at a
time, the stored bytes unchanged) into the raw folder (``data.input``, default
``<data_dir>/raw/dicomweb``)::

    ROOT/<StudyInstanceUID>/<SOPInstanceUID>.dcm   one file per instance (written atomically)
    ROOT/instances.csv                             the instances of the last complete pull

A file is written under a temporary name and renamed into place once complete, so after a crash
or a PACS outage mid-pull the rerun fetches only the instances that are missing. Memory holds the
list of UIDs and one instance at a time, never a study's pixel data.

``records`` then hands each pulled file to ingestion exactly as the ``dicom`` folder source does
(same reader, admission policy, de-identification, quarantine and accounting): the label comes
from the CSV row keyed by the instance's ``SOPInstanceUID``, else by its ``StudyInstanceUID``
(every instance of the study), through ``data.label_maps.dicomweb``; the patient id always comes
from the DICOM header and is pseudonymised. As in the ``dicom`` source, labels are matched to the
header's SOPInstanceUID when the file is read: an instance without a row is quarantined
(``missing_label``), a label outside the map as ``unknown_label``; ``data.ingest.max_label_mismatches``
does not stop this source (a file without a row cannot be given a patient of its own). The
``labels_csv`` counts are exact: both UIDs are known from the PACS listing before any file is read.

The raw folder holds the PACS's files as they are (PHI included), like any DICOM export: keep it
where the hospital's data may be kept. Nothing identifying leaves it but through ingestion.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.data.progress import progress_bar
from pipeline.data.sources.base import LabelRows, MappedXraySource, RawRecord, SourceNotes, read_csv_lines
from pipeline.data.sources.dicom_folder import LABEL_COLUMNS, UID_COLUMNS
from pipeline.durable import write_atomic
from pipeline.errors import SourceError

logger = logging.getLogger(__name__)

INSTANCES_FILE = "instances.csv"
INSTANCE_COLUMNS = ("study_uid", "series_uid", "sop_uid")
STUDY_COLUMNS = ("StudyInstanceUID", "study_instance_uid", "studyinstanceuid")
TEMP_SUFFIX = ".part"


class PullNotes(SourceNotes):
    """:class:`SourceNotes` plus what was pulled (counts and filter keys only: values may identify)."""

    def __init__(self) -> None:
        super().__init__()
        self.pull: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **({"dicomweb": self.pull} if self.pull is not None else {})}


class DicomwebSource(MappedXraySource):
    """Pull from a PACS (``prepare``), then ingest the pulled files (``records``)."""

    name = "dicomweb"

    def __init__(self, cfg: Any, label_map: Mapping[str, str] | None = None, *, show_progress: bool | None = None,
                 client_factory: Any = None) -> None:
        """
        Args:
            cfg: the ``data.dicomweb`` section (:class:`pipeline.config.DicomwebSection`).
            label_map: raw label → class (``data.label_maps.dicomweb``).
            show_progress: draw the pull's progress bar (default: when stdout is a terminal, as ingest's).
            client_factory: ``cfg -> PacsClient`` (default :meth:`PacsClient.from_config`).
        """
        super().__init__(label_map)
        self.cfg = cfg
        self.notes: PullNotes = PullNotes()
        self.show_progress = sys.stdout.isatty() if show_progress is None else show_progress
        self._client_factory = client_factory

    def client(self) -> Any:
        from pipeline.pacs.dicomweb import PacsClient

        return (self._client_factory or PacsClient.from_config)(self.cfg)

    # ----------------------------------------------------------------------- pull

    def prepare(self, root: Path) -> dict[str, int]:
        """Pull every instance the study filter matches into ``root`` (only those not cached yet).

        Returns counts: ``instances``, ``fetched``, ``cached``, ``bytes_fetched``.

        Raises:
            PacsUnavailable, PacsError: the PACS cannot be reached or refused (nothing half-written stays:
                files already pulled are kept for the rerun).
            ConfigError: no URL, incomplete credentials.
        """
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"*/.*{TEMP_SUFFIX}"):  # a crashed pull's partial files (we hold the raw lock)
            stale.unlink(missing_ok=True)
        started = time.monotonic()
        with self.client() as client:
            refs = list(client.iter_instances(self.cfg.study_filter))
            counts = {"instances": len(refs), "fetched": 0, "cached": 0, "bytes_fetched": 0}
            with progress_bar(len(refs), "pull", self.show_progress) as advance:
                for ref in refs:
                    dest = cache_path(root, ref.study_uid, ref.sop_uid)
                    if dest.is_file() and dest.stat().st_size > 0:
                        counts["cached"] += 1
                    else:
                        data = client.retrieve_instance_bytes(ref.study_uid, ref.series_uid, ref.sop_uid)
                        write_atomic(dest, data, temp_suffix=TEMP_SUFFIX)
                        counts["fetched"] += 1
                        counts["bytes_fetched"] += len(data)
                    if advance:
                        advance(1)
        write_instances(root, [(r.study_uid, r.series_uid, r.sop_uid) for r in refs])
        seconds = time.monotonic() - started
        logger.info("pulled %d instance(s) from the PACS at %s: %d fetched (%.1f MB), %d already in the pull cache "
                    "(%.1f s)", counts["instances"], client.masked_url, counts["fetched"],
                    counts["bytes_fetched"] / 1e6, counts["cached"], seconds)
        if not refs:
            logger.warning("the PACS at %s has no instance in the studies data.dicomweb.study_filter matches "
                           "(filter keys: %s)", client.masked_url, ", ".join(sorted(self.cfg.study_filter)) or "none")
        return counts

    # ----------------------------------------------------------------------- records

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        instances = read_instances(root)
        if labels is None:
            raise SourceError("the dicomweb source needs a labels CSV (columns: SOPInstanceUID or StudyInstanceUID, "
                              "and label): pass --labels PATH (or set data.labels)")
        rows = LabelRows("SOPInstanceUID", "label")
        raw_labels = self.read_labels(labels, rows)
        by_sop: dict[str, str] = {}
        for study, _series, sop in instances:
            rows.find(f"{study}/{sop}.dcm", sop, study)  # counts rows and instances that met
        for study, _series, sop in instances:
            raw = raw_labels.get(sop) or raw_labels.get(study)
            if raw:
                by_sop[sop] = self.label_map(raw) or raw  # unmapped: kept raw, quarantined as unknown_label
        for study, _series, sop in instances:
            yield RawRecord(path=cache_path(root, study, sop), ref=f"{study}/{sop}.dcm", label=None,
                            patient_key=None, label_by_uid=by_sop)
        self.notes.set_labels_csv(rows.report(
            consequence="are quarantined (missing_label)",
            expected="by the instance's SOPInstanceUID or its study's StudyInstanceUID", enforced=False))
        self.notes.pull = {"instances": len(instances), "studies": len({s for s, _, _ in instances}),
                           "study_filter_keys": sorted(self.cfg.study_filter)}

    def read_labels(self, path: Path, rows: LabelRows) -> dict[str, str]:
        """Raw labels keyed by SOPInstanceUID (a row with one) or StudyInstanceUID (a row with only that)."""
        if not path.is_file():
            raise SourceError(f"label CSV {path} not found: the dicomweb source needs one (columns: SOPInstanceUID "
                              "or StudyInstanceUID, and label); pass --labels PATH.")
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
        label_col = next((c for c in LABEL_COLUMNS if c in header), None)
        sop_col = next((c for c in UID_COLUMNS if c in header), None)
        study_col = next((c for c in STUDY_COLUMNS if c in header), None)
        if label_col is None or (sop_col is None and study_col is None):
            raise SourceError(f"{path.name} must have a label column and a SOPInstanceUID or StudyInstanceUID "
                              f"column; found {header}")
        rows.key_column = sop_col or study_col or "SOPInstanceUID"
        out: dict[str, str] = {}
        for line, row in read_csv_lines(path, (label_col,)):
            label = (row.get(label_col) or "").strip()
            key = ((row.get(sop_col) or "").strip() if sop_col else "") or \
                  ((row.get(study_col) or "").strip() if study_col else "")
            norm = rows.add(line, key, usable=bool(label))
            if norm and label:
                out[norm] = label
        return out


# --------------------------------------------------------------------------- the pull cache


def cache_path(root: Path, study_uid: str, sop_uid: str) -> Path:
    """Where the instance lives in the pull cache (UIDs are digits and dots: checked by the client)."""
    return root / study_uid / f"{sop_uid}.dcm"


def write_instances(root: Path, instances: list[tuple[str, str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(INSTANCE_COLUMNS)
    writer.writerows(instances)
    write_atomic(root / INSTANCES_FILE, buf.getvalue().encode(), temp_suffix=TEMP_SUFFIX)


def read_instances(root: Path) -> list[tuple[str, str, str]]:
    """The instances of the last complete pull into ``root``.

    Raises:
        SourceError: no complete pull there yet.
    """
    path = root / INSTANCES_FILE
    if not path.is_file():
        raise SourceError(f"no pulled PACS data under {root} ({INSTANCES_FILE} is missing): pull it first with "
                          "`xrayops ingest --source dicomweb --url URL --labels CSV` (or `xrayops data generate "
                          "--set data.source=dicomweb`)")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        if tuple(next(reader, ())) != INSTANCE_COLUMNS:
            raise SourceError(f"{path} is not a pull listing (header {list(INSTANCE_COLUMNS)} expected)")
        return [(r[0], r[1], r[2]) for r in reader if len(r) == 3]
