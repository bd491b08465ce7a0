"""NET V's building blocks (issue 21, after airbench94: Jordan, 2024, arXiv:2404.00498).

- `PatchWhitening`: a 2x2 'valid' convolution whose kernel is frozen and, once
  `init_whitening` has seen the training images, whitens their 2x2 patches: the 12
  eigenvectors of the patch covariance, each scaled by 1/sqrt(eigenvalue + eps), and their
  negatives (so a following GELU/ReLU keeps both signs). Only its bias is trainable, and only
  for the first `whiten_bias_epochs` (app.ml.optim.RecipeSGD freezes it after that).
- `PartialDirac`: an initializer that makes the first `in_channels` filters of a 3x3
  convolution the identity (dirac), the rest of the filters drawn as usual; a fresh block
  then starts close to passing its input through, which trains faster without residuals.
- `no_affine_bn`: batch normalisation with a bias and no scale (a scale after a convolution
  without bias is redundant with the next layer's weights); its bias gets `bias_lr_scale`.

keras is imported by this module: import it lazily.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from app.ml.pixels import normalise

WHITEN_EPS = 5e-4  # relative to the mean eigenvalue (airbench's 5e-4 on unit-variance data)
WHITEN_PATCH = 2
WHITEN_IMAGES = 5000  # airbench94 estimates the covariance from 5,000 training images


@keras.saving.register_keras_serializable(package="cnn")
class PatchWhitening(keras.layers.Layer):
    """2x2 'valid' convolution, 3 -> 2 * 12 channels, frozen kernel, trainable bias."""

    def __init__(self, patch: int = WHITEN_PATCH, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.patch = int(patch)

    def build(self, input_shape: Any) -> None:
        channels = int(input_shape[-1])
        self.eigen = self.patch * self.patch * channels
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.patch, self.patch, channels, 2 * self.eigen),
            initializer="glorot_uniform",
            trainable=False,
        )
        self.bias = self.add_weight(
            name="bias", shape=(2 * self.eigen,), initializer="zeros", trainable=True
        )

    def call(self, images: Any) -> Any:
        out = ops.conv(images, ops.cast(self.kernel, images.dtype), padding="valid")
        return out + ops.cast(self.bias, images.dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        height, width = input_shape[1], input_shape[2]
        p = self.patch
        return (
            input_shape[0],
            None if height is None else height - p + 1,
            None if width is None else width - p + 1,
            2 * p * p * int(input_shape[-1]),
        )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "patch": self.patch}


def image_patches(images: np.ndarray, patch: int = WHITEN_PATCH) -> np.ndarray:
    """Every patch x patch window (stride 1) of float images (N, H, W, C), flattened in the
    kernel's (row, column, channel) order: (N * (H-p+1) * (W-p+1), p * p * C)."""
    n, h, w, c = images.shape
    windows = [
        images[:, i : h - patch + 1 + i, j : w - patch + 1 + j, :]
        for i in range(patch)
        for j in range(patch)
    ]
    stacked = np.stack(windows, axis=3)  # (N, H', W', p*p, C)
    return stacked.reshape(-1, patch * patch * c)


def whitening_weights(
    patches: np.ndarray, eps: float = WHITEN_EPS
) -> tuple[np.ndarray, np.ndarray]:
    """(kernel columns (D, 2D), bias (2D,)) that map a patch x to W^T (x - mean) and its
    negative, W = eigenvectors / sqrt(eigenvalue + eps * mean eigenvalue)."""
    x = patches.astype(np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / len(x)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    scaled = vectors / np.sqrt(values + eps * values.mean())
    columns = np.concatenate([scaled, -scaled], axis=1)
    return columns.astype(np.float32), (-(mean @ columns)).astype(np.float32)


def init_whitening(model: keras.Model, x_train_uint8: np.ndarray, seed: int = 0) -> None:
    """Set every PatchWhitening layer of `model` from up to 5,000 training images (x / 255)."""
    layers = find_whitening(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no PatchWhitening layer to initialise")
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(x_train_uint8))[:WHITEN_IMAGES]
    images = normalise(np.asarray(x_train_uint8)[np.sort(pick)])
    for layer in layers:
        columns, bias = whitening_weights(image_patches(images, layer.patch))
        layer.kernel.assign(columns.reshape(tuple(layer.kernel.shape)))
        layer.bias.assign(bias)


def find_whitening(model: keras.Model) -> list[PatchWhitening]:
    """The PatchWhitening layers of `model`, looking inside nested models (augmentation)."""
    found: list[PatchWhitening] = []
    for layer in model.layers:
        if isinstance(layer, PatchWhitening):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found += find_whitening(layer)
    return found


@keras.saving.register_keras_serializable(package="cnn")
class PartialDirac(keras.initializers.Initializer):
    """A conv kernel (kh, kw, in, out): filters [0, min(in, out)) are the identity on their
    own channel (1 at the centre tap), the others are drawn by `base` (He-uniform)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def __call__(self, shape: Any, dtype: Any = None) -> Any:
        kh, kw, c_in, c_out = (int(d) for d in shape)
        drawn = keras.initializers.HeUniform(seed=self.seed)(shape, dtype=dtype)
        k = min(c_in, c_out)
        dirac = np.zeros((kh, kw, c_in, c_out), dtype="float32")
        dirac[kh // 2, kw // 2, np.arange(k), np.arange(k)] = 1.0
        keep = np.ones((c_out,), dtype="float32")
        keep[:k] = 0.0
        return drawn * ops.cast(keep, drawn.dtype) + ops.cast(dirac, drawn.dtype)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


def no_affine_bn(name: str, momentum: float = 0.4) -> keras.layers.BatchNormalization:
    """BN with a bias (beta) and no scale, PyTorch momentum 0.6 (= Keras 0.4), eps 1e-12."""
    return keras.layers.BatchNormalization(momentum=momentum, epsilon=1e-12, scale=False, name=name)
