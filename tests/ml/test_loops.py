"""app/ml/loops.py: the trainer table, the plan every trainer gets, and where frameworks load."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from app.ml import backend, loops
from app.ml.training import TrainConfig, train

from .test_training import synthetic

ROOT = Path(__file__).resolve().parents[2]


class PlanRecorder(loops.FitTrainer):
    """The plain `fit` trainer that keeps every plan it is given (a row added to TRAINERS)."""

    plans: list[loops.FitPlan] = []

    def fit(self, plan: loops.FitPlan) -> None:
        self.plans.append(plan)
        super().fit(plan)


def config(**overrides):
    base = dict(net="net1", epochs=2, batch_size=32, precision="float32", seed=1)
    return TrainConfig(**(base | overrides))


def test_auto_picks_the_fastest_trainer_of_this_backend():
    trainer = loops.choose_trainer("auto")
    entry = loops.TRAINERS[loops.AUTO[backend.name()]]
    assert isinstance(trainer, loops.Trainer)
    assert type(trainer).__name__ == entry.class_name
    assert isinstance(loops.choose_trainer("fit"), loops.FitTrainer)


def test_each_loop_loads_on_its_backends_and_is_refused_on_the_others():
    for name, entry in loops.TRAINERS.items():
        if backend.name() in entry.backends:
            assert isinstance(loops.choose_trainer(name), loops.Trainer)
        else:
            with pytest.raises(ValueError, match=f"loop={name!r} needs KERAS_BACKEND="):
                loops.choose_trainer(name)
    with pytest.raises(ValueError, match="one of auto, fit, data, device. Received: loop='x'"):
        loops.choose_trainer("x")


def test_steps_per_execution_defaults(monkeypatch):
    compiled = loops.choose_trainer("auto")
    assert loops.choose_trainer("fit").default_steps_per_execution(312) == 1
    monkeypatch.setattr(backend, "on_gpu", lambda: False)
    assert [compiled.default_steps_per_execution(s) for s in (1, 4, 312)] == [1, 4, 32]
    monkeypatch.setattr(backend, "on_gpu", lambda: True)
    assert [compiled.default_steps_per_execution(s) for s in (1, 4, 312)] == [1, 4, 256]


def test_a_trainer_added_to_the_table_gets_the_whole_plan(monkeypatch, tmp_path):
    import keras

    monkeypatch.setitem(
        loops.TRAINERS, "recording", loops.TrainerEntry(__name__, "PlanRecorder", backend.BACKENDS)
    )
    monkeypatch.setattr(PlanRecorder, "plans", [])
    data = synthetic(n_train=150)  # 120 training images, 30 for validation
    seen = train(
        config(epochs=2, early_stopping_patience=3),
        data,
        loop="recording",
        checkpoint_dir=tmp_path,
        callbacks=[keras.callbacks.Callback()],
    )
    (plan,) = PlanRecorder.plans
    assert (plan.batch_size, plan.epochs, plan.initial_epoch) == (32, 2, 0)
    assert (plan.steps_per_execution, plan.seed, plan.verbose, plan.steps_per_epoch) == (1, 1, 0, 4)
    assert plan.x_train.dtype == np.uint8 and len(plan.x_train) == 120 and len(plan.x_val) == 30
    np.testing.assert_array_equal(plan.x_val, data.x_train[120:])
    assert [type(c).__name__ for c in plan.callbacks] == [
        "LearningRateLogger",
        "EpochReporter",
        "EarlyStoppingRestore",
        "Callback",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.epochs = 5  # type: ignore[misc]
    # The same numbers as the plain fit it extends, for the same seed.
    plain = train(config(epochs=2, early_stopping_patience=3), data, loop="fit")
    assert [r.loss for r in seen.epochs] == pytest.approx([r.loss for r in plain.epochs], rel=1e-6)
    # A resumed run's plan starts after the checkpoint's epochs.
    train(
        config(epochs=3, early_stopping_patience=3), data, loop="recording", checkpoint_dir=tmp_path
    )
    assert PlanRecorder.plans[-1].initial_epoch == 2 and PlanRecorder.plans[-1].epochs == 3


LAZY = textwrap.dedent(
    """
    import sys
    import app.main, app.jobs.runner, app.ml.loops, app.ml.training
    from app.ml import loops
    print(sorted(m for m in ("jax", "keras", "tensorflow") if m in sys.modules))
    loops.choose_trainer("auto")
    print(sorted(m for m in ("jax", "keras", "tensorflow") if m in sys.modules))
    """
)


def test_the_training_core_loads_a_framework_only_when_a_loop_is_chosen():
    """The API imports no framework; on JAX, choosing the loop never loads TensorFlow."""
    env = {**os.environ, "KERAS_BACKEND": backend.name(), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", LAZY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = proc.stdout.splitlines()[-2:]
    assert before == "[]"
    assert "keras" in after
    if backend.is_jax():
        assert "tensorflow" not in after
