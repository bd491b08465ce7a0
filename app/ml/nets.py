"""The architectures the service can train, and the registry the API and worker read.

Adding a net is one builder function and one entry in NETS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

CLASS_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
INPUT_SHAPE: tuple[int, int, int] = (32, 32, 3)
NUM_CLASSES = len(CLASS_NAMES)


class UnknownNetError(KeyError):
    """Raised for a net name that is not in the registry; lists the known ones."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name
        self.known = sorted(NETS)

    def __str__(self) -> str:
        return f"unknown net {self.name!r}; known nets: {', '.join(self.known)}"


Builder = Callable[..., "keras.Model"]


@dataclass(frozen=True)
class NetSpec:
    name: str
    title: str
    description: str
    layout: str
    builder: Builder
    notes: str = ""
    # The first layer is a PatchWhitening (app/ml/blocks.py) that the `whiten` option sets.
    whitening: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "layout": self.layout,
            "notes": self.notes,
        }


def _check_shape(input_shape: tuple[int, int, int], num_classes: int) -> None:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(
            f"input_shape must be (height, width, channels). Received: input_shape={input_shape}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2. Received: num_classes={num_classes}")


def build_net1(
    input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = NUM_CLASSES
) -> keras.Model:
    """NET I (exercise 3): CONV-POOL-CONV-POOL-CONV-POOL-FC-FC, 3x3 kernels, valid padding."""
    return _conv_pool_fc("net1", input_shape, num_classes, kernel=3, stages=((32,), (64,), (64,)))


def build_net2(
    input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = NUM_CLASSES
) -> keras.Model:
    """NET II (exercise 11): CONV-CONV-POOL-CONV-POOL-FC-FC, 5x5 kernels, valid padding."""
    return _conv_pool_fc("net2", input_shape, num_classes, kernel=5, stages=((32, 64), (64,)))


def _conv_pool_fc(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    kernel: int,
    stages: tuple[tuple[int, ...], ...],
) -> keras.Model:
    """The frame of NET I and NET II: stages of ReLU convolutions (`kernel` x `kernel`, valid
    padding; one stage = its filter counts) each closed by a 2x2 max pooling, then FC 512 and
    the softmax FC. Layers are numbered in order: conv1, conv2, ... and pool1, pool2, ..."""
    import keras
    from keras import layers

    _check_shape(input_shape, num_classes)
    stack: list[Any] = [keras.Input(shape=input_shape, name="image")]
    convs = 0
    for pool, filters in enumerate(stages, start=1):
        for width in filters:
            convs += 1
            stack.append(layers.Conv2D(width, kernel, activation="relu", name=f"conv{convs}"))
        stack.append(layers.MaxPooling2D(2, strides=2, name=f"pool{pool}"))
    stack += [
        layers.Flatten(name="flatten"),
        layers.Dense(512, activation="relu", name="fc1"),
        layers.Dense(num_classes, activation="softmax", dtype="float32", name="fc2"),
    ]
    return keras.Sequential(stack, name=name)


def build_net3(
    input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = NUM_CLASSES
) -> keras.Model:
    """NET III (exercise 17): six 3x3 'same' convolutions, dropout 0.5, L2 5e-4 on the FC kernels."""
    import keras
    from keras import layers, regularizers

    _check_shape(input_shape, num_classes)
    l2 = regularizers.L2(0.0005)
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="image"),
            layers.Conv2D(96, 3, padding="same", activation="relu", name="conv1"),
            layers.Conv2D(96, 3, padding="same", activation="relu", name="conv2"),
            layers.MaxPooling2D(2, strides=2, name="pool1"),
            layers.Dropout(0.5, name="drop1"),
            layers.Conv2D(128, 3, padding="same", activation="relu", name="conv3"),
            layers.MaxPooling2D(2, strides=2, name="pool2"),
            layers.Dropout(0.5, name="drop2"),
            layers.Conv2D(128, 3, padding="same", activation="relu", name="conv4"),
            layers.Conv2D(128, 3, padding="same", activation="relu", name="conv5"),
            layers.Conv2D(128, 3, padding="same", activation="relu", name="conv6"),
            layers.MaxPooling2D(2, strides=2, name="pool3"),
            layers.Dropout(0.5, name="drop3"),
            layers.Flatten(name="flatten"),
            layers.Dense(1024, activation="relu", kernel_regularizer=l2, name="fc1"),
            layers.Dropout(0.5, name="drop4"),
            layers.Dense(512, activation="relu", kernel_regularizer=l2, name="fc2"),
            layers.Dropout(0.5, name="drop5"),
            layers.Dense(
                num_classes,
                activation="softmax",
                kernel_regularizer=l2,
                dtype="float32",
                name="fc3",
            ),
        ],
        name="net3",
    )


def build_net4(
    input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = NUM_CLASSES
) -> keras.Model:
    """NET IV (exercise 19): a half-width ResNet-9 with batch normalisation.

    The fast-CIFAR-10 recipe (D. Page, "How to train your ResNet", 2018) at half the
    channels: every CONV is 3x3 'same' without bias, then BatchNormalization and ReLU;
    two residual blocks (x + CONV(CONV(x))); global max pooling and one softmax FC layer.
    """
    import keras
    from keras import layers

    _check_shape(input_shape, num_classes)

    def conv_bn(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        # momentum 0.9 (PyTorch's 0.1): the running statistics follow the weights within
        # an epoch or two, which a one-cycle run of a dozen epochs needs.
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    def residual(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
        channels = int(x.shape[-1])
        y = conv_bn(conv_bn(x, channels, f"{name}a"), channels, f"{name}b")
        return layers.Add(name=f"{name}_add")([x, y])

    inputs = keras.Input(shape=input_shape, name="image")
    x = conv_bn(inputs, 32, "prep")
    x = layers.MaxPooling2D(2, strides=2, name="pool1")(conv_bn(x, 64, "layer1"))
    x = residual(x, "res1")
    x = layers.MaxPooling2D(2, strides=2, name="pool2")(conv_bn(x, 128, "layer2"))
    x = layers.MaxPooling2D(2, strides=2, name="pool3")(conv_bn(x, 256, "layer3"))
    x = residual(x, "res3")
    x = layers.GlobalMaxPooling2D(name="global_pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="fc")(x)
    return keras.Model(inputs, outputs, name="net4")


NET5_WIDTHS = (64, 256, 256)  # airbench94's; airbench93 uses (64, 128, 128)
NET5_ACTIVATION = "gelu"


def build_net5(
    input_shape: tuple[int, int, int] = INPUT_SHAPE,
    num_classes: int = NUM_CLASSES,
    widths: tuple[int, int, int] = NET5_WIDTHS,
    activation: str = NET5_ACTIVATION,
) -> keras.Model:
    """NET V (issue 21): airbench94's net (Jordan, 2024) in Keras.

    A frozen 2x2 patch-whitening convolution (24 channels, set from the training images by
    the `whiten` option) and GELU, then three blocks of CONV3x3-POOL-BN-ACT-CONV3x3-BN-ACT
    (no conv bias, identity-initialised first filters, BN without scale), global max
    pooling and a bias-free FC whose logits are scaled by 1/9 before the softmax.
    """
    import keras
    from keras import layers

    from app.ml.blocks import PartialDirac, PatchWhitening, no_affine_bn

    _check_shape(input_shape, num_classes)

    def conv(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
        return layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer=PartialDirac(),
            name=name,
        )(x)

    inputs = keras.Input(shape=input_shape, name="image")
    x = PatchWhitening(name="whiten")(inputs)
    x = layers.Activation(activation, name="whiten_act")(x)
    for block, width in enumerate(widths, start=1):
        x = conv(x, width, f"block{block}_conv1")
        x = layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
        x = no_affine_bn(f"block{block}_bn1")(x)
        x = layers.Activation(activation, name=f"block{block}_act1")(x)
        x = conv(x, width, f"block{block}_conv2")
        x = no_affine_bn(f"block{block}_bn2")(x)
        x = layers.Activation(activation, name=f"block{block}_act2")(x)
    x = layers.GlobalMaxPooling2D(name="global_pool")(x)
    x = layers.Dense(num_classes, use_bias=False, name="fc")(x)
    x = layers.Rescaling(1.0 / 9.0, name="fc_scale")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="softmax")(x)
    return keras.Model(inputs, outputs, name="net5")


NETS: dict[str, NetSpec] = {
    spec.name: spec
    for spec in (
        NetSpec(
            name="net1",
            title="NET I",
            description="Three 3x3 convolutions (32, 64, 64) each followed by 2x2 max pooling, then FC 512 and FC 10.",
            layout="CONV-POOL-CONV-POOL-CONV-POOL-FC-FC",
            builder=build_net1,
        ),
        NetSpec(
            name="net2",
            title="NET II",
            description="Three 5x5 convolutions (32, 64, 64) with two 2x2 max poolings, then FC 512 and FC 10.",
            layout="CONV-CONV-POOL-CONV-POOL-FC-FC",
            builder=build_net2,
        ),
        NetSpec(
            name="net3",
            title="NET III",
            description=(
                "Six 3x3 convolutions (96, 96, 128, 128, 128, 128), three 2x2 max poolings, "
                "dropout 0.5 after each pool and FC layer, FC 1024-512-10 with L2 5e-4."
            ),
            layout="CONV-CONV-POOL-CONV-POOL-CONV-CONV-CONV-POOL-FC-FC-FC",
            builder=build_net3,
            notes=(
                "Convolutions use 'same' padding: with 'valid' padding the six 3x3 convolutions "
                "and three pools shrink 32x32 to nothing before the last pool "
                "(32-2-2=28, /2=14, -2=12, /2=6, -2-2-2=0)."
            ),
        ),
        NetSpec(
            name="net4",
            title="NET IV",
            description=(
                "Half-width ResNet-9: 3x3 convolutions (32, 64, 128, 256) each with batch "
                "normalisation and ReLU, three 2x2 max poolings, two residual blocks of two "
                "convolutions (64 and 256 channels), global max pooling, FC 10."
            ),
            layout=(
                "CONV-CONV-POOL-RES(CONV-CONV)-CONV-POOL-CONV-POOL-RES(CONV-CONV)-GLOBALPOOL-FC"
            ),
            builder=build_net4,
            notes=(
                "Exercise 19's answer: about 0.65x NET III's multiply-accumulates, half its "
                "parameters. Meant to be trained with the levers: crop 4 + flip augmentation, "
                "label smoothing, AdamW with a one-cycle schedule (scripts/report_jobs.json)."
            ),
        ),
        NetSpec(
            name="net5",
            title="NET V",
            description=(
                "airbench94 in Keras: a frozen 2x2 patch-whitening convolution (24 channels) and "
                "GELU, three blocks of two 3x3 convolutions (64, 256, 256) with 2x2 max pooling "
                "and batch normalisation without scale, global max pooling, FC 10 scaled by 1/9."
            ),
            layout=("WHITEN-(CONV-POOL-BN-CONV-BN)x3-GLOBALPOOL-FC"),
            builder=build_net5,
            whitening=True,
            notes=(
                "Meant to be trained with its recipe (docs/course.md, NET V): whiten, SGD "
                "Nesterov with a triangular schedule, bias_lr_scale 64, lookahead, label "
                "smoothing 0.2, alternating flip, translate 2, flip+translate TTA."
            ),
        ),
    )
}


def get_net(name: str) -> NetSpec:
    """The registered spec for `name`, or UnknownNetError listing the known names."""
    try:
        return NETS[name]
    except KeyError:
        raise UnknownNetError(name) from None


# Output layers are pinned to float32 so that under a mixed-precision policy the softmax
# and the loss stay numerically stable (Keras mixed-precision guide); it changes nothing
# under the default float32 policy.


def build_net(
    name: str, input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = NUM_CLASSES
) -> keras.Model:
    return get_net(name).builder(input_shape=input_shape, num_classes=num_classes)
