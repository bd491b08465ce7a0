"""GET /sweeps/{id}.png: the optimisation history and each parameter against the objective
(a search), or each plan job's objective (an ablation).

matplotlib is imported by this module (it is heavy): import it lazily, on first use.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from app.ml.plots import png_bytes
from app.sweeps.schemas import SweepPublic, TrialPublic

MARKERS = {"complete": ("o", "#2759c7"), "pruned": ("x", "#d1495b")}


def _plotted(trials: list[TrialPublic]) -> list[TrialPublic]:
    return [t for t in trials if t.state in MARKERS and t.value is not None]


def _value(trial: TrialPublic) -> float:
    return math.nan if trial.value is None else trial.value


def _history(ax: Axes, sweep: SweepPublic) -> None:
    """Each trial's value by trial number, and the best complete value so far."""
    trials = _plotted(sweep.trials)
    for state, (marker, color) in MARKERS.items():
        shown = [t for t in trials if t.state == state]
        if shown:
            ax.scatter(
                [t.number for t in shown],
                [_value(t) for t in shown],
                marker=marker,
                color=color,
                label=f"{state} ({len(shown)})",
            )
    maximize = sweep.objective.direction == "maximize"
    best, xs, ys = math.nan, [], []
    for trial in sorted(sweep.trials, key=lambda t: t.number):
        if trial.state == "complete" and trial.value is not None:
            if math.isnan(best) or (trial.value > best if maximize else trial.value < best):
                best = trial.value
        if not math.isnan(best):
            xs.append(trial.number)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="grey", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(sweep.objective.metric)
    ax.set_title("Optimisation history")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _parameter(ax: Axes, sweep: SweepPublic, name: str, spec: dict[str, Any]) -> None:
    """The objective against one parameter's value (categories at evenly spaced positions)."""
    trials = _plotted(sweep.trials)
    choices = spec.get("choices")
    for state, (marker, color) in MARKERS.items():
        shown = [t for t in trials if t.state == state and name in t.params]
        if not shown:
            continue
        if choices is not None:
            xs = [choices.index(t.params[name]) if t.params[name] in choices else -1 for t in shown]
        else:
            xs = [t.params[name] for t in shown]
        ax.scatter(xs, [_value(t) for t in shown], marker=marker, color=color, label=state)
    if choices is not None:
        ax.set_xticks(range(len(choices)), [str(c) for c in choices])
    elif spec.get("log"):
        ax.set_xscale("log")
    ax.set_xlabel(name)
    ax.set_ylabel(sweep.objective.metric)
    ax.set_title(f"{name} against {sweep.objective.metric}")
    ax.grid(True, alpha=0.3)


def _ablation(ax: Axes, sweep: SweepPublic) -> None:
    trials = [t for t in sweep.trials if t.value is not None]
    roles = [t.role or str(t.number) for t in trials]
    ax.barh(range(len(trials)), [_value(t) for t in trials], color="#2759c7")
    ax.set_yticks(range(len(trials)), roles)
    ax.invert_yaxis()
    ax.set_xlabel(sweep.objective.metric)
    ax.set_title("Each job of the plan")
    ax.grid(True, axis="x", alpha=0.3)


def sweep_png(sweep: SweepPublic) -> bytes:
    """The figure of a sweep with at least one trial that has a value."""
    title = f"sweep {sweep.id} ({sweep.status})"
    if sweep.kind == "ablation":
        fig = Figure(figsize=(8, 1.5 + 0.35 * len(sweep.trials)), dpi=100)
        _ablation(fig.add_subplot(1, 1, 1), sweep)
        return png_bytes(fig, title)
    space: dict[str, dict[str, Any]] = sweep.spec.get("space", {})
    panels = 1 + len(space)
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(4.5 * columns, 3.6 * rows), dpi=100)
    _history(fig.add_subplot(rows, columns, 1), sweep)
    for index, (name, spec) in enumerate(space.items(), start=2):
        _parameter(fig.add_subplot(rows, columns, index), sweep, name, spec)
    return png_bytes(fig, title)
