"""Reading the training curves (exercises 10 and 16): where overfitting starts, how wide the gap is.

Definitions (GET /jobs/{id}/history returns them as `analysis`):
- best_epoch: the epoch with the lowest validation loss (1-based; the first one on ties).
- overfitting_after_epoch: best_epoch, when training loss still fell after it while the
  validation loss never came back down to its minimum; None when the best epoch is the last
  one (no overfitting seen yet) or there is no validation data.
- final_gap / max_gap: training accuracy minus validation accuracy at the last epoch / at its widest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class HistoryAnalysis:
    best_epoch: int | None
    overfitting_after_epoch: int | None
    final_gap: float | None
    max_gap: float | None
    max_gap_epoch: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def analyse(epochs: Sequence[Mapping[str, Any]]) -> HistoryAnalysis:
    """Analyse per-epoch rows (in epoch order) holding loss, accuracy, val_loss, val_accuracy."""
    val_losses = [_value(row, "val_loss") for row in epochs]
    if not epochs or any(v is None for v in val_losses):
        return HistoryAnalysis(None, None, None, None, None)
    best_index = min(range(len(val_losses)), key=lambda i: val_losses[i])  # type: ignore[arg-type,return-value]
    best_epoch = best_index + 1

    overfitting_after = None
    if best_index < len(epochs) - 1:
        train_losses = [_value(row, "loss") for row in epochs]
        best_train = train_losses[best_index]
        later_train = [v for v in train_losses[best_index + 1 :] if v is not None]
        if best_train is not None and later_train and min(later_train) < best_train:
            overfitting_after = best_epoch

    gaps: list[float] = []
    for row in epochs:
        acc, val_acc = _value(row, "accuracy"), _value(row, "val_accuracy")
        gaps.append(acc - val_acc if acc is not None and val_acc is not None else math.nan)
    known = [(g, i) for i, g in enumerate(gaps) if not math.isnan(g)]
    if not known:
        return HistoryAnalysis(best_epoch, overfitting_after, None, None, None)
    max_gap, max_index = max(known)
    final_gap = gaps[-1] if not math.isnan(gaps[-1]) else None
    return HistoryAnalysis(best_epoch, overfitting_after, final_gap, max_gap, max_index + 1)
