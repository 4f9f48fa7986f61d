"""Training building blocks: class weights, loss and metric names, hardware roles, resumable callback state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.training.hardware import setup_hardware, worker_role
from pipeline.training.train import class_weights, compile_model, monitor_metric, run_fingerprint


def test_class_weights_are_inverse_frequency() -> None:
    weights = class_weights(np.array([0, 0, 0, 1]), 2)
    assert weights == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}
    assert class_weights(np.array([0, 1, 2, 2]), 3)[2] == pytest.approx(4 / 6)


@pytest.mark.slow
def test_binary_metrics_have_stable_names_and_focal_loss(make_settings: Callable[..., Settings]) -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    compile_model(model, make_settings("train.loss=focal"), num_classes=2)
    assert isinstance(model.loss, keras.losses.BinaryFocalCrossentropy)
    logs = model.fit(np.random.rand(8, 4), np.array([0, 1] * 4, np.float32), validation_split=0.5, verbose=0)
    assert {"auc", "pr_auc", "precision", "recall", "accuracy", "val_auc", "val_pr_auc"} <= set(logs.history)
    assert monitor_metric(2) == "val_auc" and monitor_metric(10) == "val_accuracy"
    compile_model(model, make_settings("train.xla=true"), num_classes=2)
    assert model.jit_compile is True


def test_run_fingerprint_changes_with_train_config_and_data(make_settings: Callable[..., Settings]) -> None:
    data = {"dvc_md5": "abc", "split_certificate": "x"}
    a = run_fingerprint(make_settings(), data)
    assert a == run_fingerprint(make_settings(), data)
    assert a != run_fingerprint(make_settings("train.epochs=3"), data)
    assert a != run_fingerprint(make_settings(), {**data, "dvc_md5": "abd"})


def test_worker_roles_from_tf_config() -> None:
    cluster = {"worker": ["h:1", "h:2"]}
    assert worker_role("") == "chief"
    assert worker_role(json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}})) == "chief"
    assert worker_role(json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})) == "worker-1"
    with_chief = {**cluster, "chief": ["h:0"]}
    assert worker_role(json.dumps({"cluster": with_chief, "task": {"type": "worker", "index": 0}})) == "worker-0"


def test_cpu_hardware_defaults_and_forced_mixed_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    try:
        hw = setup_hardware("auto")
        assert (hw.kind, hw.replicas, hw.mixed_precision, hw.is_chief) == ("cpu", 1, False, True)
        assert keras.mixed_precision.global_policy().name == "float32"
        assert setup_hardware("on").mixed_precision
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_resumable_state_restores_patience_and_best_weights(tmp_path: Path) -> None:
    from pipeline.training.callbacks import ResumableState

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    best_path = tmp_path / "best.weights.h5"
    model.save_weights(best_path)
    best = [w.copy() for w in model.get_weights()]

    stopper = keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=5, restore_best_weights=True)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max")
    stopper.wait, stopper.best, stopper.best_epoch, plateau.wait, plateau.best = 2, 0.8, 1, 1, 0.8
    saver = ResumableState(tmp_path / "state.json", [stopper, plateau], best_path)
    saver.set_model(model)
    saver.on_epoch_end(3)

    model.set_weights([w + 1 for w in model.get_weights()])  # later, worse weights; then a kill and a restart
    model._initial_epoch = 4
    fresh_stop = keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=5, restore_best_weights=True)
    fresh_plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max")
    fresh_stop.set_model(model)
    fresh_stop.on_train_begin()
    restorer = ResumableState(tmp_path / "state.json", [fresh_stop, fresh_plateau], best_path)
    restorer.set_model(model)
    restorer.on_train_begin()
    assert (fresh_stop.wait, fresh_stop.best, fresh_stop.best_epoch) == (2, 0.8, 1)
    assert (fresh_plateau.wait, fresh_plateau.best) == (1, 0.8)
    restorer.on_train_end()  # best epoch predates the restart: best weights come from the checkpoint file
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), best, strict=True))


def test_op_determinism_follows_each_runs_setting() -> None:
    from tensorflow.python.framework import config as tf_config

    from pipeline.training.train import set_op_determinism

    set_op_determinism(True)
    assert tf_config.is_op_determinism_enabled()
    set_op_determinism(False)  # a later run without train.deterministic does not inherit it
    assert not tf_config.is_op_determinism_enabled()
