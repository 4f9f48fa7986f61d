"""Transfer learning for X-rays: EfficientNetB0, ResNet50 and DenseNet121 backbones from ``keras.applications``.

``train.weights``: ``imagenet`` (downloaded once into ``<KERAS_HOME>/models``; offline, a clear
error names the exact file to place there), ``none`` (random init, offline) or a local
``.weights.h5`` path. Two-phase fine-tuning: phase 1 trains the head on a frozen backbone;
phase 2 (:func:`unfreeze_top`, driven by ``train.fine_tune_*``) unfreezes the top N backbone
layers at a lower learning rate with BatchNorm kept frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import WeightsUnavailable


def find_backbone(model: Any) -> Any | None:
    """The backbone sub-model of a transfer model (flagged at build time, else by its Keras name)."""
    import keras

    names = {"efficientnetb0", "resnet50", "densenet121"}
    for layer in model.layers:
        if getattr(layer, "_xrayops_backbone", False) or (isinstance(layer, keras.Model) and layer.name in names):
            return layer
    return None


def unfreeze_top(model: Any, n_layers: int) -> bool:
    """Unfreeze the top ``n_layers`` of the model's backbone (BatchNorm stays frozen).

    Returns False when the model has no backbone (nothing to fine-tune).
    """
    from keras import layers

    backbone = find_backbone(model)
    if backbone is None:
        return False
    backbone.trainable = True
    inner = backbone.layers
    cut = max(0, len(inner) - n_layers)
    for i, layer in enumerate(inner):
        layer.trainable = i >= cut and not isinstance(layer, layers.BatchNormalization)
    return True


# name → (keras.applications class, cached ImageNet no-top file under <KERAS_HOME>/models/, download URL folder)
BACKBONES: dict[str, tuple[str, str, str]] = {
    "efficientnet_b0": ("EfficientNetB0", "efficientnetb0_notop.h5",
                        "https://storage.googleapis.com/keras-applications/"),
    "resnet50": ("ResNet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"),
    "densenet121": ("DenseNet121", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "https://storage.googleapis.com/tensorflow/keras-applications/densenet/"),
}


def keras_cache_file(file_name: str) -> Path:
    """Where ``keras.utils.get_file`` looks for a cached application weights file."""
    import os

    try:
        from keras.src.backend.config import keras_home

        home = keras_home()
    except ImportError:  # pragma: no cover - private path moved
        home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
    return Path(home) / "models" / file_name


def resolve_weights(backbone: str, weights: str | None) -> str | None:
    """Map ``train.weights`` (imagenet | none | path) to the ``weights=`` argument of keras.applications.

    Raises:
        WeightsUnavailable: a local weights path does not exist.
        ValueError: ``weights`` is none of the accepted forms.
    """
    value = (weights or "none").strip()
    if value.lower() in ("none", "null", ""):
        return None
    if value.lower() == "imagenet":
        return "imagenet"
    path = Path(value).expanduser()
    if not value.endswith(".h5"):
        raise ValueError(f"train.weights={value!r}: expected imagenet, none or a path to a .weights.h5 file")
    if not path.is_file():
        raise WeightsUnavailable(
            f"backbone weights file {path} for {backbone} does not exist. Set train.weights to an existing "
            f".weights.h5 file (e.g. saved with `backbone.save_weights(...)`), to imagenet, or to none."
        )
    return str(path.resolve())


def _backbone(backbone: str, input_shape: tuple[int, int, int], weights: str | None) -> Any:
    import keras

    cls_name, file_name, url = BACKBONES[backbone]
    cls = getattr(keras.applications, cls_name)
    shape = (input_shape[0], input_shape[1], 3)
    try:
        return cls(include_top=False, weights=weights, input_shape=shape, pooling=None)
    except Exception as exc:  # keras raises a bare Exception("URL fetch failure ...") offline
        cached = keras_cache_file(file_name)
        if weights != "imagenet" or cached.is_file():
            raise
        raise WeightsUnavailable(
            f"ImageNet weights for {cls_name} are not cached and could not be downloaded ({exc}). "
            f"On a machine with internet, download {url}{file_name} and place it at {cached} "
            f"(exact file name {file_name}; KERAS_HOME moves the folder), or set train.weights=none "
            f"(random init) or train.weights=/path/to/backbone.weights.h5."
        ) from None


def transfer_model(input_shape: tuple[int, int, int], num_classes: int, *, backbone: str,
                   weights: str | None = "none", dropout: float = 0.3, embedding_units: int = 128,
                   **_: Any) -> Any:
    """ImageNet backbone (frozen) + GAP → Dropout → Dense ``embedding`` → Dropout → float32 head.

    Inputs are images in [0, 1] with 1 or 3 channels; the model itself repeats grayscale to
    RGB, rescales to 0–255 and runs the backbone's own ``preprocess_input``. The backbone is
    called with ``training=False`` so its BatchNorm layers stay in inference mode in both
    phases (see :func:`unfreeze_top`).
    """
    import keras
    from keras import layers

    from pipeline.training.models.cnn import classification_head
    from pipeline.training.models.layers import BackbonePreprocess, GrayscaleToRGB

    base = _backbone(backbone, input_shape, resolve_weights(backbone, weights))
    base.trainable = False
    base._xrayops_backbone = True
    inputs = keras.Input(shape=input_shape, name="image")
    x = GrayscaleToRGB(name="to_rgb")(inputs)
    x = layers.Rescaling(255.0, name="to_255")(x)
    x = BackbonePreprocess(backbone, name="preprocess")(x)
    x = base(x, training=False)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(embedding_units, activation="relu", name="embedding")(x)
    x = layers.Dropout(dropout, name="dropout_head")(x)
    return keras.Model(inputs, classification_head(x, num_classes), name=backbone)
