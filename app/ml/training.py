"""The training core (exercises 5, 6, 13, 14): compile, fit, report every epoch, checkpoint, resume.

No database and no HTTP here: the worker passes callbacks (`on_epoch`, `should_stop`) and a
checkpoint folder; the CLI passes nothing and gets a progress bar.

train() runs in four phases: `prepare` (the data subset, the validation split, the precision,
the seed), `build_or_resume` (a fresh compiled model, or the checkpoint's), `fit` (the
trainer of app/ml/loops.py that the loop names, with the service's callbacks; a cancel ends
it) and `result` (the TrainResult). Importing this module loads no framework, because the
worker reads checkpoints and configures the GPU through it before Keras may load: the
phases that need Keras import it (or a module that imports it) at their top.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.ml import backend, loops
from app.ml.data import Cifar10, subset
from app.ml.distribute import check_loop, data_parallel, describe_devices
from app.ml.nets import get_net
from app.ml.params import TrainConfig

if TYPE_CHECKING:
    import keras

    from app.ml.callbacks import EarlyStoppingRestore

CHECKPOINT_MODEL = "checkpoint.keras"
# The plain cross-entropy, compiled as a metric into every run: Keras logs it as `ce_loss` and,
# on the validation images, `val_ce_loss`. Unlike `val_loss` it leaves out label smoothing and
# L2 penalties, so it is the one validation loss that compares across jobs.
CE_METRIC = "ce_loss"
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
    # Plain cross-entropy on the validation images (CE_METRIC); None without validation data
    # and in records older than the metric.
    val_ce_loss: float | None = None

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
    `steps_per_epoch` is what a per-step learning-rate schedule counts epochs by. Every run
    also measures the plain cross-entropy (CE_METRIC), whatever its loss.
    """
    import keras

    from app.ml.augment import with_augmentation
    from app.ml.optim import make_loss, make_optimizer

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = with_augmentation(get_net(config.net).builder(), config, steps_per_epoch or 1)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch or 1, model),
        loss=make_loss(config),
        metrics=["accuracy", keras.metrics.SparseCategoricalCrossentropy(name=CE_METRIC)],
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


# ---------------------------------------------------------------------------- train
@dataclass(frozen=True)
class RunOptions:
    """train()'s keyword arguments: what the caller plugs into the epochs, and how they run."""

    on_epoch: Callable[[EpochRecord], None] | None = None
    should_stop: Callable[[], bool] | None = None
    checkpoint_dir: Path | None = None
    verbose: int = 0
    steps_per_execution: int | None = None  # None: the trainer's default for the device
    callbacks: tuple[Any, ...] = ()  # further Keras callbacks, after the service's


@dataclass(frozen=True, eq=False)
class Prepared:
    """What `prepare` hands on: the images a run trains and validates on, and its precision."""

    x_train: np.ndarray  # uint8
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    precision: str


@dataclass(frozen=True)
class Start:
    """What `build_or_resume` hands on: the model to train and the epochs it already holds."""

    model: keras.Model
    initial_epoch: int  # 0 for a fresh model


@dataclass(frozen=True)
class Fitted:
    """What `fit` hands on: the epochs it ran and how it ended."""

    records: list[EpochRecord]
    cancelled: bool
    best_epoch: int | None = None
    stopped_epoch: int | None = None


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
    configure_devices()
    trainer = loops.choose_trainer(check_loop(config.gpus, loop))
    options = RunOptions(
        on_epoch=on_epoch,
        should_stop=should_stop,
        checkpoint_dir=checkpoint_dir,
        verbose=verbose,
        steps_per_execution=steps_per_execution,
        callbacks=tuple(callbacks),
    )
    prepared = even_shards(prepare(config, data), config.gpus)
    # gpus > 1: the model is built (or loaded) and fitted data-parallel (app/ml/distribute.py).
    with data_parallel(config.gpus):
        start = build_or_resume(config, prepared, checkpoint_dir)
        fitted = fit(config, trainer, prepared, start, options)
    return result(prepared, start, fitted, config.gpus)


def prepare(config: TrainConfig, data: Cifar10) -> Prepared:
    """The run's precision, its images (the train_limit subset, then the validation split),
    and the seed of every random draw that follows (initial weights, shuffles, augmentation)."""
    import keras

    precision = resolve_precision(config.precision)
    if config.train_limit is not None:
        data = subset(data, config.train_limit, seed=config.seed)
    x_train, y_train, x_val, y_val = split_validation(
        np.asarray(data.x_train, dtype=np.uint8),
        np.asarray(data.y_train).reshape(-1),
        config.validation_split,
    )
    keras.utils.set_random_seed(config.seed)
    return Prepared(x_train, y_train, x_val, y_val, precision)


def even_shards(prepared: Prepared, gpus: int) -> Prepared:
    """The images cut to a multiple of `gpus` (at most gpus - 1 of each split left out): with
    batch_size a multiple too, every batch, the last partial one included, splits into equal
    shards, as DataParallel requires (app/ml/distribute.py). Unchanged for 0 or 1 GPU."""
    if gpus <= 1:
        return prepared
    n = len(prepared.x_train) - len(prepared.x_train) % gpus
    cut: dict[str, Any] = {"x_train": prepared.x_train[:n], "y_train": prepared.y_train[:n]}
    if prepared.x_val is not None and prepared.y_val is not None:
        m = len(prepared.x_val) - len(prepared.x_val) % gpus
        cut |= {"x_val": prepared.x_val[:m], "y_val": prepared.y_val[:m]}
    return replace(prepared, **cut)


def build_or_resume(config: TrainConfig, prepared: Prepared, checkpoint_dir: Path | None) -> Start:
    """The newest checkpoint's model (with its optimizer state), else a fresh compiled one."""
    import keras

    import app.ml.augment
    import app.ml.blocks  # noqa: F401  (the custom layers a checkpoint may hold)
    from app.ml.optim import steps_per_epoch

    done = checkpoint_epoch(checkpoint_dir)
    if done and checkpoint_dir is not None:
        return Start(keras.saving.load_model(checkpoint_model_path(checkpoint_dir)), done)
    steps = steps_per_epoch(len(prepared.x_train), config.batch_size)
    model = build_compiled(config, prepared.precision, steps)
    if config.whiten:  # from the images this run trains on (never the validation split's)
        from app.ml.blocks import init_whitening

        init_whitening(model, prepared.x_train, seed=config.seed)
    return Start(model, 0)


def fit(
    config: TrainConfig,
    trainer: loops.Trainer,
    prepared: Prepared,
    start: Start,
    options: RunOptions,
) -> Fitted:
    """Train the epochs after start.initial_epoch with `trainer` and the service's callbacks.

    A cancel (options.should_stop) ends it inside an epoch, which is then never reported. A
    run that had already finished, or stopped early, trains nothing: early stopping only
    hands back its best weights.
    """
    from app.ml.callbacks import (
        Cancelled,
        EarlyStoppingRestore,
        EpochReporter,
        LearningRateLogger,
        early_stopped,
    )

    stopper = (
        EarlyStoppingRestore(config.early_stopping_patience, state_dir=options.checkpoint_dir)
        if config.early_stopping_patience is not None
        else None
    )
    if start.initial_epoch >= config.epochs or early_stopped(options.checkpoint_dir):
        if stopper is not None:  # resumed after the last epoch: hand back the best weights
            stopper.set_model(start.model)
            stopper.on_train_begin()
            stopper.on_train_end()
        return _fitted([], False, stopper)
    earlier = checkpoint_records(options.checkpoint_dir) if start.initial_epoch else []
    epochs = _EpochLog(start.model, len(prepared.x_train), earlier, options)
    steps = math.ceil(len(prepared.x_train) / config.batch_size)
    plan = loops.FitPlan(
        model=start.model,
        x_train=prepared.x_train,
        y_train=prepared.y_train,
        x_val=prepared.x_val,
        y_val=prepared.y_val,
        batch_size=config.batch_size,
        epochs=config.epochs,
        initial_epoch=start.initial_epoch,
        # Order matters: the rate goes into the logs before the reporter reads them,
        # and early stopping decides after the epoch is checkpointed and reported.
        callbacks=(
            LearningRateLogger(),
            EpochReporter(epochs.report, options.should_stop),
            *([stopper] if stopper else []),
            *options.callbacks,
        ),
        steps_per_execution=(
            options.steps_per_execution or trainer.default_steps_per_execution(steps)
        ),
        seed=config.seed,
        verbose=options.verbose,
    )
    try:
        trainer.fit(plan)
    except Cancelled:
        return _fitted(epochs.records, True, stopper)
    return _fitted(epochs.records, False, stopper)


def _fitted(
    records: list[EpochRecord], cancelled: bool, stopper: EarlyStoppingRestore | None
) -> Fitted:
    if stopper is None:
        return Fitted(records, cancelled)
    return Fitted(records, cancelled, stopper.best_epoch, stopper.stopped_epoch)


def result(prepared: Prepared, start: Start, fitted: Fitted, gpus: int = 0) -> TrainResult:
    """The TrainResult; a finished run's model is exported (the plain net), a cancelled one's not."""
    return TrainResult(
        model=start.model if fitted.cancelled else export_model(start.model),
        epochs=fitted.records,
        cancelled=fitted.cancelled,
        device=describe_devices(gpus),
        precision=prepared.precision,
        resumed_from_epoch=start.initial_epoch,
        best_epoch=fitted.best_epoch,
        stopped_epoch=fitted.stopped_epoch,
    )


class _EpochLog:
    """The service's side of each finished epoch: its record, checkpoint and on_epoch call."""

    def __init__(
        self, model: keras.Model, n_train: int, earlier: list[EpochRecord], options: RunOptions
    ) -> None:
        self.model = model
        self.n_train = n_train
        self.earlier = earlier  # the epochs before a resume: every checkpoint holds them all
        self.checkpoint_dir = options.checkpoint_dir
        self.on_epoch = options.on_epoch
        self.records: list[EpochRecord] = []

    def report(
        self, epoch: int, logs: dict[str, Any], seconds: float, train_seconds: float
    ) -> None:
        """EpochReporter's `report`: record the epoch, checkpoint it, then tell the caller."""
        loss = float(logs["loss"])
        if math.isnan(loss) or math.isinf(loss):
            raise TrainingError(
                f"the training loss became {loss} in epoch {epoch + 1}; "
                "lower the learning rate or use precision=float32"
            )
        val_loss, val_acc = logs.get("val_loss"), logs.get("val_accuracy")
        val_ce = logs.get(f"val_{CE_METRIC}")
        rate = logs.get("learning_rate")
        record = EpochRecord(
            epoch=epoch + 1,
            loss=loss,
            accuracy=float(logs["accuracy"]),
            val_loss=None if val_loss is None else float(val_loss),
            val_accuracy=None if val_acc is None else float(val_acc),
            seconds=seconds,
            images_per_second=self.n_train / train_seconds,
            learning_rate=None if rate is None else float(rate),
            val_ce_loss=None if val_ce is None else float(val_ce),
        )
        if self.checkpoint_dir is not None:
            _write_checkpoint(
                self.model, self.checkpoint_dir, [*self.earlier, *self.records, record]
            )
        self.records.append(record)
        if self.on_epoch is not None:
            self.on_epoch(record)
