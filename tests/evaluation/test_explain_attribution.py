"""Integrated Gradients and SmoothGrad: completeness, locality, the randomisation sanity check, lung-field mass."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.attribution import (
    AttributionOptions,
    explain,
    integrated_gradients,
    lung_field_mask,
    lung_mass,
    raw_maps,
    saliency,
    sanity_check,
)

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    import keras

    keras.utils.set_random_seed(0)


def _smooth_images(n: int, size: int = 32) -> np.ndarray:
    """Smooth random images (a blurred baseline differs from them, unlike from white noise)."""
    from scipy.ndimage import gaussian_filter

    noise = RNG.random((n, size, size, 1)).astype(np.float32)
    return np.stack([gaussian_filter(x, sigma=(2, 2, 0)) for x in noise]).clip(0, 1)


def _small_cnn(size: int = 32, mask: np.ndarray | None = None):
    """conv → relu → conv → GAP → sigmoid; with ``mask`` the output sees only the pixels where it is 1."""
    import keras

    inputs = keras.Input((size, size, 1))
    x = inputs
    if mask is not None:
        weight = keras.ops.convert_to_tensor(mask.astype(np.float32)[None, :, :, None])
        x = keras.layers.Lambda(lambda t: t * weight, name="region")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", bias_initializer="ones")(x))


@pytest.mark.parametrize("baseline", ["black", "blur"])
def test_integrated_gradients_are_complete(baseline: str) -> None:
    model = _small_cnn()
    # f must differ between image and baseline: smooth images vs black, textured ones vs their blur
    images = _smooth_images(3) if baseline == "black" else RNG.random((3, 32, 32, 1)).astype(np.float32)
    coarse = integrated_gradients(model, images, steps=4, baseline=baseline)
    fine = integrated_gradients(model, images, steps=64, baseline=baseline, batch_size=16)
    assert fine.attributions.shape == images.shape
    assert np.all(np.abs(fine.delta) > 1e-3), "the test needs f(x) != f(baseline)"
    np.testing.assert_allclose(fine.attributions.reshape(3, -1).sum(1), fine.delta, rtol=0.02)
    assert fine.relative_error.max() < 0.02
    assert fine.relative_error.max() <= coarse.relative_error.max() + 1e-6  # more steps, smaller error


def test_integrated_gradients_of_a_linear_model_are_input_times_weight() -> None:
    import keras

    inputs = keras.Input((8, 8, 1))
    dense = keras.layers.Dense(1, name="linear")
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    x = RNG.random((2, 8, 8, 1)).astype(np.float32)
    ig = integrated_gradients(model, x, steps=2, baseline="black")
    w = dense.get_weights()[0].reshape(8, 8, 1)
    np.testing.assert_allclose(ig.attributions, x * w[None], rtol=1e-4, atol=1e-6)
    assert ig.relative_error.max() < 1e-4


def test_model_that_standardises_each_image_makes_black_baseline_incomplete() -> None:
    from pipeline.training.models import build_model

    model = build_model("xray_cnn", image_size=32)  # per-image standardisation: f(a·x) = f(x), so x·∇f = 0
    ig = integrated_gradients(model, _smooth_images(2), steps=16, baseline="black")
    assert np.nanmin(ig.relative_error) > 0.9, "the completeness check must expose the degenerate baseline"


@pytest.mark.parametrize("samples", [0, 8])
def test_saliency_stays_in_the_region_the_model_sees(samples: int) -> None:
    region = np.zeros((32, 32), bool)
    region[4:14, 18:28] = True
    model = _small_cnn(mask=region)
    images = _smooth_images(3)
    maps = saliency(model, images, samples=samples, sigma=0.2, batch_size=4)
    assert maps.shape == (3, 32, 32) and np.all(maps.reshape(3, -1).sum(1) > 0)
    share = (maps * region).reshape(3, -1).sum(1) / maps.reshape(3, -1).sum(1)
    assert share.min() > 0.99
    ig = integrated_gradients(model, images, steps=16, baseline="blur")
    assert ((ig.maps() * region).sum() / ig.maps().sum()) > 0.99


def test_lung_mass_is_high_for_a_lung_only_model_and_low_for_a_corner_model() -> None:
    lungs = lung_field_mask(32, 32)
    assert 0.2 < lungs.mean() < 0.45 and not lungs[:, 15:17].any(), "two fields, mediastinum outside"
    corner = np.zeros((32, 32), bool)
    corner[:6, :6] = True
    images = _smooth_images(3)
    inside = lung_mass(saliency(_small_cnn(mask=lungs), images, samples=4, sigma=0.1))
    outside = lung_mass(saliency(_small_cnn(mask=corner), images, samples=4, sigma=0.1))
    assert inside["mean"] > 0.99 and outside["mean"] < 0.01
    assert inside["lung_area"] == pytest.approx(lungs.mean(), abs=1e-4) and len(inside["per_image"]) == 3
    assert lung_mass(np.zeros((1, 8, 8)))["mean"] is None


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_sanity_check_randomised_weights_decorrelate_maps_and_frozen_features_do_not(method: str) -> None:
    import keras

    from pipeline.training.models import build_model

    options = AttributionOptions(ig_steps=16, smoothgrad_samples=8, batch_size=16)
    model = build_model("xray_cnn", image_size=32)
    images = _smooth_images(6)
    ok = sanity_check(model, images, method, options, max_rank_corr=0.9, seed=1)
    assert ok["passed"] and ok["rank_corr"] < 0.6 and ok["n_images"] == 6

    # one frozen edge filter: the maps are the same filter's response whatever the trainable weights are
    inputs = keras.Input((32, 32, 1))
    conv = keras.layers.Conv2D(1, 3, padding="same", trainable=False, name="edges")
    x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    blind = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    bad = sanity_check(blind, images, method, options, max_rank_corr=0.9, seed=1)
    assert not bad["passed"] and bad["rank_corr"] > 0.9


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients", "smoothgrad"])
def test_explain_returns_heatmaps_in_unit_range_and_a_png(method: str) -> None:
    from pipeline.training.models import build_model

    model = build_model("xray_cnn", image_size=32)
    heat, png = explain(model, _smooth_images(2), method, AttributionOptions(ig_steps=8, smoothgrad_samples=4))
    assert heat.shape == (2, 32, 32) and 0 <= heat.min() and heat.max() <= 1  # (untrained Grad-CAM may be 0)
    assert png.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="use one of gradcam, integrated_gradients, smoothgrad"):
        raw_maps(model, _smooth_images(1), "lime", AttributionOptions())


def test_evaluation_examples_give_every_method_its_sanity_lung_mass_and_metrics() -> None:
    from pipeline.evaluation.attribution import explain_examples_by_method
    from pipeline.evaluation.evaluate import explain_metrics
    from pipeline.training.models import build_model

    model = build_model("xray_cnn", image_size=32)
    images = _smooth_images(8)
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    proba = np.array([0.9, 0.8, 0.2, 0.1, 0.7, 0.3, 0.6, 0.4])
    out = explain_examples_by_method(
        model, lambda idx: images[idx], y, proba, 0.5, per_cell=1,
        methods={"gradcam": 0.9, "integrated_gradients": 0.9, "smoothgrad": 0.9},
        options=AttributionOptions(ig_steps=8, smoothgrad_samples=4), seed=1)
    assert list(out) == ["gradcam", "integrated_gradients", "smoothgrad"]
    for ex in out.values():
        assert set(ex.cells) == {"TP", "FP", "TN", "FN"} and ex.cells["TP"][0]["overlay"].shape == (32, 32, 3)
        assert ex.sanity["n_images"] == 4 and 0 <= (ex.lung_mass["mean"] or 0) <= 1
    summary = {name: ex.summary() for name, ex in out.items()}
    assert summary["integrated_gradients"]["completeness"]["max_relative_error"] is not None
    flat = explain_metrics({"methods": summary})
    assert {"explain_smoothgrad_lung_mass", "explain_integrated_gradients_sanity_rank_corr",
            "explain_integrated_gradients_completeness_rel_error"} <= set(flat)
