"""History analysis on hand-made curves, and the curves PNG."""

import math

from app.ml.analysis import analyse
from app.ml.plots import history_png


def rows(loss, acc, val_loss, val_acc):
    return [
        {"epoch": i + 1, "loss": a, "accuracy": b, "val_loss": c, "val_accuracy": d}
        for i, (a, b, c, d) in enumerate(zip(loss, acc, val_loss, val_acc, strict=True))
    ]


def test_overfitting_after_lowest_val_loss():
    history = rows(
        loss=[1.5, 1.1, 0.9, 0.7, 0.5],
        acc=[0.45, 0.60, 0.68, 0.76, 0.83],
        val_loss=[1.3, 1.05, 1.0, 1.1, 1.25],
        val_acc=[0.52, 0.62, 0.64, 0.63, 0.62],
    )
    result = analyse(history)
    assert result.best_epoch == 3
    assert result.overfitting_after_epoch == 3
    assert math.isclose(result.final_gap, 0.21)
    assert math.isclose(result.max_gap, 0.21) and result.max_gap_epoch == 5


def test_no_overfitting_when_val_loss_still_falls():
    history = rows([1.0, 0.8, 0.6], [0.5, 0.6, 0.7], [1.1, 0.9, 0.8], [0.5, 0.55, 0.6])
    result = analyse(history)
    assert result.best_epoch == 3
    assert result.overfitting_after_epoch is None


def test_no_overfitting_when_training_loss_also_stalls():
    history = rows([1.0, 1.2, 1.3], [0.5, 0.4, 0.4], [0.9, 1.0, 1.1], [0.5, 0.45, 0.4])
    assert analyse(history).overfitting_after_epoch is None


def test_ties_pick_the_first_epoch():
    history = rows([1.0, 0.9, 0.8], [0.5, 0.6, 0.7], [0.7, 0.7, 0.9], [0.6, 0.6, 0.55])
    assert analyse(history).best_epoch == 1


def test_without_validation_everything_is_none():
    history = rows([1.0, 0.9], [0.5, 0.6], [None, None], [None, None])
    result = analyse(history)
    assert result.to_dict() == {
        "best_epoch": None,
        "overfitting_after_epoch": None,
        "final_gap": None,
        "max_gap": None,
        "max_gap_epoch": None,
        "verdict": None,
    }
    assert analyse([]).best_epoch is None


def test_history_png_is_a_png():
    history = rows([1.0, 0.8, 0.7], [0.5, 0.6, 0.7], [0.9, 0.85, 0.9], [0.55, 0.6, 0.58])
    png = history_png(history, title="net1")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000
