"""Loss, optimizer and learning-rate schedule of a run (issue 11's levers), for every backend.

- `lr_at(config, t)`: the schedule as a plain function of the fractional epoch t (0 at the
  start of training, `epochs` at its end); the single definition the Keras schedule, the
  tests and the docs use.
- `EpochSchedule`: a Keras LearningRateSchedule that evaluates `lr_at` every optimizer step
  (t = step / steps_per_epoch), so warm-up and one-cycle are smooth within an epoch.
- `make_loss`: sparse categorical cross-entropy, with label smoothing when asked:
  loss = -sum_k y_k log p_k with y = (1 - eps) * onehot(label) + eps / K.
- `make_optimizer`: Adam, SGD, RMSprop or AdamW (decoupled weight decay), optional clipnorm.

The classes are registered as Keras serializables (package "cnn") so that a checkpoint
(model + optimizer) reloads; keras is imported by this module, so import it lazily.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from app.ml.params import TrainConfig

ONE_CYCLE_START_DIVISOR = 25.0  # one-cycle starts at peak / 25 (PyTorch's OneCycleLR default)
ONE_CYCLE_PEAK_FRACTION = 0.3  # peak at 30% of the run unless warmup_epochs says otherwise


def lr_at(t: float, *, peak: float, schedule: str, epochs: int, warmup_epochs: int = 0) -> float:
    """The learning rate at fractional epoch t (0 <= t <= epochs).

    constant:  peak, after a linear warm-up from 0 over `warmup_epochs`.
    cosine:    linear warm-up, then peak * (1 + cos(pi * progress)) / 2 down to 0 at the end.
    one_cycle: linear from peak/25 up to peak at `warmup_epochs` (30% of the epochs when 0),
               then linear down to 0 at the end (the fast-CIFAR "triangle").
    """
    t = min(max(t, 0.0), float(epochs))
    if schedule == "one_cycle":
        rise = warmup_epochs if warmup_epochs > 0 else ONE_CYCLE_PEAK_FRACTION * epochs
        start = peak / ONE_CYCLE_START_DIVISOR
        if t < rise:
            return start + (peak - start) * t / rise
        return peak * (epochs - t) / max(epochs - rise, 1e-12)
    if warmup_epochs > 0 and t < warmup_epochs:
        return peak * t / warmup_epochs
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        progress = (t - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}")


def config_lr_at(config: TrainConfig, t: float) -> float:
    return lr_at(
        t,
        peak=config.learning_rate,
        schedule=config.lr_schedule,
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
    )


@keras.saving.register_keras_serializable(package="cnn")
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`lr_at` evaluated at every optimizer step, t = step / steps_per_epoch."""

    def __init__(
        self,
        peak: float,
        schedule: str,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: int = 0,
    ) -> None:
        self.peak = float(peak)
        self.schedule = schedule
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_epochs = int(warmup_epochs)

    def __call__(self, step: Any) -> Any:
        t = ops.cast(step, "float32") / float(self.steps_per_epoch)
        t = ops.clip(t, 0.0, float(self.epochs))
        peak, epochs, warm = self.peak, float(self.epochs), float(self.warmup_epochs)
        if self.schedule == "one_cycle":
            rise = warm if warm > 0 else ONE_CYCLE_PEAK_FRACTION * epochs
            start = peak / ONE_CYCLE_START_DIVISOR
            up = start + (peak - start) * t / rise
            down = peak * (epochs - t) / max(epochs - rise, 1e-12)
            return ops.where(t < rise, up, down)
        if self.schedule == "constant":
            after = ops.full_like(t, peak)
        elif self.schedule == "cosine":
            progress = (t - warm) / max(epochs - warm, 1e-12)
            after = peak * 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown lr_schedule {self.schedule!r}")
        if warm > 0:
            return ops.where(t < warm, peak * t / warm, after)
        return after

    def get_config(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "schedule": self.schedule,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_epochs": self.warmup_epochs,
        }


@keras.saving.register_keras_serializable(package="cnn")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Sparse categorical cross-entropy on probabilities, with label smoothing eps:

    loss = -sum_k [(1 - eps) * [k == label] + eps / K] * log p_k
    (Keras' sparse loss has no label_smoothing argument; its categorical one does.)
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        num_classes: int = 10,
        name: str = "smoothed_sparse_crossentropy",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        onehot = ops.one_hot(labels, self.num_classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            onehot, y_pred, label_smoothing=self.label_smoothing
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "label_smoothing": self.label_smoothing,
            "num_classes": self.num_classes,
        }


def make_loss(config: TrainConfig, num_classes: int = 10) -> Any:
    """The course's loss; the smoothed variant only when label_smoothing > 0."""
    if config.label_smoothing > 0:
        return SmoothedSparseCrossentropy(config.label_smoothing, num_classes)
    return "sparse_categorical_crossentropy"


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> Any:
    """A float for the course's constant rate, else an EpochSchedule."""
    if config.lr_schedule == "constant" and config.warmup_epochs == 0:
        return config.learning_rate
    return EpochSchedule(
        config.learning_rate,
        config.lr_schedule,
        config.epochs,
        steps_per_epoch,
        config.warmup_epochs,
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> Any:
    """The run's optimizer, its schedule, decoupled weight decay (AdamW) and clipnorm."""
    classes = {
        "adam": keras.optimizers.Adam,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
        "adamw": keras.optimizers.AdamW,
    }
    kwargs: dict[str, Any] = {"learning_rate": make_schedule(config, steps_per_epoch)}
    if config.optimizer == "adamw":
        kwargs["weight_decay"] = config.weight_decay
    if config.clipnorm is not None:
        kwargs["clipnorm"] = config.clipnorm
    return classes[config.optimizer](**kwargs)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))


def current_learning_rate(optimizer: Any) -> float:
    """The rate the optimizer would use for its next step (a schedule evaluated at iterations)."""
    return float(ops.convert_to_numpy(optimizer.learning_rate))
