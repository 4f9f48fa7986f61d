"""Metrics, operating points and the patient-level bootstrap (pure numpy; milliseconds)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.metrics import (
    batched_confusion,
    batched_paired_delta,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    confusion,
    confusion_counts,
    confusion_matrix,
    multiclass_metrics,
    paired_delta_accuracy,
    paired_delta_auc,
    patient_weights,
    percentile_interval,
)
from pipeline.evaluation.subgroups import batched_auc
from pipeline.monitoring.estimation import interval, joint_confusion, rates


def _clustered(n_patients: int = 40, per_patient: int = 15, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Images of one patient share label and most of their score (as real repeat X-rays do)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n_patients)
    effect = rng.normal(label * 1.0, 1.0)
    patients = np.repeat(np.arange(n_patients), per_patient)
    y = label[patients]
    score = 1 / (1 + np.exp(-(effect[patients] + rng.normal(0, 0.2, len(patients)))))
    return y, score, patients


def _width(ci: list[float]) -> float:
    return ci[1] - ci[0]


def test_bootstrap_cis_are_patient_level_and_wider_than_image_level() -> None:
    y, p, patients = _clustered()
    stat = lambda w: binary_metrics(y, p, 0.5, w=w)  # noqa: E731
    by_patient = bootstrap_ci(stat, patient_weights(patients, 300, seed=1), 0.95)
    by_image = bootstrap_ci(stat, patient_weights(np.arange(len(y)), 300, seed=1), 0.95)
    for key in ("auc", "sensitivity", "specificity", "accuracy"):
        assert _width(by_patient[key]) > 1.8 * _width(by_image[key]), (key, by_patient[key], by_image[key])


def test_patient_weights_draw_whole_patients() -> None:
    patients = np.array(["a", "a", "a", "b", "c", "c"])
    w = patient_weights(patients, 50, seed=3)
    assert w.shape == (50, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    # each resample draws 3 patients (with replacement)
    assert ((w[:, 0] + w[:, 3] + w[:, 4]) == 3).all()
    assert (patient_weights(patients, 50, seed=3) == w).all()  # seeded


@pytest.mark.slow
def test_evaluate_scores_uses_the_patient_bootstrap(make_settings) -> None:
    from pipeline.evaluation.evaluate import Scored, evaluate_scores

    settings = make_settings("evaluate.bootstrap_resamples=300")
    y, p, patients = _clustered(seed=2)
    frame = pd.DataFrame({"patient_id": patients.astype(str), "sex": np.where(patients % 2, "F", "M")})
    scored = Scored(frame, y, p)
    result = evaluate_scores(settings, scored, scored, num_classes=2)
    image_level = bootstrap_ci(lambda w: binary_metrics(y, p, result.operating_point["threshold"], w=w),
                               patient_weights(np.arange(len(y)), 300, settings.base.seed), 0.95)
    assert _width(result.ci["auc"]) > 1.8 * _width(image_level["auc"])
    assert {s["value"] for s in result.slices if s["slice"] == "sex"} == {"F", "M"}


def test_operating_point_policies() -> None:
    y, p, _ = _clustered(seed=4)
    floor = choose_threshold(y, p, "sensitivity_floor", sensitivity_floor=0.9)
    assert floor["val_sensitivity"] >= 0.9
    youden = choose_threshold(y, p, "youden")
    assert youden["val_sensitivity"] + youden["val_specificity"] >= floor["val_sensitivity"] + floor["val_specificity"]
    assert choose_threshold(y, p, "fixed", fixed=0.3)["threshold"] == 0.3
    strict = choose_threshold(y, p, "sensitivity_floor", sensitivity_floor=0.99)
    assert strict["threshold"] <= floor["threshold"] and strict["val_sensitivity"] >= 0.99
    one_class = choose_threshold(np.zeros(5), np.linspace(0, 1, 5), "youden", fixed=0.4)
    assert one_class["threshold"] == 0.4 and "one class" in one_class["reason"]


def test_binary_metrics_at_threshold() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])
    m = binary_metrics(y, p, 0.5)
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75 and m["ppv"] == 0.75 and m["accuracy"] == 0.75
    assert m["auc"] == pytest.approx(0.875)
    assert 0 <= m["ece"] <= 1 and m["brier"] == pytest.approx(np.mean((p - y) ** 2))


def test_multiclass_metrics() -> None:
    y = np.array([0, 1, 2, 2])
    proba = np.eye(3)[[0, 1, 1, 2]]
    m = multiclass_metrics(y, proba)
    assert m["accuracy"] == 0.75 and m["recall_2"] == 0.5 and m["recall_0"] == 1.0
    assert 0 < m["macro_f1"] < 1


def test_paired_delta_auc_is_zero_for_identical_and_positive_for_better() -> None:
    y, p, patients = _clustered(seed=5)
    same = paired_delta_auc(y, p, p, patients, n_resamples=100, seed=0, level=0.95)
    assert same["delta_auc"] == 0 and same["ci"] == [0.0, 0.0]
    noise = np.random.default_rng(0).random(len(y))
    better = paired_delta_auc(y, p, noise, patients, n_resamples=100, seed=0, level=0.95)
    assert better["ci"][0] > 0


def test_paired_delta_accuracy_matches_the_weighted_hit_difference() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 90)
    patients = np.repeat(np.arange(30), 3)
    p_new, p_old = rng.random((90, 3)), rng.random((90, 3))
    p_new[np.arange(90)[:60], y[:60]] += 1  # the new model gets two thirds right for sure
    out = paired_delta_accuracy(y, p_new, p_old, patients, n_resamples=200, seed=7, level=0.9)
    hits = (p_new.argmax(1) == y).astype(float) - (p_old.argmax(1) == y).astype(float)
    w = patient_weights(patients, 200, 7)
    deltas = (w @ hits) / w.sum(axis=1)
    assert out["delta_accuracy"] == pytest.approx(hits.mean(), abs=1e-12)
    assert out["ci"] == pytest.approx([np.quantile(deltas, 0.05), np.quantile(deltas, 0.95)], abs=1e-12)
    assert out["resamples"] == 200 and out["ci"][0] > 0


def test_percentile_interval_drops_non_finite_samples_and_is_nan_when_none_is_left() -> None:
    assert percentile_interval([1.0, 2.0, 3.0, float("nan"), float("inf")], 0.5) == [1.5, 2.5]
    lo, hi = percentile_interval([float("nan")], 0.95)
    assert lo != lo and hi != hi
    assert percentile_interval([], 0.95)[0] != percentile_interval([], 0.95)[0]


def test_confusion_counts_and_matrix() -> None:
    y, pred = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    assert confusion_counts(y, pred) == {"tp": 2, "fn": 1, "tn": 1, "fp": 1}
    assert confusion(y, pred, np.array([2.0, 1, 1, 1, 0])) == {"tp": 2.0, "fn": 1.0, "tn": 1.0, "fp": 1.0}
    assert confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), 3) == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_batched_paired_delta_of_the_batched_auc_equals_the_gates_paired_delta_auc() -> None:
    y, p, patients = _clustered(seed=6)
    p_old = np.clip(p + np.random.default_rng(1).normal(0, 0.2, len(p)), 0, 1)
    gate = paired_delta_auc(y, p, p_old, patients, n_resamples=50, seed=3, level=0.9)
    batched = batched_paired_delta(batched_auc, y, p, p_old, patient_weights(patients, 50, 3), 0.9)
    assert batched["delta"] == pytest.approx(gate["delta_auc"], abs=1e-12) and gate["delta_auc"] != 0
    assert batched["ci"] == pytest.approx(gate["ci"], abs=1e-12) and batched["resamples"] == gate["resamples"] == 50
    assert batched["delta"] == pytest.approx(batched["new"] - batched["old"], abs=0)


def test_batched_confusion_is_the_weighted_confusion_of_each_row() -> None:
    rng = np.random.default_rng(2)
    y, pred = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    w = patient_weights(np.arange(40) // 2, 5, seed=0)
    batched = batched_confusion(y, pred, w)
    for r in range(len(w)):
        assert {cell: float(v[r]) for cell, v in batched.items()} == confusion(y, pred, w[r])
    assert sum(batched.values()).tolist() == w.sum(axis=1).tolist()


def test_monitoring_confusion_and_intervals_are_the_metrics_ones_on_hard_labels() -> None:
    rng = np.random.default_rng(3)
    y, pred = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert (joint_confusion(y, pred) * 50).T.tolist() == confusion_matrix(y, pred, 2)
    c = confusion(y, pred)
    assert rates(y, pred) == (c["tp"] / (c["tp"] + c["fn"]), c["tn"] / (c["tn"] + c["fp"]))
    samples = rng.normal(size=30)
    assert interval(samples, 0.9) == [round(v, 4) for v in percentile_interval(samples, 0.9)]
    assert interval([float("nan")], 0.9) == [None, None]
