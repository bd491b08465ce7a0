"""The checkpoint is one atomic unit: a crash at any instant never pairs a model with the wrong epoch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.ml import training
from app.ml.training import (
    EpochRecord,
    _write_checkpoint,
    checkpoint_epoch,
    checkpoint_model_path,
    checkpoint_records,
)


def _record(epoch: int) -> EpochRecord:
    return EpochRecord(epoch, 1.0 / epoch, 0.5, 1.0, 0.4, 1.0, 100.0)


@pytest.fixture(scope="module")
def tiny_model():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")])
    model.compile(optimizer="adam", loss="mse")
    return model


def test_a_crash_between_the_model_and_the_marker_keeps_the_previous_epoch(
    tiny_model, tmp_path: Path, monkeypatch
):
    folder = tmp_path / "checkpoints" / "job"
    _write_checkpoint(tiny_model, folder, [_record(1), _record(2)])
    assert checkpoint_epoch(folder) == 2
    before = checkpoint_model_path(folder).read_bytes()

    # Epoch 3: the model is written, then the process dies before the unit is renamed.
    def die(*_args: object) -> None:
        raise KeyboardInterrupt("SIGKILL")

    monkeypatch.setattr(os, "rename", die)
    with pytest.raises(KeyboardInterrupt):
        _write_checkpoint(tiny_model, folder, [_record(1), _record(2), _record(3)])
    monkeypatch.undo()
    assert checkpoint_epoch(folder) == 2
    assert [r.epoch for r in checkpoint_records(folder)] == [1, 2]
    assert checkpoint_model_path(folder).read_bytes() == before
    assert checkpoint_model_path(folder).parent.name == "epoch-000002"

    _write_checkpoint(tiny_model, folder, [_record(1), _record(2), _record(3)])
    assert checkpoint_epoch(folder) == 3
    assert [p.name for p in folder.iterdir()] == ["epoch-000003"]  # older units removed


def test_temporary_names_are_unique_not_the_pid(tiny_model, tmp_path: Path, monkeypatch):
    seen: list[str] = []
    real_save = type(tiny_model).save

    def spy(model, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(Path(path).parent.name)
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model), "save", spy)
    # Two containers sharing the volume can have the same PID; their names still differ.
    _write_checkpoint(tiny_model, tmp_path / "a", [_record(1)])
    _write_checkpoint(tiny_model, tmp_path / "a", [_record(1), _record(2)])
    assert len(set(seen)) == 2 and all(str(os.getpid()) not in name for name in seen)


def test_a_flat_checkpoint_of_an_earlier_version_is_still_resumed(tiny_model, tmp_path: Path):
    import json

    folder = tmp_path / "old"
    folder.mkdir()
    tiny_model.save(folder / training.CHECKPOINT_MODEL)
    state = {"epoch": 4, "records": [_record(i).to_dict() for i in range(1, 5)]}
    (folder / training.CHECKPOINT_STATE).write_text(json.dumps(state))
    assert checkpoint_epoch(folder) == 4
    assert checkpoint_model_path(folder) == folder / training.CHECKPOINT_MODEL
