"""The overlaid validation curves of several jobs (GET /compare.png, the report).

matplotlib is imported by this module (through app.ml.plots): import it lazily.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from app.ml.nets import NETS
from app.ml.plots import epoch_panels, finish_panel, png_bytes


def label(row: dict[str, Any]) -> str:
    spec = NETS.get(row["net"])
    title = spec.title if spec else row["net"]
    return f"{title} ({row['id'][:8]})"


def compare_png(rows: Sequence[dict[str, Any]], title: str = "") -> bytes:
    """Two panels, validation accuracy and validation loss per epoch, one line per job."""
    fig, (left, right) = epoch_panels(11, 4.2)
    panels = (
        (left, "val_accuracy", "Validation accuracy"),
        (right, "val_loss", "Validation loss"),
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
        finish_panel(ax, name + (" (star: lowest)" if key == "val_loss" else ""))
    return png_bytes(fig, title)
