"""The drift report on feature frames: verdicts from test status on both sides of Evidently's
1,000-row method switch, prediction drift, data quality, not-enough-data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.monitoring.drift import DRIFT_FEATURES, drift_report, summary_markdown


def frame(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    """Production-log-like rows; ``shift`` brightens images and moves embeddings and outputs."""
    rng = np.random.default_rng(seed)
    mean = np.clip(rng.normal(0.45 + 0.15 * shift, 0.05, n), 0, 1)
    df = pd.DataFrame({
        "mean": mean, "std": np.clip(rng.normal(0.2 - 0.05 * shift, 0.02, n), 0, 1),
        "p05": np.clip(mean - 0.3, 0, 1), "p50": mean, "p95": np.clip(mean + 0.3, 0, 1),
        "contrast": np.clip(rng.normal(0.6, 0.05, n), 0, 1), "entropy": rng.normal(7.0, 0.2, n),
        "sharpness": rng.normal(5.0 + 3 * shift, 1.0, n), "width": 64.0, "height": 64.0, "aspect": 1.0,
        "bit_depth": 8.0,
    })
    for i in range(4):
        df[f"emb_pc{i + 1}"] = rng.normal(shift * (2.0 if i < 2 else 0.0), 1.0, n)
    p = np.clip(rng.beta(2, 5, n) + 0.3 * shift, 0, 1)
    df["probability"] = p
    df["predicted_positive"] = (p >= 0.4).astype(float)
    return df


@pytest.mark.parametrize(("ref_n", "cur_n", "method"), [pytest.param(400, 300, "K-S p_value", marks=pytest.mark.slow),
                                                        pytest.param(1500, 1200, "Wasserstein distance (normed)",
                                                                     marks=pytest.mark.slow)])
def test_drift_only_on_the_shifted_window_on_both_sides_of_the_method_switch(
        tmp_path: Path, ref_n: int, cur_n: int, method: str) -> None:
    reference = frame(ref_n, 1)
    same = drift_report(reference, frame(cur_n, 2), tmp_path / "same", share_threshold=0.3, min_rows=30)
    shifted = drift_report(reference, frame(cur_n, 3, shift=1.0), tmp_path / "shifted", share_threshold=0.3,
                           min_rows=30)
    assert same["method"] == shifted["method"] == [method]
    assert not same["drift_detected"] and same["drift_share"] <= 0.3
    assert shifted["drift_detected"] and shifted["drift_share"] > 0.3
    assert {"mean", "p50", "emb_pc1", "emb_pc2"} <= set(shifted["drifted_columns"])
    assert "emb_pc4" not in shifted["drifted_columns"] and "contrast" not in shifted["drifted_columns"]
    # constant geometry and bit depth are not tested; the prediction columns are reported apart
    assert set(shifted["columns"]) == set(DRIFT_FEATURES) - {"width", "height", "aspect"} | {
        f"emb_pc{i}" for i in range(1, 5)}
    assert shifted["prediction"]["probability"]["drifted"] and shifted["prediction"]["positive_rate"]["drifted"]
    assert not same["prediction"]["drift_detected"]
    for out in ("same", "shifted"):
        assert (tmp_path / out / "report.html").stat().st_size > 10_000
        saved = json.loads((tmp_path / out / "summary.json").read_text())
        assert saved["status"] == "ok" and json.loads((tmp_path / out / "report.json").read_text())["tests"]
    assert "DRIFT DETECTED" in summary_markdown({**shifted, "model_name": "m", "model_version": "1"})


def test_not_enough_rows_gives_no_verdict_and_no_report(tmp_path: Path) -> None:
    summary = drift_report(frame(400, 1), frame(12, 2, shift=2.0), tmp_path, share_threshold=0.3, min_rows=30)
    assert summary["status"] == "insufficient_data" and summary["drift_share"] is None
    assert not summary["drift_detected"] and "not enough data" in summary["message"]
    assert not (tmp_path / "report.html").exists() and (tmp_path / "summary.json").is_file()
    assert "Not enough data" in summary_markdown(summary)


@pytest.mark.slow
def test_data_quality_flags_missing_and_out_of_range_values(tmp_path: Path) -> None:
    current = frame(200, 2)
    current.loc[:9, "mean"] = 1.7
    current.loc[10:14, "probability"] = np.nan
    summary = drift_report(frame(400, 1), current, tmp_path, share_threshold=0.3, min_rows=30)
    failed = " ".join(summary["data_quality"]["failed"])
    assert not summary["data_quality"]["ok"] and "mean" in failed and "probability" in failed
    clean = drift_report(frame(400, 1), frame(200, 3), tmp_path / "clean", share_threshold=0.3, min_rows=30)
    assert clean["data_quality"]["ok"] and clean["data_quality"]["passed"] > 10
