"""Every zoo model, declared without importing Keras.

Conventions every builder follows: input images in [0, 1]; the penultimate Dense layer is
named ``embedding`` (serving and drift monitoring read it); the output layer is float32
(``classification_head``): one sigmoid unit for two classes, softmax otherwise.
"""

from pipeline.training.models.spec import ModelSpec, register

register(ModelSpec(
    name="xray_cnn", builder="pipeline.training.models.cnn:xray_cnn", image_size=64, channels=1, family="xray",
    description="Small GroupNorm CNN with global pooling for grayscale chest X-rays (fast CPU default; 64 px).",
))

# --- the seed notebook's models (Q6–Q9), as written there
register(ModelSpec(
    name="mnist_cnn", builder="pipeline.training.models.cnn:mnist_cnn", image_size=28, channels=1,
    num_classes=10, family="seed",
    description="Seed Q6: Conv32-Pool-Conv64-Pool-Dense128-Dropout0.4-Dense10.",
))
register(ModelSpec(
    name="cifar10_cnn", builder="pipeline.training.models.cnn:cifar10_cnn", image_size=32, channels=3,
    num_classes=10, family="seed",
    description="Seed Q7: 2xConv32-Pool-2xConv64-Pool ('same'), Dense256-Dropout0.5-Dense10.",
))
register(ModelSpec(
    name="simple_cnn", builder="pipeline.training.models.cnn:simple_cnn", image_size=28, channels=1,
    num_classes=10, family="seed",
    description="Seed Q8 SimpleCNN: Conv32(pad1)-Conv64(pad1)-ONE Pool-Dense128-Dropout0.4 (flatten 12544).",
    seed_flatten=(3136, "nn.Linear(64*7*7, 128)",
                  "mat1 and mat2 shapes cannot be multiplied (128x12544 and 3136x128)"),
))
register(ModelSpec(
    name="q9_cnn", builder="pipeline.training.models.cnn:q9_cnn", image_size=150, channels=3, family="seed",
    description="Seed Q9: binary Conv32-Pool-Conv64-Pool-Dense128-Dropout0.5-sigmoid at 150x150x3 "
                "(augmentation: train.augment).",
))

# --- the classics of the seed's Q5, scaled to small inputs
register(ModelSpec(
    name="lenet5", builder="pipeline.training.models.classic:lenet5", image_size=32, channels=1,
    num_classes=10, family="classic",
    description="LeNet-5: Conv6(5)-AvgPool-Conv16(5)-AvgPool-FC120-FC84 (tanh).",
))
register(ModelSpec(
    name="alexnet_small", builder="pipeline.training.models.classic:alexnet_small", image_size=64, channels=1,
    family="classic", description="AlexNet-style: Conv48(7/2)-Pool-Conv128(5)-Pool-3xConv3-Pool-FC512-FC256.",
))
register(ModelSpec(
    name="vgg_small", builder="pipeline.training.models.classic:vgg_small", image_size=64, channels=1, family="classic",
    description="VGG-style: 3 blocks of 2xConv3 (32-64-128) + Pool, FC256-FC128.",
))

# --- transfer learning for X-rays (keras.applications backbones; train.weights = imagenet | none | path)
for _name, _label in (("efficientnet_b0", "EfficientNetB0"), ("resnet50", "ResNet50"),
                      ("densenet121", "DenseNet121")):
    register(ModelSpec(
        name=_name, builder="pipeline.training.models.transfer:transfer_model", image_size=224, channels=1,
        family="transfer", options={"backbone": _name},
        description=f"{_label} backbone (gray->RGB, its own preprocess_input), GAP-Dropout-Dense128-head; "
                    "two-phase fine-tuning.",
    ))
