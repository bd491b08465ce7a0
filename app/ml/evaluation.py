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
    # Test-time augmentation (issue 21): the views and their weights, and the accuracy of
    # the weighted mean of their probabilities; None without TTA. test_accuracy stays plain.
    tta_views: list[dict[str, Any]] | None = None
    tta_accuracy: float | None = None

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


# Each mode's views and weights: airbench94's tta_level 1 (mirror) and 2 (mirror and
# translate): 1/2 * mean(identity, flip) + 1/2 * mean over the two one-pixel shifts (reflect
# padding) of mean(shifted, its flip).
TTA_VIEWS: dict[str, tuple[tuple[str, float], ...]] = {
    "none": (("identity", 1.0),),
    "flip": (("identity", 0.5), ("flip", 0.5)),
    "flip_translate": (
        ("identity", 0.25),
        ("flip", 0.25),
        ("shift_down_right", 0.125),
        ("shift_down_right_flip", 0.125),
        ("shift_up_left", 0.125),
        ("shift_up_left_flip", 0.125),
    ),
}


def view(x: np.ndarray, name: str) -> np.ndarray:
    """One TTA view of images (N, H, W, C): identity, flip (left-right), shift_down_right /
    shift_up_left (content moved one pixel both ways, the edge reflected), `_flip` after."""
    if name.endswith("_flip") or name == "flip":
        base = "identity" if name == "flip" else name.removesuffix("_flip")
        return np.ascontiguousarray(view(x, base)[:, :, ::-1, :])
    if name == "identity":
        return x
    height, width = x.shape[1], x.shape[2]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    if name == "shift_down_right":
        return np.ascontiguousarray(padded[:, :height, :width, :])
    if name == "shift_up_left":
        return np.ascontiguousarray(padded[:, 2 : height + 2, 2 : width + 2, :])
    raise ValueError(f"unknown TTA view {name!r}")


def tta_probabilities(
    model: keras.Model, x: np.ndarray, tta: str, batch_size: int = 256
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The weighted mean of the model's probabilities over `tta`'s views of normalised `x`,
    and the views as recorded ({"name", "weight"} each)."""
    views = TTA_VIEWS[tta]
    total: np.ndarray | None = None
    for name, weight in views:
        p = np.asarray(model.predict(view(x, name), batch_size=batch_size, verbose=0))
        total = weight * p.astype(np.float64) + (0.0 if total is None else total)
    assert total is not None
    return total.astype(np.float32), [{"name": n, "weight": w} for n, w in views]


def evaluate(
    model: keras.Model,
    x_test: np.ndarray,
    y_test: np.ndarray,
    batch_size: int = 256,
    tta: str = "none",
) -> EvaluationResult:
    """Evaluate a compiled model on raw uint8 test images (normalised here, as in training);
    with `tta` also the accuracy of the mean over its views (TTA_VIEWS)."""
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
        **_tta(model, x, y, tta, batch_size),
    )


def _tta(
    model: keras.Model, x: np.ndarray, y: np.ndarray, tta: str, batch_size: int
) -> dict[str, Any]:
    if tta == "none":
        return {}
    probabilities, views = tta_probabilities(model, x, tta, batch_size)
    return {
        "tta_views": views,
        "tta_accuracy": float((probabilities.argmax(axis=1) == y).mean()),
    }
