"""Reading the training curves (exercises 10, 16 and 18): where the validation loss bottoms
out, how wide the train-validation gap is, and a verdict on how the run fits.

Definitions (GET /jobs/{id}/history returns them as `analysis`):
- best_epoch: the epoch with the lowest validation loss (1-based; the first one on ties).
- final_gap / max_gap: training accuracy minus validation accuracy at the last epoch / at its
  widest.
- verdict: the first of these rules that holds (`verdict_of`):
  1. under-fitting: training accuracy at or below validation accuracy in more than half of
     the epochs. A net that never fits its training images better than unseen ones is held
     back (dropout, augmentation, weight decay or too little capacity), whatever its
     validation loss does afterwards.
  2. overfitting: after best_epoch the validation loss ends more than LOSS_TOLERANCE (a
     fraction of its lowest value) above that lowest value, while the training loss fell
     below its best-epoch value. A smaller rise is noise, not overfitting.
  3. still improving: the lowest validation loss is at the last epoch.
  4. plateau: otherwise. The validation loss stopped falling, and what it did since is
     within the tolerance, or came without a falling training loss.
- overfitting_after_epoch: best_epoch when the verdict is overfitting, else None.

The loss read here is the job's own `val_loss` (its training objective, label smoothing and
L2 included): the verdict is about one run's trend. Losses of different jobs are compared
only as plain cross-entropy (`val_ce_loss`), never here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

# A rise of the validation loss above its lowest value counts only beyond this fraction of
# that value: one epoch's wobble of a few hundredths is noise at CIFAR-10's scale.
LOSS_TOLERANCE = 0.05

UNDERFITTING = "underfitting"
OVERFITTING = "overfitting"
STILL_IMPROVING = "still_improving"
PLATEAU = "plateau"
VERDICTS = (UNDERFITTING, OVERFITTING, STILL_IMPROVING, PLATEAU)


@dataclass(frozen=True)
class Verdict:
    """One run's verdict and the numbers it rests on (see the module docstring for the rules)."""

    kind: str  # one of VERDICTS
    reason: str  # the rule that decided, with its numbers
    epochs: int
    train_at_or_below_val: int  # epochs with accuracy <= val_accuracy
    best_epoch: int
    lowest_val_loss: float
    last_val_loss: float
    val_loss_rise: float  # last_val_loss - lowest_val_loss
    tolerance: float  # LOSS_TOLERANCE * lowest_val_loss
    train_loss_at_best: float | None
    last_train_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HistoryAnalysis:
    best_epoch: int | None
    overfitting_after_epoch: int | None
    final_gap: float | None
    max_gap: float | None
    max_gap_epoch: int | None
    verdict: Verdict | None = None

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
    verdict = verdict_of(epochs)
    assert verdict is not None  # every epoch has a validation loss
    overfitting_after = verdict.best_epoch if verdict.kind == OVERFITTING else None

    gaps: list[float] = []
    for row in epochs:
        acc, val_acc = _value(row, "accuracy"), _value(row, "val_accuracy")
        gaps.append(acc - val_acc if acc is not None and val_acc is not None else math.nan)
    known = [(g, i) for i, g in enumerate(gaps) if not math.isnan(g)]
    if not known:
        return HistoryAnalysis(verdict.best_epoch, overfitting_after, None, None, None, verdict)
    max_gap, max_index = max(known)
    final_gap = gaps[-1] if not math.isnan(gaps[-1]) else None
    return HistoryAnalysis(
        verdict.best_epoch, overfitting_after, final_gap, max_gap, max_index + 1, verdict
    )


def verdict_of(
    epochs: Sequence[Mapping[str, Any]], tolerance: float = LOSS_TOLERANCE
) -> Verdict | None:
    """The verdict on per-epoch rows (in epoch order); None without a validation loss in
    every epoch."""
    val = [_value(row, "val_loss") for row in epochs]
    if not epochs or any(v is None for v in val):
        return None
    val_losses: list[float] = [v for v in val if v is not None]
    train = [_value(row, "loss") for row in epochs]
    n = len(val_losses)
    best_index = min(range(n), key=lambda i: val_losses[i])
    lowest, last = val_losses[best_index], val_losses[-1]
    pairs = [
        (a, v)
        for a, v in ((_value(r, "accuracy"), _value(r, "val_accuracy")) for r in epochs)
        if a is not None and v is not None
    ]
    below = sum(1 for a, v in pairs if a <= v)
    facts = Verdict(
        kind="",
        reason="",
        epochs=n,
        train_at_or_below_val=below,
        best_epoch=best_index + 1,
        lowest_val_loss=lowest,
        last_val_loss=last,
        val_loss_rise=last - lowest,
        tolerance=tolerance * lowest,
        train_loss_at_best=train[best_index],
        last_train_loss=train[-1],
    )
    rise = _rise_text(facts, tolerance)
    if pairs and below > len(pairs) / 2:
        reason = (
            f"training accuracy was at or below validation accuracy in {below} of "
            f"{len(pairs)} epochs (more than half): the net does not fit its training images "
            "better than unseen ones"
        )
        return replace(facts, kind=UNDERFITTING, reason=reason + (f"; {rise}" if rise else ""))
    at_best = facts.train_loss_at_best
    later = [v for v in train[best_index + 1 :] if v is not None]
    lowest_later = min(later) if later else None
    beyond = facts.val_loss_rise > facts.tolerance
    if beyond and at_best is not None and lowest_later is not None and lowest_later < at_best:
        reason = f"{rise}, while the training loss fell from {at_best:.3f} to {lowest_later:.3f}"
        return replace(facts, kind=OVERFITTING, reason=reason)
    if best_index == n - 1:
        reason = f"the validation loss was lowest at the last epoch ({n} of {n}: {last:.3f})"
        return replace(facts, kind=STILL_IMPROVING, reason=reason)
    if beyond:
        reason = f"{rise}, but the training loss did not fall below its epoch-{best_index + 1} " + (
            f"value ({at_best:.3f}; lowest after it {lowest_later:.3f})"
            if at_best is not None and lowest_later is not None
            else "value (not recorded)"
        )
        return replace(facts, kind=PLATEAU, reason=reason)
    return replace(facts, kind=PLATEAU, reason=rise)


def _rise_text(facts: Verdict, tolerance: float) -> str:
    """What the validation loss did after its lowest epoch, against the tolerance; '' when the
    lowest is the last epoch."""
    if facts.best_epoch == facts.epochs:
        return ""
    where = "within" if facts.val_loss_rise <= facts.tolerance else "beyond"
    return (
        f"the validation loss was lowest at epoch {facts.best_epoch} of {facts.epochs} "
        f"({facts.lowest_val_loss:.3f}) and ended {facts.val_loss_rise:.3f} above it, "
        f"{where} the tolerance of {facts.tolerance:.3f} ({100 * tolerance:g}% of the lowest)"
    )
