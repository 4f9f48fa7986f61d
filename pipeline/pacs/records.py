"""What the PACS integration keeps under its state folder (``pacs.state_dir``, default ``<home>/pacs``).

- ``records/date=…/part-*.parquet``: one row per outcome (``event`` ``processed``) and per sign-off (``event``
  ``signed_off``), de-identified: request id, the salted study reference (``S`` + 16 hex digits), model
  name/version, probability, label, status and reason. This is what the review page lists and what may be logged.
- ``links/<request_id>.json`` (mode 0600): the PACS coordinates of one result (Study/Series/SOP Instance UIDs of
  the source image and of our SR). Writing the VERIFIED SR back needs them; they are the PACS's identifiers, not
  patient data, but they do identify a study, so they live only here, are never logged, never go to MLflow or
  the production log, and the link is deleted once the result is signed off.
- ``pending/<study_ref>.json`` (mode 0600): the StudyInstanceUID of a study handed to a Prefect run, keyed by its
  salted reference. The listener writes it before it starts the run, so the run's parameters (stored in Prefect's
  database and shown in its UI) carry the reference only; the run reads the UID here and deletes the file once
  the study has a final outcome (a transient one keeps it for the retry).
- ``cursor.json``: the listener's last processed Orthanc change sequence number, replaced atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Settings
from pipeline.durable import write_atomic
from pipeline.serving.production_log import append, read_part, warn_skipped

RECORDS_DIR = "records"
LINKS_DIR = "links"
PENDING_DIR = "pending"
CURSOR_FILE = "cursor.json"


def state_dir(settings: Settings) -> Path:
    """``pacs.state_dir`` or ``<home>/pacs``."""
    return settings.resolve(settings.pacs.state_dir or settings.home / "pacs")


def fhir_dir(settings: Settings) -> Path:
    """``pacs.fhir_dir`` or ``<state>/fhir-outbox``."""
    return settings.resolve(settings.pacs.fhir_dir or state_dir(settings) / "fhir-outbox")


def write_json_atomic(path: Path, payload: dict[str, Any], mode: int = 0o600) -> Path:
    """Write ``payload`` whole or not at all (:func:`pipeline.durable.write_atomic`) in a 0700 folder."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_atomic(path, json.dumps(payload, sort_keys=True).encode(), mode=mode)


def append_record(settings: Settings, row: dict[str, Any]) -> None:
    """Append one de-identified record (``processed_at`` is its UTC time)."""
    append(state_dir(settings) / RECORDS_DIR, pd.DataFrame([row]), time_column="processed_at")


def read_records(settings: Settings) -> pd.DataFrame:
    """Every record, oldest first (empty frame when none); unreadable parts skipped with one warning."""
    folder = state_dir(settings) / RECORDS_DIR
    frames, bad = [], []
    for part in sorted(folder.glob("date=*/part-*.parquet")):
        frame = read_part(part, time_column="processed_at")
        (bad.append(str(part)) if frame is None else frames.append(frame))
    warn_skipped(folder, bad)
    if not frames:
        return pd.DataFrame(columns=["processed_at", "event", "request_id", "study_ref", "status"])
    columns = list(dict.fromkeys(c for f in frames for c in f.columns))
    # all-NA columns (an outcome without a request id or a model) are dropped before and restored after the
    # concat: pandas otherwise warns (FutureWarning) on every read; the values are the same either way
    df = pd.concat([f.dropna(axis=1, how="all") for f in frames], ignore_index=True).reindex(columns=columns)
    df["processed_at"] = pd.to_datetime(df["processed_at"], utc=True)
    return df.sort_values("processed_at", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class Link:
    """PACS coordinates of one result (see the module docstring for where they may go: nowhere else)."""

    study_uid: str
    source_series_uid: str
    source_sop_uid: str
    sr_series_uid: str
    sr_sop_uid: str


def _link_path(settings: Settings, request_id: str) -> Path:
    if len(request_id) != 32 or any(c not in "0123456789abcdef" for c in request_id):
        raise ValueError("a request id is 32 hex digits")
    return state_dir(settings) / LINKS_DIR / f"{request_id}.json"


def save_link(settings: Settings, request_id: str, link: Link) -> Path:
    return write_json_atomic(_link_path(settings, request_id), link.__dict__)


def load_link(settings: Settings, request_id: str) -> Link | None:
    path = _link_path(settings, request_id)
    return Link(**json.loads(path.read_text())) if path.is_file() else None


def drop_link(settings: Settings, request_id: str) -> None:
    _link_path(settings, request_id).unlink(missing_ok=True)


def _pending_path(settings: Settings, study_ref: str) -> Path:
    if len(study_ref) != 17 or study_ref[0] != "S" or any(c not in "0123456789abcdef" for c in study_ref[1:]):
        raise ValueError("a study reference is S + 16 hex digits")
    return state_dir(settings) / PENDING_DIR / f"{study_ref}.json"


def save_pending(settings: Settings, study_ref: str, study_uid: str) -> Path:
    """Keep the UID of a study about to be handed to a run that only gets ``study_ref`` (file mode 0600)."""
    return write_json_atomic(_pending_path(settings, study_ref), {"study_uid": study_uid})


def load_pending(settings: Settings, study_ref: str) -> str | None:
    """The UID kept for ``study_ref`` (None: none kept, or the file is unreadable)."""
    path = _pending_path(settings, study_ref)
    try:
        uid = json.loads(path.read_text()).get("study_uid")
    except (OSError, ValueError, AttributeError):
        return None
    return uid if isinstance(uid, str) and uid else None


def drop_pending(settings: Settings, study_ref: str) -> None:
    _pending_path(settings, study_ref).unlink(missing_ok=True)


def read_cursor(settings: Settings) -> int | None:
    """The listener's last processed change sequence number (None: never ran)."""
    path = state_dir(settings) / CURSOR_FILE
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["last_seq"])


def write_cursor(settings: Settings, seq: int) -> None:
    write_json_atomic(state_dir(settings) / CURSOR_FILE, {"last_seq": int(seq)}, mode=0o644)
