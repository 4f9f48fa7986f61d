"""The split certificate and the validation result are bound to the manifest they describe.

Before: a re-ingest that merged two patients left the old split certificate and the old
validation result in place, and the gate's data checks still passed on them. Now both record
the sha256 of ``manifest.parquet`` and the gate fails, naming the criterion, when the current
manifest is another one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pandas as pd
import pytest

from pipeline.config import Settings
from pipeline.data.manifest import read_summary
from pipeline.data.split import run_split, verify_certificate
from pipeline.data.validate import run_validation
from pipeline.errors import LeakageError
from pipeline.registry.decision import Evidence, decide
from pipeline.registry.gate import data_checks

pytestmark = pytest.mark.slow  # ingest + Great Expectations: seconds


def gate_data(settings: Settings, trained_on: str) -> Callable[[], list[str]]:
    """The gate's data criteria on ``settings.dataset_dir`` for a model trained on split ``trained_on``."""

    def failed() -> list[str]:
        checks = data_checks(settings.dataset_dir, trained_on)
        evidence = Evidence("binary", {"auc": 0.99, "ece": 0.01}, {"sensitivity": [0.95, 1.0]}, checks)
        decision = decide(evidence, settings.promote, model="m", challenger_version="1")
        return [c for c in decision.failed if c not in ("auc_floor", "sensitivity_ci_low", "ece")]

    return failed


def test_certificate_and_validation_record_the_manifest_file_sha256(cohort: Settings) -> None:
    validation = run_validation(cohort)
    cert = run_split(cohort)
    recorded = read_summary(cohort.dataset_dir)["manifest_sha256"]  # what ingest recorded for the file
    assert cert["manifest_sha256"] == recorded == validation["manifest_sha256"]
    stored = json.loads((cohort.dataset_dir / "validation" / "result.json").read_text())
    assert stored["manifest_sha256"] == recorded
    assert gate_data(cohort, cert["certificate_sha256"])() == []


def test_reingest_that_merges_two_patients_fails_the_gate_naming_the_stale_split_and_validation(
        cohort: Settings) -> None:
    from pipeline.data.ingest import run_ingest

    run_validation(cohort)
    cert = run_split(cohort)
    failed = gate_data(cohort, cert["certificate_sha256"])
    assert failed() == []
    # the source now says two patients are one person: re-ingest
    labels = cohort.raw_dir / "patients.csv"
    rows = pd.read_csv(labels, dtype=str)
    first, second = rows["patient_id"].unique()[:2]
    rows.loc[rows["patient_id"] == second, "patient_id"] = first
    rows.to_csv(labels, index=False)
    run_ingest(cohort, show_progress=False)
    assert read_summary(cohort.dataset_dir)["manifest_sha256"] != cert["manifest_sha256"]

    assert failed() == ["split_manifest_match", "validation_manifest_match"]
    checks = data_checks(cohort.dataset_dir, cert["certificate_sha256"])
    assert any("manifest changed after the split certificate" in p for p in checks.problems), checks.problems
    with pytest.raises(LeakageError, match="manifest changed after the split certificate"):
        verify_certificate(cohort.dataset_dir)  # training refuses the stale split too

    run_validation(cohort)  # validating the new manifest fixes its criterion, not the split's
    assert failed() == ["split_manifest_match"]
    fresh = run_split(cohort)
    assert gate_data(cohort, fresh["certificate_sha256"])() == []
    # a model trained on the old split still does not match the new one
    assert failed() == ["split_certificate_match"]


def test_a_certificate_without_manifest_binding_fails_closed(cohort: Settings) -> None:
    run_validation(cohort)
    run_split(cohort)
    path = cohort.dataset_dir / "split_certificate.json"
    cert = json.loads(path.read_text())
    from pipeline.data.split import _dict_hash

    del cert["manifest_sha256"]  # a certificate written before the binding (re-signed so only that differs)
    cert["certificate_sha256"] = _dict_hash({k: v for k, v in cert.items() if k != "certificate_sha256"})
    path.write_text(json.dumps(cert))
    assert gate_data(cohort, cert["certificate_sha256"])() == ["split_manifest_match"]
    with pytest.raises(LeakageError, match="does not record which manifest"):
        verify_certificate(cohort.dataset_dir)
