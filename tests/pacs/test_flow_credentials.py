"""A PACS URL with credentials never becomes a Prefect flow-run parameter (Prefect stores and shows them)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.pacs import records


@pytest.mark.parametrize("dispatch", ["flow", "deployment"])
def test_a_url_with_credentials_is_refused_before_anything_is_handed_over(
        make_settings: Callable[..., Settings], tmp_path, dispatch: str) -> None:
    from flows.pacs import run_flow, submit_deployment_run

    settings = make_settings(f"pacs.state_dir={tmp_path / 'pacs'}", "pacs.deployment=xrayops-pacs-inference/pacs")
    call = run_flow if dispatch == "flow" else submit_deployment_run
    with pytest.raises(ConfigError) as err:
        call(settings, "1.2.3.4", "http://reader:s3cret@127.0.0.1:9/dicom-web", None, [])
    assert "s3cret" not in str(err.value) and "credentials" in str(err.value)
    assert "XRAYOPS_PACS_PASSWORD" in (err.value.hint or "")
    assert not (records.state_dir(settings) / "pending").exists() or not any(
        (records.state_dir(settings) / "pending").iterdir()), "nothing handed over"


def test_has_credentials() -> None:
    from pipeline.connections import has_credentials

    assert has_credentials("http://u:p@h/x") and has_credentials("http://u@h/x")
    assert not has_credentials("http://h:8042/dicom-web") and not has_credentials(None)


def test_records_with_empty_columns_read_back_without_a_pandas_warning(
        make_settings: Callable[..., Settings], tmp_path, recwarn: pytest.WarningsRecorder) -> None:
    """An outcome without a request id or model (error, study_unknown) next to a stored SR: one frame, no warning."""
    import warnings
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    settings = make_settings(f"pacs.state_dir={tmp_path / 'pacs'}")
    failed = {"status": "error", "request_id": None, "model_version": None, "reason": "ValueError", "probability": None}
    stored = {"status": "sr_stored", "request_id": "r1", "model_version": "3", "reason": None, "probability": 0.83}
    for k, row in enumerate((failed, stored)):
        records.append_record(settings, {"processed_at": now + timedelta(seconds=k), "event": "pacs_result",
                                         "study_ref": f"S{k}", **row})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = records.read_records(settings)
    assert list(df["status"]) == ["error", "sr_stored"] and df["request_id"].isna().tolist() == [True, False]
    assert {"model_version", "reason"} <= set(df.columns) and df["probability"].dtype == float
