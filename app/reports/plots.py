"""The overlaid validation curves of several jobs (GET /compare.png, the report)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any


def label(row: dict[str, Any]) -> str:
    from app.ml.nets import NETS

    spec = NETS.get(row["net"])
    title = spec.title if spec else row["net"]
    return f"{title} ({row['id'][:8]})"


def compare_png(rows: Sequence[dict[str, Any]], title: str = "") -> bytes:
    """Two panels, validation accuracy and validation loss per epoch, one line per job."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), dpi=100)
    panels = (
        (fig.add_subplot(1, 2, 1), "val_accuracy", "Validation accuracy"),
        (fig.add_subplot(1, 2, 2), "val_loss", "Validation loss"),
    )
    for ax, key, name in panels:
        for row in rows:
            history = row["history"]
            ys = [math.nan if v is None else float(v) for v in history[key]]
            if not ys or all(math.isnan(v) for v in ys):
                continue
            (line,) = ax.plot(history["epoch"], ys, "o-", markersize=3, label=label(row))
            best = row.get("best_epoch")
            if best is not None and key == "val_loss":
                ax.plot([best], [ys[best - 1]], "*", markersize=12, color=line.get_color())
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name + (" (star: lowest)" if key == "val_loss" else ""))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
