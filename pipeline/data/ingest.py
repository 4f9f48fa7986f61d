"""Stage ``ingest``: prepare the raw dataset, version it with DVC, build the manifest.

Called by the CLI (``xrayops ingest``, used by ``dvc.yaml``) and by the training flow
with the same :class:`~pipeline.config.Settings`.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.data.deid import load_salt
from pipeline.data.manifest import IngestOptions, Mapper, ingest_records
from pipeline.data.policy import AdmissionPolicy
from pipeline.data.progress import progress_bar
from pipeline.data.sources import Source, get_source
from pipeline.data.sources.base import check_label_rows
from pipeline.data.versioning import DatasetVersion, fetch, track
from pipeline.errors import SourceError
from pipeline.locking import file_lock

logger = logging.getLogger(__name__)


def classes_of(settings: Settings, source: Source) -> tuple[tuple[str, ...], str | None]:
    """Class names and positive class: config when set, else the source's."""
    classes = tuple(settings.data.classes or source.profile.classes)
    positive = settings.data.positive_class or source.profile.positive_class
    if len(classes) == 2 and positive not in classes:
        raise SourceError(f"data.positive_class {positive!r} is not one of data.classes {list(classes)}")
    return classes, (positive if len(classes) == 2 else None)


def prepare_raw(settings: Settings) -> Path:
    """Materialise the raw data when the source can (synthetic, sklearn/keras); returns its folder.

    Holds the raw folder's lock (see :func:`raw_lock`): a second run waits instead of writing
    the same files at once (and then reads them whole).
    """
    root = settings.raw_dir
    with raw_lock(settings):
        get_source(settings).prepare(root)
    return root


def version_raw(settings: Settings) -> DatasetVersion | None:
    """Version the raw folder with DVC (``dvc add`` + push), or fetch ``data.rev`` from a DVC repo.

    Returns None when ``data.version_with_dvc`` is off. Holds the raw folder's lock.
    """
    if settings.data.rev:
        with raw_lock(settings):
            return fetch_rev(settings)
    if not settings.data.version_with_dvc:
        return None
    with raw_lock(settings):
        return track(settings.raw_dir, remote_url=settings.dvc_remote, push=settings.data.dvc_push)


def raw_lock_path(settings: Settings) -> Path:
    """The lock file of the raw folder (or ``data.rev`` checkout): under the state folder, so the raw
    folder (what DVC hashes and sources list) holds only data."""
    folder = checkout_dir(settings) if settings.data.rev else settings.raw_dir
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return settings.home / "locks" / f"raw-{digest}.lock"


def raw_lock(settings: Settings) -> AbstractContextManager[None]:
    """Exclusive lock of the raw folder for generating, versioning or checking it out (bounded wait)."""
    folder = checkout_dir(settings) if settings.data.rev else settings.raw_dir
    return file_lock(raw_lock_path(settings), what=f"raw data folder {folder}",
                     timeout_s=settings.data.ingest.lock_timeout_s, setting="data.ingest.lock_timeout_s")


def fetch_rev(settings: Settings) -> DatasetVersion:
    """Materialise ``data.input`` at ``data.rev`` from ``data.repo`` (default: this project).

    ``data.input`` is a path inside that repo (relative to its root, or absolute below it).
    """
    repo = settings.data.repo or str(settings.root)
    rel = repo_relative(settings.data.input or f"{settings.paths.data_dir}/raw/{settings.dataset_name}", repo)
    dest = checkout_dir(settings)
    remote = None if settings.data.repo else settings.dvc_remote  # other repos use their own remote
    return fetch(repo, rel, settings.data.rev, dest, remote_url=remote)


def repo_relative(path: str, repo: str) -> str:
    """``path`` relative to a local ``repo`` root (POSIX), as DVC's filesystem addresses it.

    Raises:
        SourceError: an absolute path outside the repository.
    """
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    root = Path(repo).expanduser().resolve()
    try:
        return p.resolve().relative_to(root).as_posix()
    except ValueError:
        raise SourceError(f"data.input {path} is not inside the DVC repo {repo}; with --rev give the dataset "
                          "path relative to the repo root (e.g. --input data/raw/NAME).") from None


def checkout_dir(settings: Settings) -> Path:
    safe_rev = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(settings.data.rev))
    return settings.home / "dvc-checkouts" / f"{settings.dataset_name}@{safe_rev}"


def run_ingest(settings: Settings, version: DatasetVersion | None = None, *, show_progress: bool = True,
               mapper: Mapper | None = None) -> dict[str, Any]:
    """Ingest the configured dataset into ``settings.dataset_dir``; returns the ingest summary.

    ``mapper`` runs the per-file work elsewhere (e.g. Dask shards); default: local worker
    processes or threads (``data.ingest.executor``). Holds the raw folder's lock while it
    reads it (a run regenerating it waits) and the dataset folder's while it writes
    (:func:`~pipeline.data.manifest.ingest_records`); each waits ``data.ingest.lock_timeout_s``.
    """
    with raw_lock(settings):
        return _ingest(settings, version, show_progress, mapper)


def _ingest(settings: Settings, version: DatasetVersion | None, show_progress: bool,
            mapper: Mapper | None) -> dict[str, Any]:
    source = get_source(settings)
    raw = checkout_dir(settings) if settings.data.rev else settings.raw_dir
    labels = settings.resolve(settings.data.labels) if settings.data.labels else None
    classes, positive = classes_of(settings, source)
    opts = IngestOptions(
        source=settings.data.source,
        classes=classes,
        profile=source.profile,
        salt=load_salt(settings.data.ingest.salt_env, settings.home),
        min_size=settings.data.ingest.min_size or source.profile.min_size,
        max_pixels=settings.data.ingest.max_pixels,
        max_bytes=settings.data.ingest.max_bytes,
        dicom_bit_depth=settings.data.ingest.dicom_bit_depth,
        workers=settings.data.ingest.workers,
        executor=settings.data.ingest.executor,
        png_inflate=settings.data.ingest.png_inflate,
        policy=AdmissionPolicy.from_config(settings.data.admission) if source.profile.modality == "CXR" else None,
    )
    records = list(source.records(raw, labels))
    notes = getattr(source, "notes", None)
    # before anything is written: a labels CSV that misses files would invent one patient per image
    check_label_rows(notes, settings.data.source, settings.data.ingest.max_label_mismatches)
    extra = {
        "dataset": settings.dataset_name,
        "positive_class": positive,
        "task": "binary" if len(classes) == 2 else "multiclass",
        "dvc": version.to_dict() if version else None,
        **(notes.to_dict() if notes is not None else {}),
    }
    if notes is not None and notes.excluded_images:
        logger.info("label mapping excluded %d image(s) (%s)", notes.excluded_images,
                    ", ".join(f"{k}: {v}" for k, v in notes.excluded.most_common(8)))
    with progress_bar(len(records), "ingest", show_progress) as advance:
        return ingest_records(records, settings.dataset_dir, opts, extra, progress=advance, mapper=mapper,
                              lock_timeout_s=settings.data.ingest.lock_timeout_s)
