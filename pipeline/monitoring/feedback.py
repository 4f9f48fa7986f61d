"""Clinician feedback: an append-only record store, adjudication, and the feedback dataset.

Records (``<feedback_log>/records/date=…/part-*.parquet``) hold the request id, model
name/version, the model's answer, the clinician's verdict (agree / disagree + the correct
label) and an optional short comment — never patient identifiers. For a case a clinician
gave feedback on, the *de-identified pixels* (decoded image, no DICOM header) are kept as
``<feedback_log>/images/<request_id>.png`` so the case can become training data; the
production log itself never holds pixels.

Every record carries the signed-in user's pseudonymous id (``user_id``, ``U`` + 16 hex digits, a
keyed hash: never a name) and its ``kind``: ``feedback`` (a clinician's verdict) or ``adjudication``
(an adjudicator's decision in the UI).

Adjudication (:func:`adjudicate`): a case's label is the one from ``<feedback_log>/adjudications.csv``
(``request_id,label``; written by a senior reader) when present, else the latest adjudicator decision
(``monitor.feedback_adjudicator_decides``), else the clinicians' label when all its records agree *and*
come from at least ``monitor.feedback_min_clinicians`` distinct users (records without a user id, from
the app without sign-in or older versions, count for no one). Conflicting cases and cases still
waiting for readers (``pending``) are left out and listed.
:func:`ingest_feedback` writes the adjudicated cases as a ``folder``-source dataset
(``<data_dir>/raw/<monitor.feedback_dataset>/<LABEL>/<request_id>.png``), versions it with
DVC, and reports each model version's accuracy on them.

Labels become folder names, so a label is used only once it is one of the model's classes:
:func:`record_feedback` checks it against the classes of the model that answered (the served
version's registered ``classes``), :func:`ingest_feedback` checks every adjudicated label
(records and ``adjudications.csv``) against the classes the dataset will be trained with
(``data.classes``, else the ``folder`` source's), and :func:`write_dataset` builds no path
from a label or a request id it has not checked. Anything else is a :class:`FeedbackError`
that lists the valid classes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from pipeline.config import Settings
from pipeline.data.imaging import DecodedImage, encode_png
from pipeline.durable import write_atomic
from pipeline.errors import FeedbackError
from pipeline.serving.production_log import append, read_part, warn_skipped

logger = logging.getLogger(__name__)

RECORDS_DIR = "records"
IMAGES_DIR = "images"
ADJUDICATIONS_FILE = "adjudications.csv"
MAX_COMMENT = 500
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
_USER_ID = re.compile(r"^U[0-9a-f]{16}$")
RESOLVED = ("adjudicated", "consensus")  # statuses whose label becomes training data


@dataclass(frozen=True)
class FeedbackRecord:
    """One clinician's verdict on one prediction (no PHI)."""

    request_id: str
    model_name: str
    model_version: str
    predicted_label: str
    probability: float
    verdict: Literal["agree", "disagree"]
    correct_label: str
    comment: str = ""
    source: str = "ui"
    submitted_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    user_id: str | None = None  # pseudonymous id of the signed-in user (pipeline.ui.auth.user_id_for)
    kind: Literal["feedback", "adjudication"] = "feedback"


def check_label(label: object, classes: Sequence[str], what: str = "label") -> str:
    """``label`` when it is one of ``classes`` (exactly), else a :class:`FeedbackError` listing them.

    Feedback labels become class folder names of the feedback dataset: ``../../x`` would leave
    it and a typo (``PNEUMONA``) would create a new class, so nothing else is accepted.
    """
    valid = [str(c) for c in classes]
    if not valid:
        raise FeedbackError("no model classes are known to check the feedback label against",
                            hint="record feedback through the API/UI, which know the served model's classes")
    if isinstance(label, str) and label in valid:
        return label
    shown = repr(label) if len(repr(label)) <= 40 else repr(label)[:37] + "..."
    raise FeedbackError(f"{what} {shown} is not one of the model's classes: {', '.join(valid)}",
                        hint=f"use one of {', '.join(valid)} (exact spelling and case)")


def check_request_id(request_id: object) -> str:
    """``request_id`` when it is a 32-digit hex id from the API/UI (it names the case's image file)."""
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
        raise FeedbackError(f"request id {str(request_id)[:40]!r} is not a 32-digit hex id from the API/UI")
    return request_id


def check_user_id(user_id: object, required: bool = False) -> str | None:
    """``user_id`` when it is a pseudonymous id (``U`` + 16 hex digits), None when absent and not ``required``.

    Anything else (a plain user name, an e-mail address) is refused: names must never reach the store.
    """
    if user_id is None and not required:
        return None
    if not isinstance(user_id, str) or not _USER_ID.match(user_id):
        raise FeedbackError("the user id of a feedback record must be a pseudonymous id (U + 16 hex digits, "
                            "pipeline.ui.auth.user_id_for), not a name" if user_id is not None else
                            "an adjudication record needs the adjudicator's pseudonymous user id")
    return user_id


def record_feedback(feedback_dir: Path, record: FeedbackRecord, image: DecodedImage | None = None, *,
                    classes: Sequence[str]) -> Path:
    """Append one record atomically (and keep the case's de-identified pixels when given).

    ``classes`` are the classes of the model that answered (the served version's); the correct
    and predicted labels must be among them.

    Raises:
        FeedbackError: a malformed request id, verdict, kind or user id (a name instead of a pseudonym), or a
            label that is not one of ``classes`` (the message lists them).
    """
    check_request_id(record.request_id)
    if record.kind not in ("feedback", "adjudication"):
        raise FeedbackError(f"kind must be 'feedback' or 'adjudication', got {str(record.kind)[:40]!r}")
    check_user_id(record.user_id, required=record.kind == "adjudication")
    if record.verdict not in ("agree", "disagree"):
        raise FeedbackError(f"verdict must be 'agree' or 'disagree', got {record.verdict!r}")
    check_label(record.correct_label, classes, "correct label")
    check_label(record.predicted_label, classes, "predicted label")
    if record.verdict == "agree" and record.correct_label != record.predicted_label:
        raise FeedbackError("an 'agree' verdict must keep the predicted label")
    row = {**asdict(record), "comment": record.comment.strip()[:MAX_COMMENT], "has_image": image is not None}
    if image is not None:
        # a unique hidden temp name, fsynced before the rename: two answers to one request never share a temp
        # file, and a crash never publishes a PNG the disk did not receive
        write_atomic(feedback_dir / IMAGES_DIR / f"{record.request_id}.png", encode_png(image))
    return append(feedback_dir / RECORDS_DIR, pd.DataFrame([row]), time_column="submitted_at")[0]


def feedback_files(feedback_dir: Path) -> list[Path]:
    """The record files under ``feedback_dir`` (empty when no feedback was given yet)."""
    return sorted((feedback_dir / RECORDS_DIR).glob("date=*/part-*.parquet"))


def read_feedback(feedback_dir: Path, skipped: list[str] | None = None) -> pd.DataFrame:
    """All feedback records, oldest first (empty frame when there are none).

    A record file that cannot be read (damaged, not Parquet) is skipped, appended to ``skipped``
    and named in one warning line; the other records are still returned.
    """
    frames, bad = [], []
    for f in feedback_files(feedback_dir):
        frame = read_part(f, time_column="submitted_at")
        if frame is None:
            bad.append(str(f))
        else:
            frames.append(frame)
    warn_skipped(feedback_dir / RECORDS_DIR, bad)
    if skipped is not None:
        skipped.extend(bad)
    if not frames:
        return pd.DataFrame(columns=[f.name for f in FeedbackRecord.__dataclass_fields__.values()])
    df = pd.concat(frames, ignore_index=True)
    if "user_id" not in df:  # records written before user ids and kinds existed
        df["user_id"] = None
    df["user_id"] = df["user_id"].astype(object).where(df["user_id"].notna(), None)
    df["kind"] = df["kind"].fillna("feedback") if "kind" in df else "feedback"
    return df.sort_values("submitted_at", kind="stable").reset_index(drop=True)


CASE_COLUMNS = ["request_id", "label", "status", "model_name", "model_version", "predicted_label", "records",
                "clinicians", "labels"]


def adjudicate(records: pd.DataFrame, adjudications: pd.DataFrame | None = None, *, min_clinicians: int,
               adjudicator_decides: bool) -> pd.DataFrame:
    """One row per case: request_id, label, status, the model's answer, records, distinct clinicians, labels given.

    Status: ``adjudicated`` (adjudications.csv, or with ``adjudicator_decides`` the latest adjudication
    record), ``consensus`` (every feedback record gives one label, from at least ``min_clinicians``
    distinct user ids), ``conflict`` (different labels) or ``pending`` (one label, too few clinicians).
    Only :data:`RESOLVED` cases have a label.
    """
    if records.empty:
        return pd.DataFrame(columns=CASE_COLUMNS)
    override: dict[str, str] = {}
    if adjudications is not None:
        override = dict(zip(adjudications["request_id"], adjudications["label"], strict=True))
    kinds = records["kind"] if "kind" in records else pd.Series("feedback", index=records.index)
    users = records["user_id"] if "user_id" in records else pd.Series(None, index=records.index, dtype=object)
    rows = []
    for rid, group in records.groupby("request_id", sort=False):
        is_adj = kinds.loc[group.index].eq("adjudication")
        votes = group[~is_adj]
        decisions = group[is_adj]
        labels = sorted(set(votes["correct_label"]))
        clinicians = int(users.loc[votes.index].dropna().nunique())
        if rid in override:
            label, status = override[rid], "adjudicated"
        elif adjudicator_decides and len(decisions):
            label, status = decisions["correct_label"].iloc[-1], "adjudicated"  # records are oldest first
        elif len(labels) > 1:
            label, status = None, "conflict"
        elif len(labels) == 1 and clinicians >= min_clinicians:
            label, status = labels[0], "consensus"
        else:
            label, status = None, "pending"
        first = group.iloc[0]
        rows.append({"request_id": rid, "label": label, "status": status, "model_name": first["model_name"],
                     "model_version": str(first["model_version"]), "predicted_label": first["predicted_label"],
                     "records": len(group), "clinicians": clinicians, "labels": ",".join(labels)})
    return pd.DataFrame(rows, columns=CASE_COLUMNS)


def read_adjudications(feedback_dir: Path) -> pd.DataFrame | None:
    path = feedback_dir / ADJUDICATIONS_FILE
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FeedbackError(f"{path} is not a readable CSV ({type(exc).__name__}: {exc})",
                            hint="write it as a CSV with the header request_id,label") from None
    if not {"request_id", "label"} <= set(df.columns):
        raise FeedbackError(f"{path} must have the columns request_id,label (found {list(df.columns)})")
    return df.assign(request_id=df["request_id"].str.strip(), label=df["label"].str.strip())


def accuracy_by_version(cases: pd.DataFrame) -> list[dict[str, Any]]:
    """Accuracy of each model version on its resolved feedback cases, with a Wilson 95 % interval."""
    resolved = cases[cases["status"].isin(RESOLVED)]
    out = []
    for (name, version), group in resolved.groupby(["model_name", "model_version"], sort=True):
        n = len(group)
        k = int((group["predicted_label"] == group["label"]).sum())
        out.append({"model_name": name, "model_version": str(version), "cases": n, "correct": k,
                    "accuracy": round(k / n, 4), "ci95": [round(v, 4) for v in wilson(k, n)]})
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def feedback_dataset_dir(settings: Settings) -> Path:
    return settings.resolve(Path(settings.paths.data_dir) / "raw" / settings.monitor.feedback_dataset)


def feedback_classes(settings: Settings) -> tuple[str, ...]:
    """The classes the feedback dataset is trained with: ``data.classes``, else the ``folder`` source's."""
    from pipeline.data.sources.folder import FolderSource

    return tuple(settings.data.classes or FolderSource().profile.classes)


def check_adjudications(adjudications: pd.DataFrame | None, classes: Sequence[str]) -> None:
    """Every row of ``adjudications.csv`` holds a valid request id and one of ``classes``.

    Raises:
        FeedbackError: naming the CSV lines (header = line 1) and the valid classes.
    """
    if adjudications is None:
        return
    problems = []
    for line, (rid, label) in enumerate(zip(adjudications["request_id"], adjudications["label"], strict=True),
                                        start=2):
        if not (isinstance(rid, str) and _REQUEST_ID.match(rid)):
            problems.append(f"line {line}: the request id is not a 32-digit hex id")
        elif not (isinstance(label, str) and label in classes):
            problems.append(f"line {line}: label {str(label)[:40]!r}")
    if problems:
        raise FeedbackError(f"{ADJUDICATIONS_FILE}: {len(problems)} row(s) are not usable "
                            f"({'; '.join(problems[:5])}); a label must be one of the model's classes: "
                            f"{', '.join(classes)}",
                            hint=f"fix those rows of {ADJUDICATIONS_FILE} (request_id,label with label one of "
                                 f"{', '.join(classes)}); nothing was written")


def check_cases(cases: pd.DataFrame, classes: Sequence[str]) -> None:
    """Every resolved case's label is one of ``classes`` (conflicting and pending cases have none and are left out).

    Raises:
        FeedbackError: naming the cases (request ids) and the valid classes.
    """
    resolved = cases[cases["status"].isin(RESOLVED)] if len(cases) else cases
    bad = [(rid, label) for rid, label in zip(resolved.get("request_id", []), resolved.get("label", []), strict=True)
           if not (isinstance(label, str) and label in classes)]
    if bad:
        listed = "; ".join(f"{rid}: {str(label)[:40]!r}" for rid, label in bad[:5])
        raise FeedbackError(f"{len(bad)} feedback case(s) have a label that is not one of the model's classes "
                            f"({', '.join(classes)}): {listed}",
                            hint=f"adjudicate those cases in {ADJUDICATIONS_FILE} (request_id,label) with one of "
                                 f"{', '.join(classes)}; nothing was written")


def write_dataset(cases: pd.DataFrame, feedback_dir: Path, dest: Path, classes: Iterable[str]) -> dict[str, int]:
    """Place each resolved case's image under ``dest/<LABEL>/<request_id>.png`` (idempotent).

    A label must be one of ``classes`` and a request id a 32-digit hex id before any path is built from it.
    """
    valid = tuple(classes)
    counts: dict[str, int] = {}
    missing = 0
    for case in cases[cases["status"].isin(RESOLVED)].itertuples():
        request_id = check_request_id(case.request_id)
        label = check_label(case.label, valid, f"label of case {request_id}")
        src = feedback_dir / IMAGES_DIR / f"{request_id}.png"
        if not src.is_file():
            missing += 1
            continue
        for other in dest.glob(f"*/{request_id}.png"):
            if other.parent.name != label:
                other.unlink()  # re-adjudicated to another label
        target = dest / label / f"{request_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(src, target)
        counts[label] = counts.get(label, 0) + 1
    return {**counts, "_missing_image": missing}


def ingest_feedback(settings: Settings) -> dict[str, Any]:
    """Adjudicated feedback → labelled ``folder`` dataset (DVC-versioned) + accuracy per model version."""
    from pipeline.data.versioning import track

    fb_dir = settings.feedback_log
    classes = feedback_classes(settings)
    skipped: list[str] = []
    records = read_feedback(fb_dir, skipped)
    adjudications = read_adjudications(fb_dir)
    check_adjudications(adjudications, classes)
    cases = adjudicate(records, adjudications, min_clinicians=settings.monitor.feedback_min_clinicians,
                       adjudicator_decides=settings.monitor.feedback_adjudicator_decides)
    check_cases(cases, classes)  # before anything is written
    dest = feedback_dataset_dir(settings)
    counts = write_dataset(cases, fb_dir, dest, classes)
    missing = counts.pop("_missing_image")
    version = None
    if counts and settings.data.version_with_dvc:
        version = track(dest, remote_url=settings.dvc_remote, push=settings.data.dvc_push).to_dict()
    summary = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "records": int(len(records)), "cases": int(len(cases)),
        "status": {str(k): int(v) for k, v in cases["status"].value_counts().items()} if len(cases) else {},
        "conflicts": cases.loc[cases["status"] == "conflict", "request_id"].tolist(),
        "pending": cases.loc[cases["status"] == "pending", "request_id"].tolist(),
        "consensus_rule": {"min_clinicians": settings.monitor.feedback_min_clinicians,
                           "adjudicator_decides": settings.monitor.feedback_adjudicator_decides},
        "dataset_dir": str(dest), "images_by_label": counts, "cases_without_image": missing, "dvc": version,
        "skipped_parts": len(skipped), "skipped_files": skipped,
        "accuracy_by_version": accuracy_by_version(cases) if len(cases) else [],
        "train_with": f"xrayops run --set data.source=folder --set data.input={dest}",
    }
    out = settings.reports_dir / "feedback" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    summary["report"] = str(out / "summary.json")
    logger.info("feedback: %d records → %d cases (%s); dataset %s %s", len(records), len(cases), summary["status"],
                dest, counts)
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    rows = "\n".join(f"| {a['model_name']} | v{a['model_version']} | {a['cases']} | {a['accuracy']:.3f} | "
                     f"{a['ci95'][0]:.3f}–{a['ci95'][1]:.3f} |" for a in summary["accuracy_by_version"])
    dvc = summary.get("dvc") or {}
    skipped = (f"- unreadable record files skipped: {summary['skipped_parts']}\n"
               if summary.get("skipped_parts") else "")
    return (f"## Clinician feedback\n\n- {summary['records']} records, {summary['cases']} cases "
            f"({summary['status']}); conflicts left out: {len(summary['conflicts'])}; waiting for more readers "
            f"(fewer than {summary['consensus_rule']['min_clinicians']} clinicians agree): "
            f"{len(summary['pending'])}\n{skipped}"
            f"- dataset `{summary['dataset_dir']}`: {summary['images_by_label']} "
            f"(DVC md5 `{dvc.get('dvc_md5')}`)\n- train with: `{summary['train_with']}`\n\n"
            f"| model | version | cases | accuracy | 95% CI |\n|---|---|---|---|---|\n{rows}\n")
