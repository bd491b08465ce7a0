"""The overlaid validation curves of several jobs (GET /compare.png, the report).

The loss panel draws the plain cross-entropy (`val_ce_loss`), the one validation loss that
compares across jobs; a job recorded before it has no line there, and the panel names it.
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
    """Two panels, validation accuracy and plain cross-entropy validation loss per epoch, one
    line per job; a star marks the epoch whose weights each job kept."""
    fig, (left, right) = epoch_panels(11, 4.2)
    panels = (
        (left, "val_accuracy", "Validation accuracy"),
        (right, "val_ce_loss", "Validation loss, plain cross-entropy"),
    )
    for ax, key, name in panels:
        missing = []
        for row in rows:
            history = row["history"]
            ys = [math.nan if v is None else float(v) for v in history.get(key, [])]
            if not ys or all(math.isnan(v) for v in ys):
                missing.append(label(row))
                continue
            (line,) = ax.plot(history["epoch"], ys, "o-", markersize=3, label=label(row))
            kept = row.get("kept_epoch")
            if kept is not None and kept in history["epoch"]:
                at = history["epoch"].index(kept)
                ax.plot([kept], [ys[at]], "*", markersize=12, color=line.get_color())
        note = f"; n/a: {', '.join(missing)}" if missing else ""
        finish_panel(ax, f"{name} (star: kept epoch{note})")
    return png_bytes(fig, title)
