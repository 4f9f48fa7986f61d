"""The model zoo: every model builds, predicts and trains; seed models are the seed's; transfer options work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.training.models import build_model, get_spec, list_models

ZOO = [spec.name for spec in list_models()]


def _tiny_size(name: str) -> int:
    spec = get_spec(name)
    return 32 if spec.family == "transfer" else min(spec.image_size, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_predicts_and_takes_a_train_step(name: str) -> None:
    from pipeline.training.models.architecture import architecture_report

    size = _tiny_size(name)
    model = build_model(name, image_size=size, num_classes=3, weights="none")
    x = np.random.default_rng(0).random((4, size, size, model.input_shape[-1]), dtype=np.float32)
    probs = np.asarray(model(x, training=False))
    assert probs.shape == (4, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert model.layers[-1].dtype_policy.compute_dtype == "float32"
    assert model.get_layer("embedding").__class__.__name__ == "Dense"
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    loss = float(model.train_on_batch(x, np.array([0, 1, 2, 0])))
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    assert not architecture_report(model).mismatches


def test_seed_models_have_the_seed_notebooks_parameter_counts() -> None:
    # counts of the seed's Keras models (Q6, Q7, Q9) and of Q8 built as the PyTorch code is written
    expected = {("mnist_cnn", 10): 225_034, ("cifar10_cnn", 10): 1_116_970, ("simple_cnn", 10): 1_625_866,
                ("q9_cnn", 2): 10_636_481}
    for (name, classes), params in expected.items():
        model = build_model(name, num_classes=classes)
        assert model.count_params() == params, name
    assert build_model("q9_cnn", num_classes=2).output_shape == (None, 1)  # binary → one sigmoid unit
    assert build_model("simple_cnn").get_layer("flatten").output.shape[-1] == 64 * 14 * 14 == 12544


def test_mixed_precision_keeps_a_float32_head() -> None:
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("mnist_cnn", num_classes=10)
        out = model(np.zeros((1, 28, 28, 1), np.float32))
        assert model.get_layer("conv1").compute_dtype == "float16"
        assert "float32" in str(out.dtype)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_transfer_model_preprocesses_inside_and_fine_tunes_top_layers_with_frozen_batchnorm() -> None:
    from keras import layers

    from pipeline.training.models.transfer import find_backbone, unfreeze_top

    model = build_model("resnet50", image_size=32, channels=1, num_classes=2, weights="none")
    assert model.get_layer("preprocess").backbone == "resnet50" and model.get_layer("to_rgb") is not None
    backbone = find_backbone(model)
    assert backbone is not None and not backbone.trainable
    assert unfreeze_top(model, 20)
    inner = backbone.layers
    assert not any(layer.trainable for layer in inner[:-20])
    top = inner[-20:]
    assert all(not layer.trainable for layer in top if isinstance(layer, layers.BatchNormalization))
    assert any(layer.trainable and layer.weights for layer in top)
    assert not unfreeze_top(build_model("mnist_cnn"), 20)  # nothing to fine-tune


@pytest.mark.slow
def test_transfer_weights_from_a_local_file(tmp_path: Path) -> None:
    from pipeline.errors import WeightsUnavailable
    from pipeline.training.models.transfer import find_backbone

    source = build_model("efficientnet_b0", image_size=32, weights="none")
    path = tmp_path / "backbone.weights.h5"
    find_backbone(source).save_weights(path)
    loaded = build_model("efficientnet_b0", image_size=32, weights=str(path))
    for a, b in zip(find_backbone(source).get_weights(), find_backbone(loaded).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        build_model("efficientnet_b0", image_size=32, weights=str(tmp_path / "missing.weights.h5"))


@pytest.mark.slow
def test_imagenet_weights_offline_name_the_file_to_place(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import urllib.error

    from keras.src.backend import config
    from keras.src.utils import file_utils

    from pipeline.errors import WeightsUnavailable

    def offline(*args: object, **kwargs: object) -> None:  # the network edge: no internet here
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras"))
    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    with pytest.raises(WeightsUnavailable) as err:
        build_model("densenet121", image_size=32, weights="imagenet")
    message = str(err.value)
    expected = tmp_path / "keras" / "models" / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert str(expected) in message and "train.weights=none" in message
