"""Failure analysis: confident errors, error rates by subgroup and quality bin, the shortcut test."""

from __future__ import annotations

import json
import typing
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.config import QualityFeature
from pipeline.data.reader import FEATURE_COLUMNS
from pipeline.evaluation.failures import (
    FailureSpec,
    confident_errors,
    error_rates,
    failure_analysis,
    failure_summary,
    quality_bins,
    region_mask,
    shortcut_test,
)
from pipeline.evaluation.subgroups import OTHER, UNKNOWN

TOP_BAND = {"top_band": [(0.0, 0.0, 1.0, 0.12)]}
CORNERS = {"corners": [(0.0, 0.0, 0.16, 0.16), (0.84, 0.0, 1.0, 0.16), (0.0, 0.84, 0.16, 1.0),
                       (0.84, 0.84, 1.0, 1.0)]}


def spec(**kw: typing.Any) -> FailureSpec:
    base = dict(top_k=5, attributes=["site", "sex"], quality_features=["mean", "sharpness"], quality_bins=4,
                min_patients=10, n_resamples=200, seed=0, level=0.95, masks={**TOP_BAND, **CORNERS},
                shuffle_within_site=True, auc_drop_alert=0.05)
    return FailureSpec(**{**base, **kw})


def cohort(n_patients: int = 120, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Two images per patient; three sites, one of them a 4-patient site (pooled into ``other``)."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_patients), 2)
    label = (rng.random(n_patients) < 0.4).astype(int)[patients]
    site = np.where(np.arange(n_patients) < 4, "site-rare", np.where(np.arange(n_patients) % 2, "site-A", "site-B"))
    frame = pd.DataFrame({
        "image_id": [f"{i:016x}" for i in rng.integers(0, 2**62, len(patients))],
        "path": [f"images/ab/IMG-{i:06d}.png" for i in range(len(patients))],
        "patient_id": [f"PAT-{i:05d}" for i in patients],
        "label": np.where(label == 1, "PNEUMONIA", "NORMAL"),
        "site": site[patients], "sex": np.where(patients % 3, "F", "M"),
        "mean": rng.normal(0.4, 0.05, len(patients)).astype(np.float32),
        "sharpness": rng.gamma(2.0, 1.0, len(patients)).astype(np.float32),
    })
    p = 1 / (1 + np.exp(-(2.0 * (2 * label - 1) + rng.normal(0, 2.0, len(patients)))))
    return frame, label, p


# --------------------------------------------------------------------------- confident errors


def test_confident_errors_are_ordered_by_confidence_and_capped_at_k() -> None:
    frame, y, p = cohort()
    errors = confident_errors(frame, y, p, 0.5, spec(top_k=5))
    fp, fn = errors["false_positives"], errors["false_negatives"]
    assert len(fp) == 5 and len(fn) == 5
    all_fp = np.sort(p[(y == 0) & (p >= 0.5)])[::-1]
    all_fn = np.sort(p[(y == 1) & (p < 0.5)])
    assert [r["probability"] for r in fp] == pytest.approx(all_fp[:5], abs=1e-4)
    assert [r["probability"] for r in fn] == pytest.approx(all_fn[:5], abs=1e-4)
    assert {r["label"] for r in fp} == {"NORMAL"} and {r["label"] for r in fn} == {"PNEUMONIA"}
    assert all(r["probability"] >= 0.5 for r in fp) and all(r["probability"] < 0.5 for r in fn)
    by_id = frame.set_index("image_id")
    for r in fp + fn:
        assert set(r) == {"image_id", "probability", "label", "subgroups", "quality"}
        assert set(r["subgroups"]) == {"site", "sex"} and set(r["quality"]) == {"mean", "sharpness"}
        assert r["quality"]["mean"] == pytest.approx(float(by_id.loc[r["image_id"], "mean"]), abs=1e-4)
    assert confident_errors(frame, y, p, 0.5, spec(top_k=0)) == {"false_positives": [], "false_negatives": []}


def test_no_identifier_other_than_image_id_reaches_the_report() -> None:
    frame, y, p = cohort()
    report = failure_analysis(frame, y, p, 0.5, spec(top_k=50))
    text = json.dumps(report)
    assert "PAT-" not in text and "IMG-" not in text and "images/" not in text
    assert "site-rare" not in text  # a 4-patient site is pooled into "other", also on the error rows
    listed = [r["subgroups"]["site"] for rows in report["confident_errors"].values() for r in rows]
    assert set(listed) <= {"site-A", "site-B", OTHER}
    ids = {r["image_id"] for rows in report["confident_errors"].values() for r in rows}
    assert ids and ids <= set(frame["image_id"])


# --------------------------------------------------------------------------- error rates


def test_error_rates_match_counts_and_their_patient_level_intervals_hold_them() -> None:
    frame, y, p = cohort()
    rates = error_rates(frame, y, p, 0.5, spec())
    overall = rates["overall"]
    pred = p >= 0.5
    assert overall["fp_rate"] == pytest.approx((pred & (y == 0)).sum() / (y == 0).sum(), abs=1e-4)
    assert overall["fn_rate"] == pytest.approx((~pred & (y == 1)).sum() / (y == 1).sum(), abs=1e-4)
    sites = {r["group"]: r for r in rates["subgroups"] if r["attribute"] == "site"}
    assert set(sites) == {"site-A", "site-B", OTHER} and sites[OTHER]["patients"] == 4
    for row in rates["subgroups"] + [overall]:
        for key in ("fp_rate", "fn_rate"):
            lo, hi = row[f"{key}_ci"]
            assert 0 <= lo <= row[key] <= hi <= 1
    assert sum(r["images"] for r in sites.values()) == len(y)
    assert sum(r["false_positives"] for r in sites.values()) == overall["false_positives"]


def test_quality_bins_are_quantiles_and_small_bins_are_merged_into_a_neighbour() -> None:
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(40), 2).astype(str)
    values = rng.normal(size=80)
    labels, merges = quality_bins(values, patients, bins=4, min_patients=5)
    assert merges == 0 and len(set(labels)) == 4  # ~10 patients per quartile
    counts = pd.Series(patients).groupby(labels).nunique()
    assert (counts >= 5).all()
    labels, merges = quality_bins(values, patients, bins=4, min_patients=25)
    groups = pd.Series(patients).groupby(labels).nunique()
    assert merges >= 1 and len(groups) < 4 and (groups >= 25).all()
    spans = sorted(tuple(map(float, g.strip("[]").split(", "))) for g in groups.index)
    assert all(a[1] == pytest.approx(b[0], rel=1e-3) for a, b in zip(spans, spans[1:], strict=False))  # contiguous
    assert spans[0][0] == pytest.approx(values.min(), rel=1e-3) and spans[-1][1] == pytest.approx(values.max(),
                                                                                                    rel=1e-3)
    labels, _ = quality_bins(values, patients, bins=4, min_patients=1000)
    assert len(set(labels)) == 1  # one bin remains when no split has enough patients
    constant, _ = quality_bins(np.ones(80), patients, bins=4, min_patients=5)
    assert set(constant) == {"[1, 1]"}
    with_nan = values.copy()
    with_nan[:6] = np.nan
    assert (quality_bins(with_nan, patients, 4, 5)[0][:6] == UNKNOWN).all()


def test_error_rates_by_quality_bin_find_where_the_model_fails() -> None:
    frame, y, p = cohort(n_patients=200)
    blurry = frame["sharpness"].to_numpy() < np.quantile(frame["sharpness"], 0.25)
    p = np.where(blurry, 1 - p, p)  # the model is wrong on the least sharp quarter
    rates = error_rates(frame, y, p, 0.5, spec())
    bins = [r for r in rates["quality"] if r["attribute"] == "sharpness"]
    assert len(bins) == 4 and rates["quality_merges"]["sharpness"] == 0
    assert bins[0]["fn_rate"] > 0.5 and bins[0]["fp_rate"] > 0.5  # ordered by value: the least sharp bin first
    assert all(b["fn_rate_ci"][1] < bins[0]["fn_rate_ci"][0] for b in bins[1:])
    summary = failure_summary(failure_analysis(frame, y, p, 0.5, spec()))
    assert summary["highest_fn_rate"][0]["attribute"] == "sharpness"


# --------------------------------------------------------------------------- shortcut test


def region_reader(size: int, rows: tuple[int, int], cols: tuple[int, int]) -> typing.Any:
    """A Keras model (constructed, not trained) whose output is sigmoid(10·(mean of one region) − 5)."""
    import keras

    inputs = keras.Input((size, size, 1))
    x = keras.layers.Cropping2D(((rows[0], size - rows[1]), (cols[0], size - cols[1])))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(x))
    dense.set_weights([np.array([[10.0]]), np.array([-5.0])])
    return model


def band_cohort(n: int = 160, size: int = 32) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Noise images where both the top band (rows 1–2, a 'portable bar') and a central blob encode the label."""
    rng = np.random.default_rng(0)
    y = (rng.random(n) < 0.5).astype(int)
    images = rng.uniform(0.3, 0.5, (n, size, size, 1)).astype(np.float32)
    images[:, 1:3, 8:24] += 0.4 * y[:, None, None, None]
    images[:, 12:20, 12:20] += (0.3 * y + rng.normal(0, 0.05, n))[:, None, None, None]
    frame = pd.DataFrame({"patient_id": [f"PAT-{i}" for i in range(n)], "site": np.where(np.arange(n) % 2, "A", "B")})
    return images, frame, y


def _predict(model: typing.Any) -> typing.Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.asarray(model.predict(x, batch_size=64, verbose=0))[:, 0]


@pytest.mark.slow
def test_a_model_that_reads_only_the_masked_band_loses_its_auc_and_is_flagged() -> None:
    images, frame, y = band_cohort()
    before = images.copy()
    band_model = _predict(region_reader(32, (1, 3), (8, 24)))
    p = band_model(images)
    result = shortcut_test(band_model, images, frame, y, p, 0.5, spec())
    assert np.array_equal(images, before)  # restored after each re-scoring
    assert result["auc"] == pytest.approx(1.0)
    band = result["masks"]["top_band"]
    assert band["mask"]["auc"] == pytest.approx(0.5, abs=0.01)  # one constant in the region: every score ties
    assert band["mask"]["delta_auc"] == pytest.approx(-0.5, abs=0.01)
    assert band["mask"]["delta_auc_ci"][1] < -0.4 and band["mask"]["flagged"]
    assert band["shuffle_within_site"]["auc"] == pytest.approx(0.5, abs=0.15) and band["shuffle_within_site"]["flagged"]
    assert band["mask"]["sensitivity"] in (0.0, 1.0)
    assert not result["masks"]["corners"]["mask"]["flagged"]  # the band's centre is outside the corners
    assert "top_band/mask" in result["flagged"] and "corners/mask" not in result["flagged"]


@pytest.mark.slow
def test_a_model_that_ignores_the_band_is_not_flagged() -> None:
    images, frame, y = band_cohort()
    blob_model = _predict(region_reader(32, (12, 20), (12, 20)))
    p = blob_model(images)
    result = shortcut_test(blob_model, images, frame, y, p, float(np.median(p)), spec())
    assert result["auc"] > 0.95 and result["flagged"] == []
    for entry in result["masks"].values():
        for variant in ("mask", "shuffle_within_site"):
            assert entry[variant]["delta_auc"] == pytest.approx(0.0, abs=1e-6)
            assert entry[variant]["delta_auc_ci"] == [pytest.approx(0.0, abs=1e-6)] * 2
            assert entry[variant]["mean_abs_score_change"] == pytest.approx(0.0, abs=1e-6)


def test_region_masks_cover_the_synthetic_portable_bar_and_laterality_markers() -> None:
    for s in (64, 128, 224):
        band = region_mask(s, s, TOP_BAND["top_band"])
        h, w = max(2, s // 40), max(6, s // 6)  # pipeline.data.synthetic: where the realistic preset's bar sits
        assert band[s // 20:s // 20 + h, s // 2 - w // 2:s // 2 + w // 2].all()
        corners = region_mask(s, s, CORNERS["corners"])
        size, pad = max(3, s // 18), max(2, s // 16)  # the laterality marker glyph
        for y0 in (pad, s - pad - size):
            for x0 in (pad, s - pad - size):
                assert corners[y0:y0 + size, x0:x0 + size].all()


# --------------------------------------------------------------------------- settings, summary, card


def test_quality_features_of_config_and_manifest_agree_and_params_hold_the_defaults(make_settings) -> None:
    assert set(typing.get_args(QualityFeature)) == set(FEATURE_COLUMNS)
    settings = make_settings()
    fs = FailureSpec.from_settings(settings)
    assert set(fs.masks) == {"top_band", "corners"} and fs.quality_bins >= 2 and fs.top_k > 0
    with pytest.raises(Exception, match="x0 < x1"):
        make_settings("evaluate.shortcut_masks={bad: [[0.5, 0, 0.2, 1]]}")


def test_summary_and_model_card_section() -> None:
    from pipeline.registry import modelcard

    frame, y, p = cohort()
    report = failure_analysis(frame, y, p, 0.5, spec())
    report["shortcut"] = {"alert_drop": 0.05, "flagged": ["top_band/mask"], "masks": {"top_band": {
        "mask": {"auc": 0.5, "sensitivity": 0.0, "delta_auc": -0.4, "delta_auc_ci": [-0.5, -0.3], "flagged": True}}}}
    summary = failure_summary(report)
    assert summary["artifact"] == "evaluation/failure_analysis.json"
    assert len(summary["highest_fp_rate"]) == 3 and summary["shortcut"]["flagged"] == ["top_band/mask"]
    card = modelcard._failures(SimpleNamespace(evaluation=json.loads(json.dumps({"failure_analysis": summary}))))
    assert "## Failure analysis" in card and "**SHORTCUT**" in card and "PAT-" not in card
    assert "| top_band | mask | 0.500 |" in card
    assert modelcard._failures(SimpleNamespace(evaluation={})) == ""
    inputs = SimpleNamespace(evaluation=json.loads(json.dumps({"failure_analysis": summary})), slices=[],
                             record=SimpleNamespace(export=SimpleNamespace(onnx=None)), data_source="", summary={})
    assert "Shortcut suspected" in modelcard._limitations(inputs) and "top_band/mask" in modelcard._limitations(inputs)


@pytest.mark.slow
def test_real_evaluate_path_writes_the_summary_and_logs_the_report(cohort) -> None:
    """Tiny cohort → split → train (2 epochs) → run_evaluate: metrics.json holds the summary, MLflow the report."""
    import mlflow

    from pipeline.data.split import run_split
    from pipeline.data.validate import run_validation
    from pipeline.evaluation.evaluate import METRICS_FILE, run_evaluate
    from pipeline.training.train import run_train

    settings = cohort
    run_validation(settings)
    run_split(settings)
    trained = run_train(settings)
    result = run_evaluate(settings, trained)
    metrics = json.loads((settings.model_dir / METRICS_FILE).read_text())
    summary = metrics["failure_analysis"]
    assert summary["shortcut"]["status"] == "run" and set(summary["shortcut"]["masks"]) == {"top_band", "corners"}
    for variants in summary["shortcut"]["masks"].values():
        assert set(variants) == {"mask", "shuffle_within_site"}
    report = mlflow.artifacts.load_dict(f"runs:/{trained.run_id}/evaluation/failure_analysis.json")
    assert report == json.loads(json.dumps(result.failures))
    ids = set(result.test.frame["image_id"])
    assert {r["image_id"] for rows in report["confident_errors"].values() for r in rows} <= ids
    text = json.dumps(report)
    assert not any(pid in text for pid in result.test.frame["patient_id"]) and "images/" not in text
    assert {r["attribute"] for r in report["error_rates"]["quality"]} == set(settings.evaluate.quality_features)
