"""Grad-CAM on zoo models (plain CNNs, a nested transfer backbone, mixed precision) and its sanity check."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import GradCamError
from pipeline.evaluation.explain import find_target_layer, grad_cam_for, gradcam, sanity_check, select_examples

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    import keras

    keras.utils.set_random_seed(0)


def _images(model, n: int = 3) -> np.ndarray:
    return RNG.random((n, *model.inputs[0].shape[1:])).astype(np.float32)


@pytest.mark.parametrize(("name", "options", "layer", "conv"), [
    ("xray_cnn", {"image_size": 48}, "relu4", ["conv4"]),
    ("mnist_cnn", {"num_classes": 10}, "conv2", ["conv2"]),
    pytest.param("efficientnet_b0", {"image_size": 64}, "efficientnetb0", ["efficientnetb0", "top_conv"],
                 marks=pytest.mark.slow),
])
def test_gradcam_finds_the_last_conv_and_returns_heatmap_and_png(name: str, options: dict, layer: str,
                                                                  conv: list[str]) -> None:
    from pipeline.training.models import build_model

    model = build_model(name, **options)
    target, path = find_target_layer(model)
    assert (target.name, path) == (layer, conv)
    batch = _images(model)
    heat, png = gradcam(model, batch)
    assert heat.shape == batch.shape[:3] and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0
    raw, out = grad_cam_for(model).maps(batch)
    assert raw.shape[0] == 3 and np.ptp(raw) > 0  # (an untrained model may have no *positive* evidence)
    np.testing.assert_allclose(out, model(batch).numpy(), atol=1e-6)
    assert png.startswith(b"\x89PNG")
    one, png_one = gradcam(model, batch[0])  # a single image works too
    assert one.shape == (1, *batch.shape[1:3]) and png_one.startswith(b"\x89PNG")


def test_binary_gradcam_follows_the_logit_so_a_saturated_probability_still_has_a_map() -> None:
    """A confident (or strongly calibrated) binary model outputs p = 0 or 1 in float32: the probability's
    gradient is 0 there, the logit's is not. The map is the same up to a positive factor where nothing
    saturates."""
    from pipeline.training.models import build_model

    model = build_model("xray_cnn", image_size=48)
    batch = _images(model)
    before, _ = grad_cam_for(model).maps(batch)
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 1e4, bias])  # every probability saturates at 0.0 or 1.0
    sharp = build_model("xray_cnn", image_size=48)  # a fresh model object: Grad-CAMs are cached per model
    sharp.set_weights(model.get_weights())
    out = sharp(batch).numpy()
    assert np.all((out == 0.0) | (out == 1.0)), out
    raw, _ = grad_cam_for(sharp).maps(batch)
    assert np.all(np.ptp(raw.reshape(len(raw), -1), axis=1) > 0), "a map for every image"
    for a, b in zip(before, raw, strict=True):  # the logit scales by 1e4: same map up to that factor
        np.testing.assert_allclose(b, a * 1e4, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_gradcam_under_mixed_precision_matches_float32() -> None:
    import keras

    from pipeline.training.models import build_model

    reference = build_model("xray_cnn", image_size=32)
    images = _images(reference, 2)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("xray_cnn", image_size=32)
        model.set_weights(reference.get_weights())
        assert model.get_layer("conv4").compute_dtype == "float16"
        raw16, _ = grad_cam_for(model).maps(images)
        heat, png = gradcam(model, images)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    raw32, _ = grad_cam_for(reference).maps(images)
    assert np.isfinite(raw16).all() and heat.shape == (2, 32, 32) and png.startswith(b"\x89PNG")
    scale = np.abs(raw32).max()
    np.testing.assert_allclose(raw16 / scale, raw32 / scale, atol=0.05)


def test_model_without_convolution_is_refused_clearly() -> None:
    import keras

    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs)))
    with pytest.raises(GradCamError, match="no convolutional layer"):
        gradcam(model, np.zeros((1, 8, 8, 1), np.float32))


def test_sanity_check_passes_for_learned_weights_and_fails_when_maps_ignore_them() -> None:
    import keras

    from pipeline.training.models import build_model

    model = build_model("xray_cnn", image_size=32)
    images = _images(model, 6)
    ok = sanity_check(model, images, max_rank_corr=0.9, seed=1)
    assert ok["passed"] and ok["rank_corr"] < 0.9 and ok["layer"] == "relu4"

    # one frozen edge filter: every map is ± that filter's response, whatever the trainable weights are
    inputs = keras.Input((32, 32, 1))
    conv = keras.layers.Conv2D(1, 3, padding="same", trainable=False, name="edges")
    x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    blind = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    bad = sanity_check(blind, images, max_rank_corr=0.9, seed=1)
    assert not bad["passed"] and bad["rank_corr"] > 0.99


def test_select_examples_orders_each_confusion_cell_by_confidence() -> None:
    y = np.array([1, 1, 0, 0, 1, 0, 0])
    p = np.array([0.9, 0.6, 0.8, 0.1, 0.2, 0.3, 0.55])
    cells = select_examples(y, p, 0.5, per_cell=2)
    assert cells == {"TP": [0, 1], "FP": [2, 6], "TN": [3, 5], "FN": [4]}
    multi = select_examples(np.array([0, 1, 2]), np.eye(3)[[0, 2, 2]] * 0.9 + 0.03, None, per_cell=5)
    assert multi == {"correct": [0, 2], "wrong": [1]}
