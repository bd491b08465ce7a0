"""The curves of exercises 9, 10 and 16: accuracy vs val_accuracy and loss vs val_loss per epoch,
and the helpers every per-epoch figure of the service shares (app/reports/plots.py too).

matplotlib is imported by this module (it is heavy): import it lazily, on first use.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from app.ml.analysis import analyse

matplotlib.use("Agg")  # no display on servers; must precede any pyplot import


def epoch_panels(width: float, height: float) -> tuple[Figure, tuple[Axes, Axes]]:
    """A figure of two panels side by side, for curves over epochs."""
    fig = Figure(figsize=(width, height), dpi=100)
    return fig, (fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2))


def finish_panel(ax: Axes, title: str) -> None:
    """Whole epochs on the x axis, the panel's title, a light grid, and a legend if any."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def png_bytes(fig: Figure, title: str = "") -> bytes:
    """The figure as a PNG, under `title` when one is given."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _series(epochs: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """One metric per epoch; a missing value becomes NaN, which matplotlib leaves as a gap."""
    return [math.nan if row.get(key) is None else float(row[key]) for row in epochs]


def history_png(epochs: Sequence[Mapping[str, Any]], title: str = "") -> bytes:
    """A two-panel PNG of the per-epoch rows; marks the best (lowest val_loss) epoch."""
    xs = [int(row["epoch"]) for row in epochs]
    fig, panels = epoch_panels(10, 4)
    best = analyse(epochs).best_epoch
    for ax, key, label in zip(panels, ("accuracy", "loss"), ("Accuracy", "Loss"), strict=True):
        ax.plot(xs, _series(epochs, key), "o-", label=f"training {key}")
        val = _series(epochs, f"val_{key}")
        if not all(math.isnan(v) for v in val):
            ax.plot(xs, val, "s-", label=f"validation {key}")
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", label=f"lowest val_loss (epoch {best})")
        ax.set_ylabel(label.lower())
        finish_panel(ax, label)
    return png_bytes(fig, title)
