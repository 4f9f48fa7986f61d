"""Cache keys for the expensive data tasks (ingest, validate), tied to the files on disk.

A Prefect cache hit returns the task's *result* (a JSON summary) without running it, but
the stage's real output is files (manifest, images, GX results) in the dataset folder. A
cached summary is only worth returning when those files are still the ones it describes.
So each cached stage has:

- a **key** computed from what determines its output: the DVC content hash of the raw
  dataset (ingest) or the manifest's sha256 (validate), the settings the stage reads, the
  dataset folder, a fingerprint of the pseudonymisation salt and of the stage's library
  code (every ``pipeline`` file in the stage module's import closure, see :mod:`flows.codegraph`);
- a **stamp** file ``<dataset_dir>/.prefect-cache/<stage>.key`` written by the task after a
  real run, holding that key;
- an **intact** check the flow makes before calling the task: stamp == key and the outputs
  exist (for ingest: the manifest's sha256 matches the summary on disk). When the check
  fails the flow calls the task with ``refresh_cache=True``, which recomputes and overwrites
  the cache record.

Results are persisted with Prefect's JSON serializer (plain dicts), never pickle.
Without a DVC hash (``data.version_with_dvc=false``) the key is None and nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from flows.codegraph import PROJECT_ROOT, fingerprint
from pipeline.config import Settings
from pipeline.data.manifest import file_sha256

STAMP_DIR = ".prefect-cache"
CACHE_FORMAT = 1  # bump to invalidate every cache record
# the module whose function each cached task runs; its import closure is the code in the key
INGEST_CODE = ("pipeline.data.ingest",)
VALIDATE_CODE = ("pipeline.data.validate",)


@cache
def code_fingerprint(modules: tuple[str, ...], root: Path = PROJECT_ROOT) -> str:
    """sha256 of the library source files the stage ``modules`` run: their ``pipeline`` import closure.

    Computed once per process (the code a worker runs is the code it imported).
    """
    return fingerprint(modules, root)


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def salt_fingerprint(settings: Settings) -> str:
    """A one-way fingerprint of the pseudonymisation salt (pseudonyms in the manifest depend on it)."""
    from pipeline.data.deid import load_salt

    salt = load_salt(settings.data.ingest.salt_env, settings.home)
    return hashlib.sha256(b"xrayops-cache-key:" + salt).hexdigest()[:16]


def ingest_key(settings: Settings, version: Any) -> str | None:
    """Key of the ingest stage; None (no caching) when the dataset has no DVC hash."""
    md5 = getattr(version, "dvc_md5", None)
    if not md5:
        return None
    data = settings.to_params()["data"]
    for irrelevant in ("synthetic", "dvc_push", "version_with_dvc", "repo", "rev"):
        data.pop(irrelevant, None)  # they change the raw bytes, which the DVC hash already covers
    return "xrayops-ingest-" + _digest({
        "format": CACHE_FORMAT, "dvc_md5": md5, "data": data, "seed": settings.base.seed,
        "dataset_dir": str(settings.dataset_dir), "salt": salt_fingerprint(settings),
        "code": code_fingerprint(INGEST_CODE),
    })


def validate_key(settings: Settings, ingest_summary: dict[str, Any]) -> str | None:
    """Key of the validate stage: the manifest's content hash plus the validation settings."""
    manifest_sha = ingest_summary.get("manifest_sha256")
    if not manifest_sha:
        return None
    params = settings.to_params()
    return "xrayops-validate-" + _digest({
        "format": CACHE_FORMAT, "manifest_sha256": manifest_sha, "validate": params["validate"],
        "admission": params["data"]["admission"],  # the modality/photometric/view expectations
        "classes": params["data"]["classes"], "positive_class": params["data"]["positive_class"],
        "source": params["data"]["source"], "dataset_dir": str(settings.dataset_dir),
        "code": code_fingerprint(VALIDATE_CODE),
    })


# Prefect cache_key_fn signatures: (task_run_context, task parameters) -> key | None


def ingest_cache_key(_ctx: Any, parameters: dict[str, Any]) -> str | None:
    return ingest_key(parameters["settings"], parameters.get("version"))


def validate_cache_key(_ctx: Any, parameters: dict[str, Any]) -> str | None:
    return validate_key(parameters["settings"], parameters.get("ingest_summary") or {})


# --------------------------------------------------------------------------- stamps on disk


def stamp_path(settings: Settings, stage: str) -> Path:
    return settings.dataset_dir / STAMP_DIR / f"{stage}.key"


def write_stamp(settings: Settings, stage: str, key: str | None) -> None:
    """Record that the outputs now on disk were produced under ``key`` (removes a stale stamp when None)."""
    path = stamp_path(settings, stage)
    if key is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(key)
    tmp.replace(path)


def _stamp_matches(settings: Settings, stage: str, key: str | None) -> bool:
    path = stamp_path(settings, stage)
    return key is not None and path.is_file() and path.read_text().strip() == key


def ingest_intact(settings: Settings, version: Any) -> bool:
    """True when the dataset folder holds the ingest outputs a cache hit for this version would describe."""
    from pipeline.data.manifest import MANIFEST_FILE, read_summary

    if not _stamp_matches(settings, "ingest", ingest_key(settings, version)):
        return False
    manifest = settings.dataset_dir / MANIFEST_FILE
    recorded = read_summary(settings.dataset_dir).get("manifest_sha256")
    return manifest.is_file() and recorded == file_sha256(manifest)


def validate_intact(settings: Settings, ingest_summary: dict[str, Any]) -> bool:
    """True when the GX result on disk was produced for this manifest and these settings."""
    from pipeline.data.validate import RESULT_FILE

    result = settings.dataset_dir / "validation" / RESULT_FILE
    return _stamp_matches(settings, "validate", validate_key(settings, ingest_summary)) and result.is_file()
