"""Test-set evaluation (exercises 7 and 8): loss, accuracy, the first image, per-class results."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.ml.data import normalise

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class EvaluationResult:
    test_loss: float
    test_accuracy: float
    # {"probabilities": [...], "predicted_class": int, "true_class": int, "match": bool}
    first_image: dict[str, Any]
    per_class_accuracy: list[float]
    confusion_matrix: list[list[int]]
    # Plain cross-entropy of the probabilities: test_loss is the compiled loss, which for a
    # net with L2 penalties (NET III) also holds them, so only this one compares across nets.
    test_ce_loss: float | None = None
    # Which data (app.ml.data.DataProvenance.to_dict()); the worker fills it in.
    data: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return matrix


def cross_entropy(probabilities: np.ndarray, y: np.ndarray) -> float:
    """Mean -log p(true class), probabilities clipped as Keras' cross-entropy clips them."""
    picked = probabilities[np.arange(len(y)), y].astype(np.float64)
    return float(-np.log(np.clip(picked, 1e-7, 1.0 - 1e-7)).mean())


def evaluate(
    model: keras.Model, x_test: np.ndarray, y_test: np.ndarray, batch_size: int = 256
) -> EvaluationResult:
    """Evaluate a compiled model on raw uint8 test images (normalised here, as in training)."""
    x = normalise(x_test)
    y = np.asarray(y_test).reshape(-1).astype(np.int64)
    loss, accuracy = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=False)[:2]
    probabilities = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)
    predicted = probabilities.argmax(axis=1)
    num_classes = probabilities.shape[1]
    matrix = confusion_matrix(y, predicted, num_classes)
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    first = {
        "probabilities": [float(p) for p in probabilities[0]],
        "predicted_class": int(predicted[0]),
        "true_class": int(y[0]),
        "match": bool(predicted[0] == y[0]),
    }
    return EvaluationResult(
        test_loss=float(loss),
        test_accuracy=float(accuracy),
        first_image=first,
        per_class_accuracy=[float(v) for v in per_class],
        confusion_matrix=matrix.tolist(),
        test_ce_loss=cross_entropy(probabilities, y),
    )
