"""The verdict of app/ml/analysis.py on hand-made histories: under-fitting, overfitting,
still improving and plateau, each with the numbers it rests on."""

from __future__ import annotations

import pytest

from app.ml.analysis import (
    LOSS_TOLERANCE,
    OVERFITTING,
    PLATEAU,
    STILL_IMPROVING,
    UNDERFITTING,
    analyse,
    verdict_of,
)


def rows(loss, acc, val_loss, val_acc):
    return [
        {"epoch": i + 1, "loss": a, "accuracy": b, "val_loss": c, "val_accuracy": d}
        for i, (a, b, c, d) in enumerate(zip(loss, acc, val_loss, val_acc, strict=True))
    ]


# NET III's real shape (docs/results-cpu.md, job 777d91e4): under heavy dropout, training
# accuracy stays at or below validation accuracy in most epochs; the validation loss is
# lowest at epoch 18 (0.854) and rises by 0.039 at the last epoch while the training loss
# still falls. The report used to call this "overfits too".
# fmt: off
NET3_ACC = [
    0.282,
    0.418,
    0.487,
    0.533,
    0.571,
    0.598,
    0.622,
    0.641,
    0.657,
    0.671,
    0.683,
    0.694,
    0.705,
    0.714,
    0.722,
    0.731,
    0.739,
    0.745,
    0.751,
    0.757,
]
NET3_VAL_ACC = [
    0.418,
    0.497,
    0.543,
    0.581,
    0.611,
    0.631,
    0.651,
    0.662,
    0.679,
    0.690,
    0.701,
    0.707,
    0.716,
    0.727,
    0.733,
    0.741,
    0.748,
    0.774,
    0.752,
    0.756,
]
NET3_LOSS = [
    2.30,
    1.82,
    1.62,
    1.50,
    1.41,
    1.34,
    1.28,
    1.23,
    1.19,
    1.15,
    1.12,
    1.09,
    1.06,
    1.03,
    1.01,
    0.98,
    0.96,
    0.924,
    0.913,
    0.903,
]
NET3_VAL_LOSS = [1.85, 1.55, 1.42, 1.31, 1.22, 1.15, 1.10, 1.06, 1.01, 0.98,
                 0.95, 0.93, 0.91, 0.90, 0.89, 0.875, 0.866, 0.854, 0.871, 0.893]
# fmt: on


def net3():
    return rows(NET3_LOSS, NET3_ACC, NET3_VAL_LOSS, NET3_VAL_ACC)


def test_net3_under_heavy_regularisation_under_fits_and_its_late_rise_is_noise():
    verdict = verdict_of(net3())
    assert verdict is not None
    assert verdict.kind == UNDERFITTING
    assert verdict.epochs == 20 and verdict.train_at_or_below_val == 19
    assert verdict.best_epoch == 18 and verdict.lowest_val_loss == pytest.approx(0.854)
    assert verdict.val_loss_rise == pytest.approx(0.039)
    assert verdict.tolerance == pytest.approx(LOSS_TOLERANCE * 0.854)
    # The reason shows the numbers it rests on, and calls the rise what it is.
    assert "in 19 of 20 epochs (more than half)" in verdict.reason
    assert "lowest at epoch 18 of 20 (0.854) and ended 0.039 above it" in verdict.reason
    assert "within the tolerance of 0.043 (5% of the lowest)" in verdict.reason
    analysis = analyse(net3())
    assert analysis.overfitting_after_epoch is None  # the old rule said 18
    assert analysis.verdict == verdict


def test_the_same_rise_without_under_fitting_is_still_noise_not_overfitting():
    # Training ahead of validation in every epoch, the same 0.039 rise after epoch 18.
    acc = [v + 0.05 for v in NET3_VAL_ACC]
    verdict = verdict_of(rows(NET3_LOSS, acc, NET3_VAL_LOSS, NET3_VAL_ACC))
    assert verdict is not None and verdict.kind == PLATEAU
    assert "within the tolerance" in verdict.reason


def test_a_rise_beyond_the_tolerance_with_falling_training_loss_is_overfitting():
    history = rows(
        loss=[1.5, 1.1, 0.9, 0.7, 0.5],
        acc=[0.45, 0.60, 0.68, 0.76, 0.83],
        val_loss=[1.3, 1.05, 1.0, 1.1, 1.25],
        val_acc=[0.52, 0.62, 0.64, 0.63, 0.62],
    )
    verdict = verdict_of(history)
    assert verdict is not None and verdict.kind == OVERFITTING
    assert verdict.best_epoch == 3 and verdict.val_loss_rise == pytest.approx(0.25)
    assert verdict.train_loss_at_best == 0.9 and verdict.last_train_loss == 0.5
    assert "beyond the tolerance of 0.050" in verdict.reason
    assert "training loss fell from 0.900 to 0.500" in verdict.reason
    assert analyse(history).overfitting_after_epoch == 3


def test_a_rise_without_a_falling_training_loss_is_a_plateau():
    history = rows([1.0, 1.2, 1.3], [0.6, 0.62, 0.63], [0.9, 1.0, 1.1], [0.5, 0.45, 0.4])
    verdict = verdict_of(history)
    assert verdict is not None and verdict.kind == PLATEAU
    assert "did not fall below its epoch-1 value" in verdict.reason
    assert analyse(history).overfitting_after_epoch is None


def test_lowest_validation_loss_at_the_last_epoch_is_still_improving():
    history = rows([1.0, 0.8, 0.6], [0.6, 0.7, 0.8], [1.1, 0.9, 0.8], [0.5, 0.55, 0.6])
    verdict = verdict_of(history)
    assert verdict is not None and verdict.kind == STILL_IMPROVING
    assert verdict.reason == "the validation loss was lowest at the last epoch (3 of 3: 0.800)"


def test_training_at_or_below_validation_in_exactly_half_the_epochs_is_not_under_fitting():
    history = rows([1.0, 0.8, 0.6, 0.5], [0.5, 0.6, 0.8, 0.9], [1.1, 0.9, 0.8, 0.7],
                   [0.5, 0.6, 0.7, 0.8])  # fmt: skip
    verdict = verdict_of(history)
    assert verdict is not None
    assert verdict.train_at_or_below_val == 2 and verdict.kind == STILL_IMPROVING


def test_no_verdict_without_validation_loss():
    assert verdict_of(rows([1.0], [0.5], [None], [None])) is None
    assert verdict_of([]) is None
