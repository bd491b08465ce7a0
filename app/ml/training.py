"""The training core (exercises 5, 6, 13, 14): compile, fit, report every epoch, checkpoint, resume.

No database and no HTTP here: the worker passes callbacks (`on_epoch`, `should_stop`) and a
checkpoint folder; the CLI passes nothing and gets a progress bar.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.ml.data import Cifar10, normalise, subset
from app.ml.nets import get_net
from app.ml.params import TrainConfig

if TYPE_CHECKING:
    import keras

CHECKPOINT_MODEL = "checkpoint.keras"
CHECKPOINT_STATE = "checkpoint.json"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch, as the worker stores it and the API returns it."""

    epoch: int  # 1-based
    loss: float
    accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    images_per_second: float
    learning_rate: float | None = None  # the optimizer's rate at the epoch's end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    model: keras.Model
    epochs: list[EpochRecord]  # epochs run by this call; after a resume only the new ones
    cancelled: bool
    device: str
    precision: str
    resumed_from_epoch: int = 0
    # Early stopping (issue 11): the epoch whose weights the model holds, and where it stopped.
    best_epoch: int | None = None
    stopped_epoch: int | None = None


class _Cancelled(Exception):
    """Raised inside fit() to leave at once, skipping the epoch's validation pass."""


# ---------------------------------------------------------------------------- devices
def configure_devices() -> None:
    """Let TensorFlow grow GPU memory instead of grabbing it all (one worker per GPU)."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised: growth can only be set before first use


def describe_device() -> str:
    """'GPU:0 <name>' for the first visible GPU, else 'CPU'."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return f"GPU:0 {name}"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str) -> str:
    """Pick the Keras dtype policy: `auto` means bfloat16 where the hardware computes it natively."""
    if requested != "auto":
        return requested
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        if capability and capability >= (8, 0):
            return "mixed_bfloat16"
        return "mixed_float16" if capability and capability >= (7, 0) else "float32"
    return "mixed_bfloat16" if _cpu_has_bf16() else "float32"


# ---------------------------------------------------------------------------- checkpoints
def _checkpoint_state(checkpoint_dir: Path | None) -> dict[str, Any]:
    if checkpoint_dir is None:
        return {}
    state_file = checkpoint_dir / CHECKPOINT_STATE
    if not state_file.is_file() or not (checkpoint_dir / CHECKPOINT_MODEL).is_file():
        return {}
    try:
        state = json.loads(state_file.read_text())
        int(state["epoch"])
    except (ValueError, KeyError, TypeError):
        return {}
    return dict(state)


def checkpoint_epoch(checkpoint_dir: Path | None) -> int:
    """The last completed epoch stored in `checkpoint_dir`, 0 if there is no usable checkpoint."""
    return int(_checkpoint_state(checkpoint_dir).get("epoch", 0))


def checkpoint_records(checkpoint_dir: Path | None) -> list[EpochRecord]:
    """Every epoch record up to the checkpoint, so a caller can refill rows it never stored."""
    rows = _checkpoint_state(checkpoint_dir).get("records", [])
    return [EpochRecord(**row) for row in rows]


def _write_checkpoint(model: keras.Model, checkpoint_dir: Path, records: list[EpochRecord]) -> None:
    """Model + optimizer state, then the epoch marker with the records; each replaced atomically."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp_model = checkpoint_dir / f"tmp-{os.getpid()}.keras"
    model.save(tmp_model)
    os.replace(tmp_model, checkpoint_dir / CHECKPOINT_MODEL)
    state = {"epoch": records[-1].epoch, "records": [r.to_dict() for r in records]}
    tmp_state = checkpoint_dir / f"tmp-{os.getpid()}.json"
    tmp_state.write_text(json.dumps(state))
    os.replace(tmp_state, checkpoint_dir / CHECKPOINT_STATE)


# ---------------------------------------------------------------------------- model
def build_compiled(
    config: TrainConfig, precision: str, steps_per_epoch: int | None = None
) -> keras.Model:
    """Build the net under `precision` and compile it with the run's optimizer (exercise 5).

    The levers (app.ml.optim, app.ml.augment) change nothing unless the config asks:
    augmentation layers in front of the net, smoothed loss, schedule, AdamW, clipnorm.
    `steps_per_epoch` is what a per-step learning-rate schedule counts epochs by.
    """
    import keras

    from app.ml.augment import with_augmentation
    from app.ml.optim import make_loss, make_optimizer

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = with_augmentation(get_net(config.net).builder(), config)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch or 1),
        loss=make_loss(config),
        metrics=["accuracy"],
    )
    return model


def export_model(model: keras.Model) -> keras.Model:
    """The model to evaluate and store: the plain net, compiled with the course's loss.

    Augmentation layers are dropped (they are the identity outside training) and a
    label-smoothed loss is replaced by plain cross-entropy, so a stored model is the net
    alone with built-in layers only, and test losses compare across runs. The course's
    nets without levers come back unchanged.
    """
    from app.ml.augment import without_augmentation

    net = without_augmentation(model)
    if net is model and isinstance(model.loss, str):
        return model
    net.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return net


def split_validation(
    x: np.ndarray, y: np.ndarray, validation_split: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Keras' validation_split semantics: the last fraction of the samples, before shuffling."""
    if validation_split <= 0:
        return x, y, None, None
    cut = int(len(x) * (1.0 - validation_split))
    if cut < 1 or cut >= len(x):
        raise ValueError(
            f"validation_split={validation_split} leaves no training or no validation data "
            f"for {len(x)} images"
        )
    return x[:cut], y[:cut], x[cut:], y[cut:]


# ---------------------------------------------------------------------------- callbacks
def _make_callback(
    n_train: int,
    on_epoch: Callable[[EpochRecord], None] | None,
    should_stop: Callable[[], bool] | None,
    checkpoint_dir: Path | None,
    records: list[EpochRecord],
    earlier: list[EpochRecord],
) -> Any:
    import keras

    class _Reporter(keras.callbacks.Callback):
        """Times each epoch, checks for cancel after every batch, checkpoints, then reports."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()
            self._train_end = self._start

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self._train_end = time.perf_counter()
            if should_stop is not None and should_stop():
                raise _Cancelled()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            loss = float(logs["loss"])
            if math.isnan(loss) or math.isinf(loss):
                raise TrainingError(
                    f"the training loss became {loss} in epoch {epoch + 1}; "
                    "lower the learning rate or use precision=float32"
                )
            train_seconds = max(self._train_end - self._start, 1e-9)
            val_loss, val_acc = logs.get("val_loss"), logs.get("val_accuracy")
            rate = logs.get("learning_rate")
            record = EpochRecord(
                epoch=epoch + 1,
                loss=loss,
                accuracy=float(logs["accuracy"]),
                val_loss=None if val_loss is None else float(val_loss),
                val_accuracy=None if val_acc is None else float(val_acc),
                seconds=time.perf_counter() - self._start,
                images_per_second=n_train / train_seconds,
                learning_rate=None if rate is None else float(rate),
            )
            if checkpoint_dir is not None:
                _write_checkpoint(self.model, checkpoint_dir, [*earlier, *records, record])
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)

    return _Reporter()


# ---------------------------------------------------------------------------- train
def train(
    config: TrainConfig,
    data: Cifar10,
    *,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_dir: Path | None = None,
    verbose: int = 0,
) -> TrainResult:
    """Fit `config.net` on `data` (train split only; the test split is the caller's to evaluate).

    on_epoch gets each finished epoch right after its checkpoint is written; should_stop is
    polled after every batch and a cancelled epoch is never reported. A checkpoint found in
    checkpoint_dir is resumed from: the fit continues with the next epoch.
    """
    import keras

    configure_devices()
    precision = resolve_precision(config.precision)
    if config.train_limit is not None:
        data = subset(data, config.train_limit, seed=config.seed)
    x_train, y_train, x_val, y_val = split_validation(
        normalise(data.x_train), np.asarray(data.y_train).reshape(-1), config.validation_split
    )

    from app.ml.callbacks import EarlyStoppingRestore, LearningRateLogger, early_stopped
    from app.ml.optim import steps_per_epoch

    keras.utils.set_random_seed(config.seed)
    done = checkpoint_epoch(checkpoint_dir)
    if done:
        assert checkpoint_dir is not None
        model = keras.saving.load_model(checkpoint_dir / CHECKPOINT_MODEL)
    else:
        model = build_compiled(config, precision, steps_per_epoch(len(x_train), config.batch_size))

    records: list[EpochRecord] = []
    cancelled = False
    stopper = (
        EarlyStoppingRestore(config.early_stopping_patience, state_dir=checkpoint_dir)
        if config.early_stopping_patience is not None
        else None
    )
    if done < config.epochs and not early_stopped(checkpoint_dir):
        earlier = checkpoint_records(checkpoint_dir) if done else []
        reporter = _make_callback(
            len(x_train), on_epoch, should_stop, checkpoint_dir, records, earlier
        )
        # Order matters: the rate goes into the logs before the reporter reads them, and
        # early stopping decides after the epoch is checkpointed and reported.
        callbacks = [LearningRateLogger(), reporter, *([stopper] if stopper else [])]
        try:
            model.fit(
                x_train,
                y_train,
                batch_size=config.batch_size,
                epochs=config.epochs,
                initial_epoch=done,
                validation_data=None if x_val is None else (x_val, y_val),
                shuffle=True,
                callbacks=callbacks,
                verbose=verbose,
            )
        except _Cancelled:
            cancelled = True
    elif stopper is not None:  # resumed after the last epoch: hand back the best weights
        stopper.set_model(model)
        stopper.on_train_begin()
        stopper.on_train_end()
    return TrainResult(
        model=model if cancelled else export_model(model),
        epochs=records,
        cancelled=cancelled,
        device=describe_device(),
        precision=precision,
        resumed_from_epoch=done,
        best_epoch=None if stopper is None else stopper.best_epoch,
        stopped_epoch=None if stopper is None else stopper.stopped_epoch,
    )
