"""The training core (exercises 5, 6, 13, 14): compile, fit, report every epoch, checkpoint, resume.

No database and no HTTP here: the worker passes callbacks (`on_epoch`, `should_stop`) and a
checkpoint folder; the CLI passes nothing and gets a progress bar.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.ml import backend
from app.ml.data import Cifar10, subset
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
# The backend-specific parts live in app/ml/backend.py; these names stay for callers.
def configure_devices() -> None:
    """GPU memory settings for a training worker (see backend.configure_memory)."""
    backend.configure_memory("worker")


def describe_device() -> str:
    """'GPU:0 <real name>' for the first visible GPU, else 'CPU'."""
    return backend.describe_device()


def resolve_precision(requested: str) -> str:
    return backend.resolve_precision(requested)


# ---------------------------------------------------------------------------- checkpoints
# A checkpoint is one folder per epoch, `epoch-000007/` holding the model (with its optimizer
# state) and the marker (epoch number and every epoch record so far). The folder is written
# under a temporary name and renamed into place, so the model and its marker are one atomic
# unit: a crash at any instant leaves either the complete new epoch or the previous one.
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")


def _epoch_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """The complete epoch folders in `checkpoint_dir`, newest first."""
    try:
        entries = list(checkpoint_dir.iterdir())
    except OSError:
        return []
    found = [(int(m.group(1)), p) for p in entries if (m := _EPOCH_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _read_state(folder: Path) -> dict[str, Any]:
    state_file = folder / CHECKPOINT_STATE
    if not state_file.is_file() or not (folder / CHECKPOINT_MODEL).is_file():
        return {}
    try:
        state = json.loads(state_file.read_text())
        int(state["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return dict(state)


def _checkpoint_folder(checkpoint_dir: Path | None) -> tuple[Path | None, dict[str, Any]]:
    """The newest usable checkpoint: (its folder, its marker), or (None, {})."""
    if checkpoint_dir is None:
        return None, {}
    for epoch, folder in _epoch_dirs(checkpoint_dir):
        state = _read_state(folder)
        if state and int(state["epoch"]) == epoch:
            return folder, state
    # The flat layout of earlier versions (model and marker side by side).
    state = _read_state(checkpoint_dir)
    return (checkpoint_dir, state) if state else (None, {})


def _checkpoint_state(checkpoint_dir: Path | None) -> dict[str, Any]:
    return _checkpoint_folder(checkpoint_dir)[1]


def checkpoint_epoch(checkpoint_dir: Path | None) -> int:
    """The last completed epoch stored in `checkpoint_dir`, 0 if there is no usable checkpoint."""
    return int(_checkpoint_state(checkpoint_dir).get("epoch", 0))


def checkpoint_records(checkpoint_dir: Path | None) -> list[EpochRecord]:
    """Every epoch record up to the checkpoint, so a caller can refill rows it never stored."""
    rows = _checkpoint_state(checkpoint_dir).get("records", [])
    return [EpochRecord(**row) for row in rows]


def checkpoint_model_path(checkpoint_dir: Path) -> Path:
    """The model file of the newest usable checkpoint (call only when checkpoint_epoch > 0)."""
    folder, _ = _checkpoint_folder(checkpoint_dir)
    if folder is None:
        raise FileNotFoundError(f"no usable checkpoint in {checkpoint_dir}")
    return folder / CHECKPOINT_MODEL


def _write_checkpoint(model: keras.Model, checkpoint_dir: Path, records: list[EpochRecord]) -> None:
    """Write epoch-N/ (model + marker) under a unique temporary name, then rename it into place.

    The temporary name is random (not the PID, which repeats across containers sharing the
    volume). Older epoch folders are removed once the new one is in place.
    """
    epoch = records[-1].epoch
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / f".tmp-{uuid.uuid4().hex}"
    final = checkpoint_dir / f"epoch-{epoch:06d}"
    try:
        tmp.mkdir()
        model.save(tmp / CHECKPOINT_MODEL)
        state = {"epoch": epoch, "records": [r.to_dict() for r in records]}
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))
        if final.exists():  # the same epoch trained again after a restart from scratch
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for older, folder in _epoch_dirs(checkpoint_dir):
        if older != epoch:
            shutil.rmtree(folder, ignore_errors=True)
    for name in (CHECKPOINT_MODEL, CHECKPOINT_STATE):  # a flat checkpoint of earlier versions
        (checkpoint_dir / name).unlink(missing_ok=True)


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

        def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
            # The epoch's validation pass stops as promptly as training (cancel, shutdown).
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
    loop: str = "auto",
    steps_per_execution: int | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Fit `config.net` on `data` (train split only; the test split is the caller's to evaluate).

    on_epoch gets each finished epoch right after its checkpoint is written; should_stop is
    polled after every dispatched chunk of steps (every batch on the plain `fit`) and a
    cancelled epoch is never reported. A checkpoint found in checkpoint_dir is resumed from:
    training continues with the next epoch. `loop` picks the training loop (app/ml/loops.py:
    `auto` = the fastest for the backend, `fit` = the course's plain model.fit);
    steps_per_execution defaults per loop and device. `callbacks` are further Keras
    callbacks, driven by every loop as `fit` drives them (after the service's reporter).
    """
    import keras

    from app.ml import loops

    configure_devices()
    loop = loops.choose_loop(loop)
    precision = resolve_precision(config.precision)
    if config.train_limit is not None:
        data = subset(data, config.train_limit, seed=config.seed)
    x_train, y_train, x_val, y_val = split_validation(
        np.asarray(data.x_train, dtype=np.uint8),
        np.asarray(data.y_train).reshape(-1),
        config.validation_split,
    )

    from app.ml.callbacks import EarlyStoppingRestore, LearningRateLogger, early_stopped
    from app.ml.optim import steps_per_epoch

    keras.utils.set_random_seed(config.seed)
    done = checkpoint_epoch(checkpoint_dir)
    if done:
        assert checkpoint_dir is not None
        model = keras.saving.load_model(checkpoint_model_path(checkpoint_dir))
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
        common: dict[str, Any] = {
            "batch_size": config.batch_size,
            "epochs": config.epochs,
            "initial_epoch": done,
            # Order matters: the rate goes into the logs before the reporter reads them,
            # and early stopping decides after the epoch is checkpointed and reported.
            "callbacks": [
                LearningRateLogger(),
                reporter,
                *([stopper] if stopper else []),
                *callbacks,
            ],
            "verbose": verbose,
        }
        steps = math.ceil(len(x_train) / config.batch_size)
        spe = steps_per_execution or loops.default_steps_per_execution(loop, steps)
        try:
            if loop == "fit":
                loops.run_fit(
                    model, x_train, y_train, x_val, y_val, steps_per_execution=spe, **common
                )
            elif loop == "data":
                loops.run_data(
                    model,
                    x_train,
                    y_train,
                    x_val,
                    y_val,
                    steps_per_execution=spe,
                    seed=config.seed,
                    **common,
                )
            else:
                loops.run_device(
                    model,
                    x_train,
                    y_train,
                    x_val,
                    y_val,
                    steps_per_execution=spe,
                    seed=config.seed,
                    **common,
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
