"""Plain CNN builders: the X-ray default and the seed notebook's models."""

from __future__ import annotations

from typing import Any


def classification_head(x: Any, num_classes: int, name: str = "predictions") -> Any:
    """Float32 output layer: one sigmoid unit for binary tasks, softmax otherwise."""
    from keras import layers

    if num_classes == 2:
        return layers.Dense(1, activation="sigmoid", dtype="float32", name=name)(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name=name)(x)


def xray_cnn(input_shape: tuple[int, int, int], num_classes: int, **_: Any) -> Any:
    """Per-image standardisation, four conv blocks (16-32-64-96, GroupNorm, ReLU, max-pool), global average pooling, dropout.

    GroupNorm rather than BatchNorm: with small batches and augmentation, BatchNorm's moving
    statistics lag the weights and validation scores swing from epoch to epoch; GroupNorm
    has no train/inference difference and trains smoothly on CPU-sized data.
    """
    import keras
    from keras import layers

    from pipeline.models.layers import PerImageStandardization

    inputs = keras.Input(shape=input_shape, name="image")
    x = PerImageStandardization(name="standardize")(inputs)
    for i, filters in enumerate((16, 32, 64, 96)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = layers.GroupNormalization(groups=8, name=f"gn{i + 1}")(x)
        x = layers.Activation("relu", name=f"relu{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    x = layers.Dense(32, activation="relu", name="embedding")(x)
    return keras.Model(inputs, classification_head(x, num_classes), name="xray_cnn")


def mnist_cnn(input_shape: tuple[int, int, int], num_classes: int, **_: Any) -> Any:
    """Seed Q6 exactly: Conv32(3) → MaxPool2 → Conv64(3) → MaxPool2 → Dense128 → Dropout0.4 → Dense."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="embedding")(x)
    x = layers.Dropout(0.4, name="dropout")(x)
    return keras.Model(inputs, classification_head(x, num_classes), name="mnist_cnn")
