"""Ingestion: manifest contents, quarantine with reasons, accounting, pseudonymised patients."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable

import pandas as pd

from pipeline.config import Settings
from pipeline.data.ingest import prepare_raw, run_ingest
from pipeline.data.synthetic import BAD_KINDS

MANIFEST_COLUMNS = {"image_id", "path", "sha256", "patient_id", "label", "width", "height", "channels", "bit_depth",
                    "mean", "std", "source", "source_split", "view_position"}


def test_manifest_has_one_row_per_good_image(cohort: Settings) -> None:
    df = pd.read_parquet(cohort.dataset_dir / "manifest.parquet")
    summary = json.loads((cohort.dataset_dir / "ingest_summary.json").read_text())
    assert MANIFEST_COLUMNS <= set(df.columns)
    assert len(df) == summary["ingested"] == summary["files_seen"] and summary["quarantined"] == 0
    assert df["sha256"].is_unique and df["image_id"].is_unique
    assert set(df["label"]) == {"NORMAL", "PNEUMONIA"}
    assert (df["width"] == 64).all() and (df["bit_depth"] == 8).all()
    assert all((cohort.dataset_dir / p).is_file() for p in df["path"])


def test_patient_ids_are_pseudonymised_consistently(cohort: Settings) -> None:
    df = pd.read_parquet(cohort.dataset_dir / "manifest.parquet")
    raw = {r["file"]: r["patient_id"] for r in csv.DictReader(open(cohort.raw_dir / "patients.csv"))}
    assert df["patient_id"].str.fullmatch(r"P[0-9a-f]{16}").all()
    assert df["patient_id"].nunique() == len(set(raw.values()))
    stored = b"".join(p.read_bytes() for p in cohort.dataset_dir.rglob("*") if p.is_file())
    for mrn in set(raw.values()):
        assert mrn.encode() not in stored


def test_every_bad_file_is_quarantined_with_a_reason(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings("data.version_with_dvc=false", f"data.synthetic.bad_files={len(BAD_KINDS)}")
    prepare_raw(settings)
    summary = run_ingest(settings, show_progress=False)
    reasons = summary["quarantine_reasons"]
    assert summary["ingested"] + summary["quarantined"] == summary["files_seen"]
    for reason in ("empty_file", "truncated", "not_an_image", "too_small", "decompression_bomb", "colour_image",
                   "duplicate_image", "missing_label"):
        assert reasons.get(reason, 0) >= 1, reason
    # the conflicting-labels copy and its original both leave the manifest
    assert reasons["conflicting_labels"] == 2
    rows = list(csv.DictReader(open(settings.dataset_dir / "quarantine.csv")))
    assert len(rows) == summary["quarantined"] and all(r["reason"] and r["path"] for r in rows)
    assert not any("BAD" in r["path"] or "MRN" in r["path"] for r in rows)  # no original names


def test_reingest_is_idempotent(cohort: Settings) -> None:
    before = (cohort.dataset_dir / "manifest.parquet").read_bytes()
    run_ingest(cohort, show_progress=False)
    assert (cohort.dataset_dir / "manifest.parquet").read_bytes() == before
