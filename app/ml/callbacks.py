"""The Keras callbacks that train() puts in every loop: the epoch reporter (timing, cancel),
and the levers of issue 11 (per-epoch learning rate, early stopping).

Plain `keras.callbacks.Callback`s, so they work in `fit` and in any loop that drives a
Keras CallbackList (on_train_begin, on_epoch_begin, on_train_batch_end, on_epoch_end with
logs, on_train_end, and stops when `model.stop_training` is set), whatever the backend.
keras is imported by this module: import it lazily.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from app.ml.optim import current_learning_rate

BEST_WEIGHTS = "best.weights.h5"
BEST_STATE = "best.json"

# report(epoch (0-based), the epoch's logs, its seconds, the seconds of its training steps)
EpochReport = Callable[[int, dict[str, Any], float, float], None]


class Cancelled(Exception):
    """Raised inside a loop to leave at once, skipping the epoch's validation pass."""


class EpochReporter(keras.callbacks.Callback):
    """Times each epoch, checks for cancel after every batch, then hands the epoch to `report`.

    `should_stop` is polled after every dispatched chunk of training steps and of validation
    steps; when it says so, Cancelled ends the loop before the epoch is reported.
    """

    def __init__(self, report: EpochReport, should_stop: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self.report = report
        self.should_stop = should_stop
        self._start = self._train_end = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()
        self._train_end = self._start

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._train_end = time.perf_counter()
        self._check_for_cancel()

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # The epoch's validation pass stops as promptly as training (cancel, shutdown).
        self._check_for_cancel()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        train_seconds = max(self._train_end - self._start, 1e-9)
        self.report(epoch, logs or {}, time.perf_counter() - self._start, train_seconds)

    def _check_for_cancel(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled()


class LearningRateLogger(keras.callbacks.Callback):
    """Puts `learning_rate` into each epoch's logs: the optimizer's rate at the epoch's end.

    With a per-step schedule that is the rate after the epoch's last step (what Keras'
    TensorBoard and CSVLogger callbacks report). Put it before callbacks that read the logs.
    """

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = current_learning_rate(self.model.optimizer)


class EarlyStoppingRestore(keras.callbacks.Callback):
    """Stop when val_loss has not improved for `patience` epochs; end with the best weights.

    "Improved" means strictly lower than the best so far, so the best epoch is the first
    epoch with the lowest val_loss (the same rule as app.ml.analysis.best_epoch). At the end
    of training (stopped early or not) the model gets the best epoch's weights back;
    `best_epoch` (1-based) says which. With `state_dir`, the best weights and the counters
    are kept on disk after every improvement, so a resumed run goes on where it was.
    """

    def __init__(self, patience: int, state_dir: Path | None = None) -> None:
        super().__init__()
        self.patience = int(patience)
        self.state_dir = state_dir
        self.best_epoch: int | None = None
        self.best_val_loss = math.inf
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_weights: list[Any] | None = None

    # -- resume ---------------------------------------------------------------------------
    def _paths(self) -> tuple[Path, Path] | None:
        if self.state_dir is None:
            return None
        return self.state_dir / BEST_WEIGHTS, self.state_dir / BEST_STATE

    def on_train_begin(self, logs: dict | None = None) -> None:
        paths = self._paths()
        if paths is None or not paths[1].is_file() or not paths[0].is_file():
            return
        state = json.loads(paths[1].read_text())
        self.best_epoch = int(state["best_epoch"])
        self.best_val_loss = float(state["best_val_loss"])
        self.wait = int(state["wait"])
        self.stopped_epoch = state.get("stopped_epoch")
        current = self.model.get_weights()
        self.model.load_weights(paths[0])
        self._best_weights = self.model.get_weights()
        self.model.set_weights(current)

    def _save(self) -> None:
        paths = self._paths()
        if paths is None:
            return
        weights_file, state_file = paths
        weights_file.parent.mkdir(parents=True, exist_ok=True)
        if self.wait == 0:  # a new best: its weights are the current ones
            tmp = weights_file.with_name(f"tmp-{os.getpid()}.weights.h5")
            self.model.save_weights(tmp)
            os.replace(tmp, weights_file)
        state = {
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
        }
        tmp_state = state_file.with_name(f"tmp-{os.getpid()}.best.json")
        tmp_state.write_text(json.dumps(state))
        os.replace(tmp_state, state_file)

    # -- the rule ---------------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get("val_loss")
        if value is None:
            return
        value = float(value)
        if value < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.wait = value, epoch + 1, 0
            self._best_weights = self.model.get_weights()
        else:
            self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True
        self._save()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)


def early_stopped(state_dir: Path | None) -> int | None:
    """The epoch at which an earlier attempt of this run stopped early, if it did."""
    if state_dir is None or not (state_dir / BEST_STATE).is_file():
        return None
    try:
        stopped = json.loads((state_dir / BEST_STATE).read_text()).get("stopped_epoch")
    except (ValueError, OSError):
        return None
    return None if stopped is None else int(stopped)
