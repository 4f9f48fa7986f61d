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
