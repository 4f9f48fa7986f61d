"""Platt scaling on validation, folded into the output layer: calibrated probabilities, the same ranking."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.calibration import logit, platt_fit
from pipeline.evaluation.metrics import expected_calibration_error


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def test_platt_fit_recovers_a_known_miscalibration() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20_000)
    y = (rng.random(z.size) < _sigmoid(0.5 * z - 0.3)).astype(int)  # the truth
    a, b = platt_fit(y, _sigmoid(z))  # an overconfident score: logit p = z
    assert a == pytest.approx(-0.3, abs=0.05) and b == pytest.approx(0.5, abs=0.03)
    assert platt_fit(np.zeros(50, int), rng.random(50)) is None  # one class: nothing to fit


def _model_and_validation(seed: int = 0, scale: float = 4.0):
    """A tiny Keras model with the zoo's output head, overconfident on a validation set we make for it."""
    import keras
    import tensorflow as tf

    from pipeline.training.models.cnn import classification_head

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(4,))
    model = keras.Model(inputs, classification_head(keras.layers.Dense(8, activation="relu")(inputs), 2))
    x = np.random.default_rng(seed).normal(size=(600, 4)).astype("float32")
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * scale, bias])  # sharpen: the raw model is overconfident
    p = np.asarray(model(x)).reshape(-1)
    y = (np.random.default_rng(seed + 1).random(p.size) < _sigmoid(logit(p) / scale)).astype("int32")
    return model, x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(64)


def test_calibration_is_folded_into_the_output_layer_and_keeps_the_ranking() -> None:
    from sklearn.metrics import roc_auc_score

    from pipeline.training.calibrate import calibrate_binary

    model, x, y, val = _model_and_validation()
    before = np.asarray(model(x)).reshape(-1)
    record = calibrate_binary(model, val, "platt")
    after = np.asarray(model(x)).reshape(-1)  # the model itself now outputs calibrated probabilities
    assert record["method"] == "platt" and record["b"] == pytest.approx(1 / 4, abs=0.1)
    assert record["val_ece_after"] < record["val_ece_before"] / 2
    assert expected_calibration_error(y, after) == pytest.approx(record["val_ece_after"], abs=1e-4)
    np.testing.assert_allclose(after, _sigmoid(record["a"] + record["b"] * logit(before)), atol=1e-5)
    assert roc_auc_score(y, after) == pytest.approx(roc_auc_score(y, before), abs=1e-9)  # ranking unchanged


def test_none_and_a_fit_against_the_labels_leave_the_model_alone() -> None:
    from pipeline.training.calibrate import calibrate_binary

    model, x, y, val = _model_and_validation(seed=3)
    before = np.asarray(model(x)).reshape(-1)
    assert calibrate_binary(model, val, "none")["method"] == "none"
    import tensorflow as tf

    flipped = tf.data.Dataset.from_tensor_slices((x, 1 - y)).batch(64)  # scores that run against the labels
    record = calibrate_binary(model, flipped, "platt")
    assert record["method"].startswith("skipped") and "slope" in record["method"]
    np.testing.assert_array_equal(np.asarray(model(x)).reshape(-1), before)
