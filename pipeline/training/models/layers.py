"""Custom Keras layers of the zoo, registered so saved models load anywhere (import before loading)."""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="xrayops")
class PerImageStandardization(keras.layers.Layer):
    """Subtract each image's mean and divide by its standard deviation.

    Radiographs differ in exposure between scanners and protocols; standardising each
    image inside the model removes that nuisance for training and serving alike.
    """

    def __init__(self, epsilon: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def call(self, inputs: Any) -> Any:
        mean = keras.ops.mean(inputs, axis=(1, 2, 3), keepdims=True)
        std = keras.ops.std(inputs, axis=(1, 2, 3), keepdims=True)
        return (inputs - mean) / (std + self.epsilon)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="xrayops")
class GrayscaleToRGB(keras.layers.Layer):
    """Repeat a single channel three times (ImageNet backbones need 3-channel input); RGB passes through."""

    def call(self, inputs: Any) -> Any:
        if inputs.shape[-1] == 3:
            return inputs
        return keras.ops.repeat(inputs, 3, axis=-1)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], 3)


# keras.applications module of each backbone: its own ``preprocess_input`` runs inside the model.
BACKBONE_MODULES = {"efficientnet_b0": "efficientnet", "resnet50": "resnet50", "densenet121": "densenet"}


@keras.saving.register_keras_serializable(package="xrayops")
class BackbonePreprocess(keras.layers.Layer):
    """The backbone's own ``keras.applications.<module>.preprocess_input`` on 0–255 RGB input.

    EfficientNet: identity (its rescaling lives inside the backbone); ResNet50: RGB→BGR and
    ImageNet mean subtraction ("caffe"); DenseNet121: scale to [0, 1] and ImageNet mean/std ("torch").
    """

    def __init__(self, backbone: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if backbone not in BACKBONE_MODULES:
            raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONE_MODULES)}")
        self.backbone = backbone

    def call(self, inputs: Any) -> Any:
        module = getattr(keras.applications, BACKBONE_MODULES[self.backbone])
        return module.preprocess_input(inputs)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "backbone": self.backbone}
