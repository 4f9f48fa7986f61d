"""Every zoo model, declared without importing Keras."""

from pipeline.models.registry import ModelSpec, register

register(ModelSpec(
    name="xray_cnn", builder="pipeline.models.cnn:xray_cnn", image_size=128, channels=1, family="xray",
    description="Small BatchNorm CNN with global pooling for grayscale chest X-rays (fast CPU default).",
))
register(ModelSpec(
    name="mnist_cnn", builder="pipeline.models.cnn:mnist_cnn", image_size=28, channels=1, family="seed",
    description="Seed Q6: Conv32-Pool-Conv64-Pool-Dense128-Dropout0.4-Dense10.",
))
