"""The classic architectures of the seed's Q5, scaled to small (28–64 px) inputs.

- LeNet-5: two 5×5 conv + average-pool stages, 120-84 fully connected (tanh, as in 1998);
- AlexNet-style: a large strided first kernel, then 5×5 and three 3×3 convs, overlapping
  3×3/2 max-pools, two wide dense layers with dropout (5 conv + 3 FC learned layers);
- VGG-style: stacks of two 3×3 convs per block with 2×2 pooling (doubling filters), dense head.

Pools use ``'same'`` padding where the classic used 'valid' so every model builds at 28 px.
"""

from __future__ import annotations

from typing import Any

from pipeline.training.models.cnn import classification_head


def lenet5(input_shape: tuple[int, int, int], num_classes: int, **_: Any) -> Any:
    """LeNet-5: Conv6(5) → AvgPool2 → Conv16(5) → AvgPool2 → Dense120 → Dense84 → head (tanh)."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(6, 5, activation="tanh", name="c1")(inputs)
    x = layers.AveragePooling2D(2, name="s2")(x)
    x = layers.Conv2D(16, 5, activation="tanh", name="c3")(x)
    x = layers.AveragePooling2D(2, name="s4")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="tanh", name="c5")(x)
    x = layers.Dense(84, activation="tanh", name="embedding")(x)
    return keras.Model(inputs, classification_head(x, num_classes), name="lenet5")


def alexnet_small(input_shape: tuple[int, int, int], num_classes: int, **_: Any) -> Any:
    """AlexNet-style: Conv48(7/2) → Pool3/2 → Conv128(5) → Pool3/2 → 2×Conv192(3) → Conv128(3) → Pool3/2 →
    FC512 → FC256 → head."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(48, 7, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    x = layers.Conv2D(128, 5, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)
    x = layers.Conv2D(192, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.Conv2D(192, 3, padding="same", activation="relu", name="conv4")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="conv5")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool5")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(512, activation="relu", name="fc6")(x)
    x = layers.Dropout(0.5, name="dropout6")(x)
    x = layers.Dense(256, activation="relu", name="embedding")(x)
    x = layers.Dropout(0.5, name="dropout7")(x)
    return keras.Model(inputs, classification_head(x, num_classes), name="alexnet_small")


def vgg_small(input_shape: tuple[int, int, int], num_classes: int, **_: Any) -> Any:
    """VGG-style: [2×Conv3(32) → Pool] → [2×Conv3(64) → Pool] → [2×Conv3(128) → Pool] →
    FC256 → FC128 → head."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for block, filters in enumerate((32, 64, 128), start=1):
        for i in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv{i}")(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"block{block}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.5, name="dropout1")(x)
    x = layers.Dense(128, activation="relu", name="embedding")(x)
    x = layers.Dropout(0.5, name="dropout2")(x)
    return keras.Model(inputs, classification_head(x, num_classes), name="vgg_small")
