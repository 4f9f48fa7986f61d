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
    """Per-image standardisation, four conv blocks (16-32-64-96, GroupNorm, ReLU, max-pool), global average
    pooling, dropout.

    GroupNorm rather than BatchNorm: with small batches and augmentation, BatchNorm's moving
    statistics lag the weights and validation scores swing from epoch to epoch; GroupNorm
    has no train/inference difference and trains smoothly on CPU-sized data.
    """
    import keras
    from keras import layers

    from pipeline.training.models.layers import PerImageStandardization

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


def _conv_pool_x2(input_shape: tuple[int, int, int], num_classes: int, dropout: float, name: str) -> Any:
    """Conv32(3) → MaxPool2 → Conv64(3) → MaxPool2 → Dense128 → Dropout → head (the seed's Q6 and Q9 body)."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="embedding")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    return keras.Model(inputs, classification_head(x, num_classes), name=name)


def mnist_cnn(input_shape: tuple[int, int, int], num_classes: int, **_: Any) -> Any:
    """Seed Q6 exactly: Conv32(3) → MaxPool2 → Conv64(3) → MaxPool2 → Dense128 → Dropout0.4 → Dense."""
    return _conv_pool_x2(input_shape, num_classes, 0.4, "mnist_cnn")


def cifar10_cnn(input_shape: tuple[int, int, int], num_classes: int, **_: Any) -> Any:
    """Seed Q7 exactly: 2×Conv32('same') → MaxPool2 → 2×Conv64('same') → MaxPool2 → Dense256 →
    Dropout0.5 → Dense."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for block, filters in enumerate((32, 64), start=1):
        for i in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{block}_{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="embedding")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    return keras.Model(inputs, classification_head(x, num_classes), name="cifar10_cnn")


def simple_cnn(input_shape: tuple[int, int, int], num_classes: int, **_: Any) -> Any:
    """Seed Q8 ``SimpleCNN`` as written: Conv32(3, pad 1) → Conv64(3, pad 1) → ONE MaxPool2 → Dense128 →
    Dropout0.4 → Dense.

    ``padding="same"`` with a 3×3 kernel and stride 1 is PyTorch's ``padding=1``: both convs keep
    28×28, the single pooling halves it once, so the flattened vector has 64·14·14 = 12544
    features. The seed declared ``nn.Linear(64*7*7, 128)`` (3136 inputs, as if it pooled twice)
    and crashed with ``mat1 and mat2 shapes cannot be multiplied (128x12544 and 3136x128)``;
    Keras infers the Dense input size, and ``xrayops model describe simple_cnn`` shows the arithmetic.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="embedding")(x)
    x = layers.Dropout(0.4, name="dropout")(x)
    return keras.Model(inputs, classification_head(x, num_classes), name="simple_cnn")


def q9_cnn(input_shape: tuple[int, int, int], num_classes: int, **_: Any) -> Any:
    """Seed Q9 exactly: Conv32(3) → MaxPool2 → Conv64(3) → MaxPool2 → Dense128 → Dropout0.5 → sigmoid
    (150×150×3).

    The seed's augmentation (rotation, shifts, shear, zoom via ``ImageDataGenerator``) is done
    by the input pipeline (``train.augment``), on batches, with no horizontal flip by default.
    """
    return _conv_pool_x2(input_shape, num_classes, 0.5, "q9_cnn")
