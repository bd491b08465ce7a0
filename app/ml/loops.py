"""The training loops behind `training.train`: one trainer class per loop, behind one interface.

A trainer runs the epochs of one `FitPlan` (`Trainer.fit(plan) -> None`). As in Keras' own
trainers (keras/src/backend/jax/trainer.py, .../tensorflow/trainer.py), there is one class
per backend behind one interface, and `choose_trainer` picks it once, from the TRAINERS
table, by the loop's name:

- `fit` (`FitTrainer`, every backend): the course's plain path, `model.fit` on float32
  arrays (x / 255), one step per call.
- `data` (`app.ml.loops_tf.DataTrainer`, TensorFlow): `model.fit` on a `tf.data` pipeline
  that gathers shuffled batches from the uint8 arrays and normalises on the fly, with
  several steps per execution.
- `device` (`app.ml.loops_jax.DeviceTrainer`, JAX): the uint8 training set is put on the
  device once; each epoch is shuffled there and run as a few compiled `jax.lax.scan`s over
  chunks of steps of Keras' stateless `train_step`; validation likewise.

Every trainer takes the raw uint8 images and drives the same Keras `CallbackList` as `fit`
does (`on_train_begin`, `on_epoch_begin`, `on_train_batch_end` once per dispatched chunk of
steps, `on_epoch_end` with the epoch's logs, `on_train_end`; it stops when
`model.stop_training` is set), and the model's variables are in sync at every epoch end, so
callbacks (the service's reporter and checkpoints, early stopping, learning-rate logging)
work the same in each. The course's semantics are kept exactly: batch size, one optimizer
update per batch with ceil(n / batch) batches per epoch (the last one partial), every image
once per epoch, loss and accuracy weighted by samples as `fit` reports them.

This module imports no framework. A trainer's module imports its own at the top and is
imported only when its loop is chosen, so a TensorFlow process never loads JAX, nor the
reverse. A new loop (say, a multi-device JAX trainer over keras.distribution.DataParallel)
is a Trainer subclass in its own module and one row in TRAINERS; what it needs beyond
today's plan (a distribution) becomes one more FitPlan field.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.ml import backend
from app.ml.data import normalise

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True, eq=False)
class FitPlan:
    """Everything a trainer needs for one call: the model, the images and the epochs to run."""

    model: keras.Model  # compiled, or loaded from a checkpoint with its optimizer state
    x_train: np.ndarray  # uint8 (N, 32, 32, 3)
    y_train: np.ndarray  # labels (N,)
    x_val: np.ndarray | None  # uint8, None without a validation split
    y_val: np.ndarray | None
    batch_size: int
    epochs: int  # as in Keras' `fit`: run the 0-based epochs initial_epoch .. epochs - 1
    initial_epoch: int  # the epochs already done (a resumed run's checkpoint)
    callbacks: tuple[Any, ...]  # Keras callbacks, driven in this order
    steps_per_execution: int  # steps per dispatch, and so per on_train_batch_end
    seed: int  # the shuffle's seed, where the trainer shuffles by itself
    verbose: int = 0

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, the last one partial."""
        return math.ceil(len(self.x_train) / self.batch_size)

    @property
    def validation(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(x_val, y_val), or None when the run has no validation split."""
        if self.x_val is None or self.y_val is None:
            return None
        return self.x_val, self.y_val


class Trainer(ABC):
    """Runs the epochs of a FitPlan on one backend."""

    def default_steps_per_execution(self, steps_per_epoch: int) -> int:
        """Steps per dispatch when the caller does not say: one, as the course runs `fit`."""
        return 1

    @abstractmethod
    def fit(self, plan: FitPlan) -> None:
        """Train plan.model from plan.initial_epoch up to plan.epochs, driving plan.callbacks."""


def chunked_steps(steps_per_epoch: int) -> int:
    """Steps per dispatch of the compiled loops. On a GPU a whole epoch is a few milliseconds
    per step of work, so up to 256 steps (two chunks for CIFAR-10's 312 full batches); on a
    CPU 32 steps, which keeps a cancel within seconds for NET I and under a minute for the
    largest nets."""
    limit = 256 if backend.on_gpu() else 32
    return max(1, min(steps_per_epoch, limit))


class KerasFitTrainer(Trainer):
    """A loop that Keras' own `model.fit` drives; a subclass says what `fit` is fed."""

    @abstractmethod
    def training_data(self, plan: FitPlan) -> dict[str, Any]:
        """`model.fit`'s training arguments (x, and y, batch_size, shuffle as the data needs)."""

    @abstractmethod
    def validation_data(self, plan: FitPlan) -> Any:
        """`model.fit`'s validation_data: None without a validation split."""

    def fit(self, plan: FitPlan) -> None:
        model = plan.model
        model.steps_per_execution = plan.steps_per_execution
        # Rebuilt by `fit` for these steps, after it has built the metrics: under a
        # distribution the compiled step needs every variable's layout, metrics included.
        model.train_function = None
        model.fit(
            **self.training_data(plan),
            epochs=plan.epochs,
            initial_epoch=plan.initial_epoch,
            validation_data=self.validation_data(plan),
            callbacks=list(plan.callbacks),
            verbose=plan.verbose,
        )


class FitTrainer(KerasFitTrainer):
    """`fit`: the course's plain path, float32 arrays (x / 255) batched and shuffled by Keras."""

    def training_data(self, plan: FitPlan) -> dict[str, Any]:
        return {
            "x": normalise(plan.x_train),
            "y": plan.y_train,
            "batch_size": plan.batch_size,
            "shuffle": True,
        }

    def validation_data(self, plan: FitPlan) -> Any:
        if plan.validation is None:
            return None
        x_val, y_val = plan.validation
        return normalise(x_val), y_val


@dataclass(frozen=True)
class TrainerEntry:
    """One row of TRAINERS: where a loop's trainer lives and the backends it runs on."""

    module: str  # imported when the loop is chosen (it imports its framework at its top)
    class_name: str
    backends: tuple[str, ...]


TRAINERS: dict[str, TrainerEntry] = {
    "fit": TrainerEntry(__name__, "FitTrainer", backend.BACKENDS),
    "data": TrainerEntry("app.ml.loops_tf", "DataTrainer", ("tensorflow",)),
    "device": TrainerEntry("app.ml.loops_jax", "DeviceTrainer", ("jax",)),
}
AUTO: dict[str, str] = {"tensorflow": "data", "jax": "device"}  # the fastest loop per backend


def choose_trainer(loop: str) -> Trainer:
    """The trainer of `loop` for this process' backend; `auto` = AUTO's loop for the backend."""
    if loop != "auto" and loop not in TRAINERS:
        known = ", ".join(("auto", *TRAINERS))
        raise ValueError(f"loop must be one of {known}. Received: loop={loop!r}")
    running = backend.name()
    name = AUTO[running] if loop == "auto" else loop
    entry = TRAINERS[name]
    if running not in entry.backends:
        raise ValueError(f"loop={name!r} needs KERAS_BACKEND={' or '.join(entry.backends)}")
    trainer_class = getattr(importlib.import_module(entry.module), entry.class_name)
    trainer: Trainer = trainer_class()
    return trainer
