"""Data augmentation as Keras layers in front of the net, active only in training (issue 11).

Inside the model, so every training loop and backend (TensorFlow `fit`, a JAX loop) gets
it for free and the data pipeline stays plain arrays; `model(x, training=False)`,
`evaluate` and `predict` pass images through untouched.

- `RandomPadCrop(p)`: pad by p zero pixels on each side, crop a random 32x32 window per
  image (shifts of -p..p pixels, each equally likely), as in the ResNet/fast-CIFAR recipes.
- `keras.layers.RandomFlip("horizontal")`: mirror half of the images.
- `RandomPadCrop(p, mode="reflect")` (augment_translate): the same with reflection padding.
- `AlternatingFlip(steps_per_epoch)`: airbench's alternating flip; each image gets a seeded
  coin from its pixels; epoch 0 flips the images whose coin is 1, every later epoch flips
  exactly the images the epoch before did not. The epoch is counted by the layer itself.
- `Cutout(s)`: erase one s x s square per image, centred uniformly at random, clipped at the
  border (DeVries & Taylor, 2017).

The crop is a one-hot selection (two einsums), so it is exact, backend-neutral and cheap
next to a convolution. keras is imported by this module: import it lazily.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from app.ml.nets import INPUT_SHAPE
from app.ml.params import TrainConfig

AUGMENT_PREFIX = "augment_"


@keras.saving.register_keras_serializable(package="cnn")
class RandomPadCrop(keras.layers.Layer):
    """Zero-pad by `padding` pixels, then crop a random window of the input's size per image."""

    def __init__(
        self, padding: int, seed: int | None = None, mode: str = "constant", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.padding = int(padding)
        self.mode = mode
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training or self.padding == 0:
            return images
        p = self.padding
        height, width = int(images.shape[1]), int(images.shape[2])
        batch = ops.shape(images)[0]
        padded = ops.pad(images, [[0, 0], [p, p], [p, p], [0, 0]], mode=self.mode)
        offsets = keras.random.randint(
            (batch, 2), 0, 2 * p + 1, dtype="int32", seed=self.seed_generator
        )
        rows = offsets[:, :1] + ops.arange(height, dtype="int32")[None, :]  # (B, H)
        cols = offsets[:, 1:] + ops.arange(width, dtype="int32")[None, :]  # (B, W)
        pick_rows = ops.one_hot(rows, height + 2 * p, dtype=images.dtype)  # (B, H, H+2p)
        pick_cols = ops.one_hot(cols, width + 2 * p, dtype=images.dtype)  # (B, W, W+2p)
        picked = ops.einsum("bip,bpqc->biqc", pick_rows, padded)
        return ops.einsum("bjq,biqc->bijc", pick_cols, picked)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "padding": self.padding,
            "seed": self.seed,
            "mode": self.mode,
        }


@keras.saving.register_keras_serializable(package="cnn")
class AlternatingFlip(keras.layers.Layer):
    """Flip image i in epoch e iff coin_i XOR (e is odd) (airbench94's alternating flip).

    coin_i is the parity of the sum of a seeded random subset of the image's pixel values
    (x * 255, rounded: exact integers in float32), so it is fixed per image across epochs
    whatever order the loop shuffles the images in, and about half the images get 1. The
    layer counts its training calls in a non-trainable variable (saved with checkpoints);
    epoch = calls // steps_per_epoch.
    """

    def __init__(self, steps_per_epoch: int, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.seed = seed

    def build(self, input_shape: Any) -> None:
        self.calls = self.add_weight(
            name="calls", shape=(), initializer="zeros", dtype="int32", trainable=False
        )
        rng = np.random.default_rng(self.seed)
        self._mask = rng.integers(0, 2, size=tuple(int(d) for d in input_shape[1:]))

    def coin(self, images: Any) -> Any:
        """Each image's coin, 0 or 1 (int32, shape (batch,))."""
        pixels = ops.round(ops.cast(images, "float32") * 255.0)
        mask = ops.cast(self._mask, "float32")[None]
        total = ops.cast(ops.sum(pixels * mask, axis=(1, 2, 3)), "int32")
        return ops.mod(total, 2)

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training:
            return images
        epoch = ops.floor_divide(self.calls, self.steps_per_epoch)
        self.calls.assign(self.calls + 1)
        flip = ops.not_equal(self.coin(images), ops.mod(epoch, 2))
        return ops.where(flip[:, None, None, None], ops.flip(images, axis=2), images)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="cnn")
class Cutout(keras.layers.Layer):
    """Set one random `size` x `size` square of every image to 0 (centre uniform, clipped)."""

    def __init__(self, size: int, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = int(size)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training or self.size == 0:
            return images
        height, width = int(images.shape[1]), int(images.shape[2])
        batch = ops.shape(images)[0]
        centres = keras.random.uniform((batch, 2), 0.0, 1.0, seed=self.seed_generator)
        cy = ops.cast(centres[:, :1] * height, "int32")
        cx = ops.cast(centres[:, 1:] * width, "int32")
        top, left = cy - self.size // 2, cx - self.size // 2
        ys = ops.arange(height, dtype="int32")[None, :]
        xs = ops.arange(width, dtype="int32")[None, :]
        in_rows = ops.logical_and(ys >= top, ys < top + self.size)  # (B, H)
        in_cols = ops.logical_and(xs >= left, xs < left + self.size)  # (B, W)
        erased = ops.logical_and(in_rows[:, :, None], in_cols[:, None, :])  # (B, H, W)
        keep = ops.cast(ops.logical_not(erased), images.dtype)[..., None]
        return images * keep

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "size": self.size, "seed": self.seed}


def augmentation_layers(config: TrainConfig, steps_per_epoch: int = 1) -> list[Any]:
    """The layers the config asks for, in order (alternating flip) -> crop or translate ->
    (random) flip -> cutout (none by default). The alternating flip comes first because its
    coin is read from the image's pixels."""
    layers: list[Any] = []
    seed = config.seed
    alternating = config.augment_flip and config.augment_flip_mode == "alternating"
    if alternating:
        layers.append(AlternatingFlip(steps_per_epoch, seed=seed + 1, name=f"{AUGMENT_PREFIX}flip"))
    if config.augment_crop:
        layers.append(RandomPadCrop(config.augment_crop, seed=seed, name=f"{AUGMENT_PREFIX}crop"))
    if config.augment_translate:
        layers.append(
            RandomPadCrop(
                config.augment_translate,
                seed=seed,
                mode="reflect",
                name=f"{AUGMENT_PREFIX}translate",
            )
        )
    if config.augment_flip and not alternating:
        layers.append(
            keras.layers.RandomFlip("horizontal", seed=seed + 1, name=f"{AUGMENT_PREFIX}flip")
        )
    if config.cutout:
        layers.append(Cutout(config.cutout, seed=seed + 2, name=f"{AUGMENT_PREFIX}cutout"))
    return layers


def with_augmentation(
    net: keras.Model, config: TrainConfig, steps_per_epoch: int = 1
) -> keras.Model:
    """`net` behind the config's augmentation layers (the net itself when there are none)."""
    layers = augmentation_layers(config, steps_per_epoch)
    if not layers:
        return net
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, net(x), name=f"{net.name}_augmented")


def without_augmentation(model: keras.Model) -> keras.Model:
    """The net inside a `with_augmentation` model (the model itself when it has none)."""
    if not model.name.endswith("_augmented"):
        return model
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return inner[-1] if inner else model
