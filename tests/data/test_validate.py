"""Great Expectations suite: passes on good data, names failures, never sees patient ids."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.config import Settings, with_overrides
from pipeline.data.validate import run_validation
from pipeline.errors import ValidationFailed


def test_good_manifest_passes_and_writes_docs(cohort: Settings) -> None:
    result = run_validation(cohort)
    assert result["success"] and not result["critical_failures"]
    assert len(result["checks"]) >= 15
    stored = json.loads((cohort.dataset_dir / "validation" / "result.json").read_text())
    assert stored["checks"] == result["checks"]
    assert (cohort.dataset_dir / "validation" / "data_docs" / "index.html").is_file()


def test_critical_failure_stops_with_named_expectation(cohort: Settings) -> None:
    path = cohort.dataset_dir / "manifest.parquet"
    df = pd.read_parquet(path)
    df.loc[df.index[:3], "label"] = "CAT"
    df.to_parquet(path, index=False)
    with pytest.raises(ValidationFailed) as err:
        run_validation(cohort)
    assert "expect_column_values_to_be_in_set(label)" in str(err.value)
    assert "3 unexpected" in str(err.value)


def test_row_count_floor_is_critical(cohort: Settings) -> None:
    with pytest.raises(ValidationFailed, match="expect_table_row_count_to_be_between"):
        run_validation(with_overrides(cohort, ["validate.min_rows=100000"]))


def test_results_and_docs_hold_no_patient_ids(cohort: Settings) -> None:
    run_validation(cohort)
    patients = pd.read_parquet(cohort.dataset_dir / "manifest.parquet")["patient_id"].unique()
    blob = b"".join(p.read_bytes() for p in (cohort.dataset_dir / "validation").rglob("*") if p.is_file())
    assert not [p for p in patients if p.encode() in blob]
