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
# airbench94's triangle: 0.2 x peak at the start, the peak at 23% of the steps, 0.07 x peak
# at the end (np.interp over [0, 0.23, 1] of the steps).
TRIANGULAR_START = 0.2
TRIANGULAR_PEAK_FRACTION = 0.23
TRIANGULAR_END = 0.07
LOOKAHEAD_DECAY = 0.95  # per step: a sync every N steps keeps 0.95^N * (step / total)^3


def lr_at(t: float, *, peak: float, schedule: str, epochs: int, warmup_epochs: int = 0) -> float:
    """The learning rate at fractional epoch t (0 <= t <= epochs).

    constant:  peak, after a linear warm-up from 0 over `warmup_epochs`.
    cosine:    linear warm-up, then peak * (1 + cos(pi * progress)) / 2 down to 0 at the end.
    one_cycle: linear from peak/25 up to peak at `warmup_epochs` (30% of the epochs when 0),
               then linear down to 0 at the end (the fast-CIFAR "triangle").
    triangular: airbench94's: linear from 0.2 x peak up to peak at `warmup_epochs` (23% of
               the epochs when 0), then linear down to 0.07 x peak at the end.
    """
    t = min(max(t, 0.0), float(epochs))
    if schedule == "triangular":
        rise = warmup_epochs if warmup_epochs > 0 else TRIANGULAR_PEAK_FRACTION * epochs
        if t < rise:
            return peak * (TRIANGULAR_START + (1.0 - TRIANGULAR_START) * t / rise)
        fall = (t - rise) / max(epochs - rise, 1e-12)
        return peak * (1.0 + (TRIANGULAR_END - 1.0) * fall)
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
        if self.schedule == "triangular":
            rise = warm if warm > 0 else TRIANGULAR_PEAK_FRACTION * epochs
            up = peak * (TRIANGULAR_START + (1.0 - TRIANGULAR_START) * t / rise)
            fall = (t - rise) / max(epochs - rise, 1e-12)
            down = peak * (1.0 + (TRIANGULAR_END - 1.0) * fall)
            return ops.where(t < rise, up, down)
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


@keras.saving.register_keras_serializable(package="cnn")
class RecipeSGD(keras.optimizers.SGD):
    """Keras' SGD plus NET V's recipe, each off by default (issue 21):

    - coupled weight decay: `weight_decay_coupled` * w is added to every gradient;
    - `bias_lr_scale`: the variables in `bias_paths` (BatchNormalization betas) step with
      lr * scale, and their coupled decay is divided by scale, so that the decay per step
      stays lr * wd * w (airbench's parameter groups);
    - `frozen_paths` stop changing after `freeze_after_step` steps (the whitening bias);
    - lookahead every `lookahead_steps`: slow = d * slow + (1 - d) * w, then w = slow, with
      d = 0.95^N * (step / total_steps)^3 (airbench94's schedule); at the last step the
      weights go back to the slow ones (d = 1) unless that step was a sync.

    Everything happens in `update_step`, one variable at a time, so it runs the same in
    `fit`, the tf.data loop and the JAX loop on any backend.
    """

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay_coupled: float = 0.0,
        bias_lr_scale: float = 1.0,
        bias_paths: tuple[str, ...] | list[str] = (),
        frozen_paths: tuple[str, ...] | list[str] = (),
        freeze_after_step: int = 0,
        lookahead_steps: int = 0,
        total_steps: int = 1,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("weight_decay", None)  # Keras' decoupled one; this class couples it
        super().__init__(
            learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, **kwargs
        )
        self.weight_decay_coupled = float(weight_decay_coupled)
        self.bias_lr_scale = float(bias_lr_scale)
        self.bias_paths = tuple(bias_paths)
        self.frozen_paths = tuple(frozen_paths)
        self.freeze_after_step = int(freeze_after_step)
        self.lookahead_steps = int(lookahead_steps)
        self.total_steps = max(1, int(total_steps))

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self.slow = (
            self.add_optimizer_variables(variables, "lookahead") if self.lookahead_steps else []
        )

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        learning_rate = ops.cast(learning_rate, dtype)
        # TensorFlow hands update_step its own variable, without Keras' `path`: look the
        # Keras variable up by the optimizer's index.
        path = self._trainable_variables[self._get_variable_index(variable)].path
        scale = self.bias_lr_scale if path in self.bias_paths else 1.0
        if self.weight_decay_coupled:
            gradient = gradient + (self.weight_decay_coupled / scale) * variable
        frozen = self.freeze_after_step > 0 and path in self.frozen_paths
        before = _read(variable) if frozen or self.lookahead_steps else None
        super().update_step(gradient, variable, learning_rate * scale)
        if self.lookahead_steps:
            self._lookahead(variable, before)
        if frozen:  # last, so that lookahead does not move it either
            keep = self.iterations >= self.freeze_after_step
            self.assign(variable, ops.where(keep, before, _read(variable)))

    def _lookahead(self, variable: Any, before: Any) -> None:
        slow = self.slow[self._get_variable_index(variable)]
        step = ops.cast(self.iterations, "float32")  # steps done before this one
        # The first step starts the slow weights at the weights before it (airbench takes the
        # lookahead state from the net before training).
        start = ops.equal(self.iterations, 0)
        done = step + 1.0  # steps done after this one
        sync = ops.equal(ops.mod(self.iterations + 1, self.lookahead_steps), 0)
        last = done >= float(self.total_steps)
        progress = ops.minimum(done / float(self.total_steps), 1.0)
        decay = (LOOKAHEAD_DECAY**self.lookahead_steps) * progress**3
        decay = ops.cast(ops.where(sync, decay, 1.0), variable.dtype)
        base = ops.where(start, before, _read(slow))
        now = _read(variable)
        moved = decay * base + (1.0 - decay) * now
        reset = ops.logical_or(sync, last)
        self.assign(slow, ops.where(reset, moved, base))
        self.assign(variable, ops.where(reset, moved, now))

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "weight_decay_coupled": self.weight_decay_coupled,
            "bias_lr_scale": self.bias_lr_scale,
            "bias_paths": list(self.bias_paths),
            "frozen_paths": list(self.frozen_paths),
            "freeze_after_step": self.freeze_after_step,
            "lookahead_steps": self.lookahead_steps,
            "total_steps": self.total_steps,
        }


def _read(variable: Any) -> Any:
    """The variable's current value as a tensor (a copy: later assigns do not change it)."""
    return ops.copy(ops.convert_to_tensor(variable))


def make_optimizer(
    config: TrainConfig, steps_per_epoch: int, model: keras.Model | None = None
) -> Any:
    """The run's optimizer, its schedule, weight decay (AdamW decoupled, SGD coupled),
    clipnorm, and for SGD the recipe of RecipeSGD (momentum, bias lr, lookahead)."""
    if config.optimizer == "sgd":
        return _recipe_sgd(config, steps_per_epoch, model)
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


def _recipe_sgd(config: TrainConfig, steps: int, model: keras.Model | None) -> RecipeSGD:
    bias_paths: list[str] = []
    frozen_paths: list[str] = []
    if model is not None:
        from app.ml.blocks import PatchWhitening

        for layer in _all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization) and layer.center:
                bias_paths.append(layer.beta.path)
            if isinstance(layer, PatchWhitening):
                frozen_paths.append(layer.bias.path)
    kwargs: dict[str, Any] = {}
    if config.clipnorm is not None:
        kwargs["clipnorm"] = config.clipnorm
    return RecipeSGD(
        learning_rate=make_schedule(config, steps),
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay_coupled=config.weight_decay,
        bias_lr_scale=config.bias_lr_scale,
        bias_paths=bias_paths if config.bias_lr_scale != 1.0 else (),
        frozen_paths=frozen_paths if config.whiten_bias_epochs else (),
        freeze_after_step=config.whiten_bias_epochs * steps,
        lookahead_steps=config.lookahead_steps,
        total_steps=config.epochs * steps,
        **kwargs,
    )


def _all_layers(model: Any) -> list[Any]:
    found: list[Any] = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found += _all_layers(layer)
    return found


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))


def current_learning_rate(optimizer: Any) -> float:
    """The rate the optimizer would use for its next step (a schedule evaluated at iterations)."""
    return float(ops.convert_to_numpy(optimizer.learning_rate))
