"""Architecture report: formulas for shapes, parameters, receptive field and FLOPs, checked against Keras."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.training.models import build_model
from pipeline.training.models.architecture import architecture_report


def test_simple_cnn_report_shows_12544_and_explains_the_seeds_3136() -> None:
    report = architecture_report(build_model("simple_cnn", num_classes=10))
    assert report.flatten_features() == {"flatten": 12544}
    text = report.to_text()
    assert "14 × 14 × 64 = 12544" in text
    assert "64·14·14 = 12544" in text and "3136" in text
    assert "(128x12544 and 3136x128)" in text
    dense = next(r for r in report.rows if r.name == "embedding")
    assert dense.params == 128 * 12544 + 128 == dense.keras_params


def test_mnist_cnn_shapes_receptive_field_jump_and_flops_by_hand() -> None:
    report = architecture_report(build_model("mnist_cnn", num_classes=10))
    rows = {r.name: r for r in report.rows}
    assert [rows[n].output_shape for n in ("conv1", "pool1", "conv2", "pool2")] == [
        (26, 26, 32), (13, 13, 32), (11, 11, 64), (5, 5, 64)]
    assert [(rows[n].rf, rows[n].jump) for n in ("conv1", "pool1", "conv2", "pool2")] == [
        (3, 1), (4, 2), (8, 2), (10, 4)]
    assert rows["conv2"].params == 64 * (32 * 3 * 3) + 64 and rows["conv2"].params_formula == "64·(32·3·3)+64"
    assert rows["embedding"].rf is None  # a dense unit sees the whole image
    macs = 26 * 26 * 32 * 9 + 11 * 11 * 64 * 288 + 1600 * 128 + 128 * 10
    assert report.total_flops == 2 * macs
    assert report.total_params == report.keras_total_params == 225_034 and not report.mismatches


def test_strides_padding_and_dilation_formulas_agree_with_keras() -> None:
    import keras
    from keras import layers

    inputs = keras.Input((31, 31, 3))
    x = layers.Conv2D(8, 5, strides=2, padding="valid", name="valid_s2")(inputs)  # ⌊(31−5)/2⌋+1 = 14
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="same_s2")(x)  # ⌈14/2⌉ = 7
    x = layers.Conv2D(4, 3, dilation_rate=2, padding="valid", name="dilated")(x)  # k_eff 5 → 3
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool")(x)  # ⌈3/2⌉ = 2
    model = keras.Model(inputs, layers.Flatten(name="flat")(x))
    report = architecture_report(model)
    rows = {r.name: r for r in report.rows}
    assert rows["valid_s2"].output_shape == (14, 14, 8) and rows["valid_s2"].shape_formula == "⌊(31+0+0−5)/2⌋+1=14"
    assert rows["same_s2"].output_shape == (7, 7, 8)
    assert rows["dilated"].output_shape == (3, 3, 4)
    assert rows["dilated"].rf == 5 + 2 * 2 + 4 * 4 and rows["dilated"].jump == 4
    assert rows["dw"].params == 4 * 9
    assert rows["pool"].output_shape == (2, 2, 4)
    assert not report.mismatches


@pytest.mark.parametrize("name", ["xray_cnn", "lenet5", "alexnet_small", "vgg_small", "cifar10_cnn", "q9_cnn",
                                  "efficientnet_b0"])
def test_report_agrees_with_keras_for_zoo_models(name: str) -> None:
    size = 32 if name == "efficientnet_b0" else None
    report = architecture_report(build_model(name, image_size=size, weights="none"))
    assert not report.mismatches, report.mismatches
    assert report.total_flops > 0 and report.to_dict()["train_flops_per_image"] == 3 * report.total_flops


def test_cli_model_describe_prints_the_table_and_json() -> None:
    from pipeline.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["model", "describe", "simple_cnn"])
    assert result.exit_code == 0, result.output
    assert "12544" in result.output and "3136" in result.output and "count_params()" in result.output
    result = runner.invoke(app, ["model", "describe", "mnist_cnn", "--image-size", "32", "--num-classes", "2",
                                 "--json"])
    data = json.loads(result.output)
    assert data["input_shape"] == [32, 32, 1] and data["layers"][-1]["output_shape"] == [1]
    result = runner.invoke(app, ["model", "describe", "no_such_model"])
    assert result.exit_code == 2 and "model list" in result.output
