"""Subgroup performance, calibration slope/intercept and decision curves (pure numpy; well under a second each)."""

from __future__ import annotations

import json
import typing
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.config import SubgroupAttribute
from pipeline.evaluation.calibration import calibration_fit, decision_curve, net_benefit
from pipeline.evaluation.metrics import binary_metrics
from pipeline.evaluation.subgroups import (
    OTHER,
    SUBGROUP_ATTRIBUTES,
    UNKNOWN,
    SubgroupSpec,
    batched_binary_metrics,
    rows_of,
    subgroup_auc,
    subgroup_table,
)

SPEC = SubgroupSpec(["site", "sex"], min_patients=10, n_resamples=200, seed=0, level=0.95)


def cohort(seed: int = 0, bad_site: str = "site-C") -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Three sites of 60 patients (2 images each); the model separates the classes well except at ``bad_site``,
    where its scores are noise."""
    rng = np.random.default_rng(seed)
    sites = np.repeat(["site-A", "site-B", "site-C"], 60)
    label = rng.random(len(sites)) < 0.4
    good = np.where(label, rng.normal(3.0, 1.0, len(sites)), rng.normal(-3.0, 1.0, len(sites)))
    logit = np.where(sites == bad_site, rng.normal(-1.0, 1.0, len(sites)), good)
    patients = np.repeat(np.arange(len(sites)), 2)
    frame = pd.DataFrame({"patient_id": [f"PAT-{i:05d}" for i in patients], "site": sites[patients],
                          "sex": np.where(patients % 2, "F", "M"), "path": [f"images/IMG-{i:06d}.png"
                                                                             for i in range(len(patients))]})
    p = 1 / (1 + np.exp(-(logit[patients] + rng.normal(0, 0.3, len(patients)))))
    return frame, label[patients].astype(int), p


def by_group(table: dict, attribute: str) -> dict[str, dict]:
    return {r["group"]: r for r in rows_of(table, attribute)}


def test_a_site_where_the_model_fails_has_a_low_sensitivity_interval_and_the_others_do_not() -> None:
    frame, y, p = cohort()
    sites = by_group(subgroup_table(frame, y, p, 0.5, SPEC), "site")
    assert set(sites) == {"site-A", "site-B", "site-C"}
    bad, good = sites["site-C"], [sites["site-A"], sites["site-B"]]
    assert bad["ci"]["sensitivity"][0] < 0.4 and bad["metrics"]["auc"] < 0.75
    for row in good:
        assert row["ci"]["sensitivity"][0] > 0.75 and row["metrics"]["auc"] > 0.95
        assert row["patients"] == 60 and row["images"] == 120
        lo, hi = row["ci"]["auc"]
        assert lo <= row["metrics"]["auc"] <= hi
    assert set(bad["metrics"]) == set(bad["ci"]) >= {"auc", "sensitivity", "specificity", "ppv", "npv", "ece",
                                                     "brier", "calibration_slope", "calibration_intercept"}


def test_point_estimates_match_binary_metrics_with_ties_and_weights() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300), 1)  # many ties
    w = rng.integers(0, 3, 300).astype(float)
    batched = batched_binary_metrics(y, p, 0.5, w[None, :])
    reference = binary_metrics(y, p, 0.5, w=w)
    for key in ("auc", "sensitivity", "specificity", "ppv", "npv", "ece", "brier"):
        assert batched[key][0] == pytest.approx(reference[key], abs=1e-12), key


def test_small_categories_are_pooled_into_other_and_missing_values_are_unknown() -> None:
    frame, y, p = cohort()
    manufacturer = np.where(frame["site"] == "site-A", "Acme", "Borealis").astype(object)
    rare = frame["patient_id"].isin([f"PAT-{i:05d}" for i in range(3)])  # 3 patients of a rare scanner
    rarer = frame["patient_id"].isin([f"PAT-{i:05d}" for i in range(3, 5)])
    manufacturer[rare.to_numpy()], manufacturer[rarer.to_numpy()] = "RareCo X1", "Tiny Corp"
    manufacturer[frame["patient_id"].isin([f"PAT-{i:05d}" for i in range(100, 130)]).to_numpy()] = None
    frame["manufacturer"] = manufacturer
    spec = SubgroupSpec(["manufacturer"], min_patients=10, n_resamples=50, seed=0, level=0.95)
    table = subgroup_table(frame, y, p, 0.5, spec)
    groups = by_group(table, "manufacturer")
    assert set(groups) == {"Acme", "Borealis", OTHER, UNKNOWN}
    assert groups[OTHER]["patients"] == 5 and groups[OTHER]["pooled_categories"] == 2
    assert groups[UNKNOWN]["patients"] == 30
    assert table["attributes"]["manufacturer"] == {"column": "manufacturer", "groups": 4, "pooled_categories": 2}
    text = json.dumps(table)
    assert "RareCo" not in text and "Tiny Corp" not in text  # pooled categories are counted, never named


def test_no_patient_or_image_identifier_reaches_the_output() -> None:
    frame, y, p = cohort()
    text = json.dumps(subgroup_table(frame, y, p, 0.5, SPEC))
    assert "PAT-" not in text and "IMG-" not in text and "images/" not in text
    assert set(by_group(json.loads(text), "sex")) == {"F", "M"}


def test_absent_columns_are_skipped_and_site_falls_back_to_source() -> None:
    frame, y, p = cohort()
    spec = SubgroupSpec(["site", "manufacturer", "view", "age_band"], 10, 20, 0, 0.95)
    sources = frame.drop(columns="site").assign(source="nih-cxr14", site=None)  # site column empty: use source
    table = subgroup_table(sources, y, p, 0.5, spec)
    assert table["attributes"]["site"]["column"] == "source"
    assert [r["group"] for r in rows_of(table, "site")] == ["nih-cxr14"]
    for attribute in ("manufacturer", "view", "age_band"):
        assert "skipped" in table["attributes"][attribute] and not rows_of(table, attribute)


def test_subgroup_attributes_of_config_and_library_agree() -> None:
    assert set(typing.get_args(SubgroupAttribute)) == set(SUBGROUP_ATTRIBUTES)


def test_subgroup_auc_groups_like_the_table() -> None:
    frame, y, p = cohort()
    table = subgroup_table(frame, y, p, 0.5, SPEC)
    assert subgroup_auc(frame, y, p, "site", 10) == {g: r["metrics"]["auc"] for g, r in by_group(table, "site").items()}
    assert subgroup_auc(frame.drop(columns="site"), y, p, "site", 10) == {}


# --------------------------------------------------------------------------- calibration


def _bernoulli(p: np.ndarray, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(len(p)) < p).astype(int)


def test_calibrated_scores_have_slope_one_and_intercept_zero() -> None:
    p = 1 / (1 + np.exp(-np.random.default_rng(0).normal(0, 1.5, 20000)))
    fit = calibration_fit(_bernoulli(p, 1), p)
    assert fit["calibration_slope"][0] == pytest.approx(1.0, abs=0.06)
    assert fit["calibration_intercept"][0] == pytest.approx(0.0, abs=0.05)


def test_overconfident_scores_have_slope_below_one_and_overestimated_risk_a_negative_intercept() -> None:
    true_logit = np.random.default_rng(0).normal(0, 1.0, 20000)
    y = _bernoulli(1 / (1 + np.exp(-true_logit)), 1)
    overconfident = 1 / (1 + np.exp(-2.0 * true_logit))  # scores twice as extreme as the truth
    assert calibration_fit(y, overconfident)["calibration_slope"][0] == pytest.approx(0.5, abs=0.05)
    too_high = 1 / (1 + np.exp(-(true_logit + 1.0)))
    assert calibration_fit(y, too_high)["calibration_intercept"][0] == pytest.approx(-1.0, abs=0.06)


def test_calibration_slope_is_nan_when_not_estimable() -> None:
    p = np.linspace(0.01, 0.99, 50)
    assert np.isnan(calibration_fit((p > 0.5).astype(int), p)["calibration_slope"][0])  # separated
    assert np.isnan(calibration_fit(np.ones(50, int), p)["calibration_slope"][0])  # one class


# --------------------------------------------------------------------------- decision curve


def test_net_benefit_matches_a_hand_computed_example() -> None:
    y = np.array([1, 1, 0, 0, 1])
    p = np.array([0.9, 0.6, 0.7, 0.2, 0.1])
    # t = 0.5: treated 0.9 (TP), 0.6 (TP), 0.7 (FP) → 2/5 − 1/5 · 0.5/0.5 = 0.2
    assert net_benefit(y, p, 0.5) == pytest.approx(0.2)
    # t = 0.25: same three treated → 2/5 − 1/5 · (1/3) = 1/3
    assert net_benefit(y, p, 0.25) == pytest.approx(1 / 3)
    # t = 0.8: only 0.9 (TP) → 1/5
    assert net_benefit(y, p, 0.8) == pytest.approx(0.2)
    curve = decision_curve(y, p, np.array([0.25, 0.5, 0.8]), operating_threshold=0.5)
    assert curve["model"] == pytest.approx([1 / 3, 0.2, 0.2])
    # treat all: prevalence 0.6 − 0.4 · t/(1−t)
    assert curve["treat_all"] == pytest.approx([0.6 - 0.4 / 3, 0.2, 0.6 - 0.4 * 4])
    assert curve["treat_none"] == [0.0, 0.0, 0.0]
    assert curve["operating_point"] == {"threshold": 0.5, "net_benefit": pytest.approx(0.2)}
    assert decision_curve(y, p)["thresholds"][:3] == [0.01, 0.02, 0.03] and len(decision_curve(y, p)["model"]) == 99


# --------------------------------------------------------------------------- through evaluate_scores + the card


def test_evaluate_scores_reports_subgroups_calibration_fit_decision_curve_and_threshold_derivation(
        make_settings) -> None:
    from pipeline.evaluation.evaluate import Scored, evaluate_scores
    from pipeline.evaluation.plots import evaluation_figures
    from pipeline.registry import modelcard

    settings = make_settings("evaluate.bootstrap_resamples=50", "evaluate.gradcam_examples=0")
    frame, y, p = cohort()
    half = frame["patient_id"].str[-1].isin(list("02468")).to_numpy()
    val, test = Scored(frame[half], y[half], p[half]), Scored(frame[~half].reset_index(drop=True), y[~half], p[~half])
    result = evaluate_scores(settings, val, test, num_classes=2)

    op = result.operating_point
    assert op["derived_on"] == "validation" and op["criterion"] == op["reason"]
    assert op["validation_images"] == int(half.sum()) and op["validation_patients"] == 90
    assert op["parameters"] == {"sensitivity_floor": settings.evaluate.sensitivity_floor}
    assert {"calibration_slope", "calibration_intercept"} <= set(result.metrics) & set(result.ci)
    assert result.decision_curve["operating_point"]["threshold"] == op["threshold"]
    assert {r["group"] for r in rows_of(result.subgroups, "site")} == {"site-A", "site-B", "site-C"}
    dumped = json.dumps(result.to_json())
    assert "PAT-" not in dumped and '"subgroups"' in dumped and '"decision_curve"' in dumped
    assert "decision_curve" in evaluation_figures(result, val)

    card = modelcard._subgroups(SimpleNamespace(evaluation=json.loads(dumped)))
    assert "## Subgroup performance" in card and "| site | site-C |" in card and "PAT-" not in card
    assert "Not reported: manufacturer:" in card  # the cohort has no manufacturer column
    calibration = modelcard._calibration(SimpleNamespace(evaluation=json.loads(dumped)))
    assert "slope" in calibration and "Net benefit at the locked threshold" in calibration
