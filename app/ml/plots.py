"""The curves of exercises 9, 10 and 16: accuracy vs val_accuracy and loss vs val_loss per epoch."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from app.ml.analysis import analyse


def _series(epochs: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """One metric per epoch; a missing value becomes NaN, which matplotlib leaves as a gap."""
    return [math.nan if row.get(key) is None else float(row[key]) for row in epochs]


def history_png(epochs: Sequence[Mapping[str, Any]], title: str = "") -> bytes:
    """A two-panel PNG of the per-epoch rows; marks the best (lowest val_loss) epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot import
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    xs = [int(row["epoch"]) for row in epochs]
    fig = Figure(figsize=(10, 4), dpi=100)
    best = analyse(epochs).best_epoch
    for ax, key, label in (
        (fig.add_subplot(1, 2, 1), "accuracy", "Accuracy"),
        (fig.add_subplot(1, 2, 2), "loss", "Loss"),
    ):
        ax.plot(xs, _series(epochs, key), "o-", label=f"training {key}")
        val = _series(epochs, f"val_{key}")
        if not all(math.isnan(v) for v in val):
            ax.plot(xs, val, "s-", label=f"validation {key}")
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", label=f"lowest val_loss (epoch {best})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label.lower())
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
