"""Each finished epoch made durable before it is recorded: the store's checkpoint, then the row.

The training core writes an epoch's checkpoint into the local folder and then reports the
epoch (train()'s on_epoch); early stopping saves its state after that. `DurableEpochs` is
the last of the fit's callbacks, so when it sees the epoch end every file of the epoch is on
disk: it hands them to the store (`CheckpointSync.epoch_done`), which stores the epoch's row
once the checkpoint is durable (at once for the folder store, after the background upload
for an object store). The stored history is therefore never ahead of the store's
checkpoint, which is what lets the next claim, on any host, resume without a gap.

keras is imported by this module: import it lazily (the runner does, in the fit phase).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from app.ml.training import EpochRecord
from app.registry.store import CheckpointSync


class DurableEpochs(keras.callbacks.Callback):
    """Pass `on_epoch` as train()'s on_epoch and the instance as its last callback."""

    def __init__(self, checkpoints: CheckpointSync, record: Callable[[EpochRecord], None]) -> None:
        super().__init__()
        self._checkpoints = checkpoints
        self._record = record
        self._pending: EpochRecord | None = None

    def on_epoch(self, record: EpochRecord) -> None:
        """The epoch's record, its checkpoint just written: kept until the epoch's end."""
        self._pending = record

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        record, self._pending = self._pending, None
        if record is not None:
            self._checkpoints.epoch_done(record.epoch, lambda: self._record(record))
