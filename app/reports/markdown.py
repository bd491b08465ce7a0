"""The course's report as Markdown, generated from comparison rows (app.reports.compare).

Every sentence is built from the measured numbers: which epoch, how big a gap, which net
overfits first and by how much. Nothing here is hand-written about a particular run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.ml.params import default

Row = Mapping[str, Any]
SEPARATION = 0.05  # curves count as separated once training leads validation by 5 points


# ----------------------------------------------------------------------------- formatting
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _points(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} points"


def _num(value: Any, fmt: str = "{:,}") -> str:
    return "–" if value is None else fmt.format(value)


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def title(row: Row) -> str:
    from app.ml.nets import NETS

    spec = NETS.get(row["net"])
    return spec.title if spec else row["net"]


def name(row: Row) -> str:
    return f"{title(row)} (job `{row['id'][:8]}`)"


def _gaps(row: Row) -> list[float | None]:
    h = row["history"]
    return [
        None if a is None or v is None else a - v
        for a, v in zip(h["accuracy"], h["val_accuracy"], strict=True)
    ]


def separation_epoch(row: Row, threshold: float = SEPARATION) -> int | None:
    """First epoch from which training accuracy leads validation accuracy by >= threshold."""
    gaps = _gaps(row)
    for i in range(len(gaps)):
        if all(g is not None and g >= threshold for g in gaps[i:]):
            return i + 1
    return None


def levers(row: Row) -> dict[str, Any]:
    """The training fields that differ from the course's defaults (epochs and batch aside)."""
    ignore = {"epochs", "seed", "train_limit"}
    return {
        key: value
        for key, value in row.get("training", {}).items()
        if key not in ignore and value != default(key)
    }


def first_of(rows: Sequence[Row], net: str) -> Row | None:
    return next((r for r in rows if r["net"] == net and r["history"]["epoch"]), None)


# ----------------------------------------------------------------------------- table
def table(rows: Sequence[Row]) -> str:
    head = (
        "| job | net | parameters | MACs/image | epochs | precision | device | training "
        "| test loss | test accuracy | best epoch | overfitting after | final gap | max gap |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| `{r['id'][:8]}` | {title(r)} | {_num(r['parameters'])} | "
            f"{_num(r['macs'] / 1e6 if r['macs'] else None, '{:.1f} M')} | {r['epochs']} | "
            f"{r['precision'] or '–'} | {r['device'] or '–'} | {_minutes(r['training_seconds'])} | "
            f"{_num(r['test_loss'], '{:.3f}')} | {_pct(r['test_accuracy'])} | "
            f"{_num(r['best_epoch'], '{}')} | {_num(r['overfitting_after_epoch'], '{}')} | "
            f"{_num(r['final_gap'], '{:.3f}')} | {_num(r['max_gap'], '{:.3f}')} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- paragraphs
def accuracy_paragraph(r: Row) -> str:
    """Exercise 9: how training and validation accuracy move, and how far apart they end."""
    h = r["history"]
    acc, val = h["accuracy"], h["val_accuracy"]
    if not acc or val[-1] is None:
        return f"{name(r)}: no validation data, so no comparison of the two curves."
    best_val = max(v for v in val if v is not None)
    best_val_epoch = val.index(best_val) + 1
    text = (
        f"{name(r)}: training accuracy went from {_pct(acc[0])} to {_pct(acc[-1])} in "
        f"{len(acc)} epochs, validation accuracy from {_pct(val[0])} to {_pct(val[-1])} "
        f"(highest {_pct(best_val)} at epoch {best_val_epoch}). "
    )
    final_gap = r["final_gap"]
    sep = separation_epoch(r)
    if final_gap is not None and final_gap < 0:
        text += (
            f"Validation accuracy ends {_points(-final_gap)} above training accuracy: the "
            "training images are made harder (dropout or augmentation is active only in "
            "training), so the curves do not separate the usual way."
        )
    elif sep is not None:
        text += (
            f"The curves separate from epoch {sep} on (training ahead by at least "
            f"{_points(SEPARATION)}) and end {_points(final_gap)} apart; the widest gap is "
            f"{_points(r['max_gap'])} at epoch {r['max_gap_epoch']}."
        )
    else:
        text += (
            f"The curves stay within {_points(SEPARATION)} of each other to the end "
            f"(final gap {_points(final_gap)}, widest {_points(r['max_gap'])})."
        )
    return text


def overfitting_paragraph(r: Row) -> str:
    """Exercise 10: the loss curves and the epoch after which overfitting starts."""
    h = r["history"]
    loss, val = h["loss"], h["val_loss"]
    best = r["best_epoch"]
    if best is None:
        return f"{name(r)}: no validation loss was recorded, so overfitting cannot be read."
    n = len(loss)
    text = f"{name(r)}: validation loss was lowest at epoch {best} of {n} ({val[best - 1]:.3f}). "
    if r["overfitting_after_epoch"] is not None:
        text += (
            f"After it, training loss kept falling ({loss[best - 1]:.3f} -> {loss[-1]:.3f}) "
            f"while validation loss rose to {val[-1]:.3f} (+{val[-1] - val[best - 1]:.3f}): "
            f"overfitting starts after epoch {best}."
        )
    elif best == n:
        text += f"It was still falling at the last epoch: no overfitting within {n} epochs."
    else:
        text += (
            f"Training loss did not fall below its epoch-{best} value afterwards "
            f"({loss[best - 1]:.3f} -> {loss[-1]:.3f}), so this is noise rather than overfitting."
        )
    if r.get("restored_epoch"):
        text += f" Early stopping kept the weights of epoch {r['restored_epoch']}."
    return text


def _compare_words(a: float | None, b: float | None, more: str, less: str) -> str:
    if a is None or b is None:
        return "cannot be compared"
    return more if a > b else less if a < b else "the same as"


def net2_vs_net1_paragraph(rows: Sequence[Row]) -> str:
    """Exercise 16: NET II against NET I, and the course's note on small kernels."""
    n1, n2 = first_of(rows, "net1"), first_of(rows, "net2")
    if n1 is None or n2 is None:
        return "This report has no finished NET I and NET II job to compare."
    b1, b2 = n1["best_epoch"], n2["best_epoch"]
    if b1 is None or b2 is None:
        onset = "Without validation data the onset of overfitting cannot be compared."
    elif b2 == b1:
        onset = f"Both reach their lowest validation loss at epoch {b1}."
    else:
        first, later = (n2, n1) if b2 < b1 else (n1, n2)
        onset = (
            f"{title(first)} overfits first: its validation loss bottoms out at epoch "
            f"{first['best_epoch']}, {abs(b2 - b1)} epoch{'s' if abs(b2 - b1) > 1 else ''} "
            f"before {title(later)}'s "
            f"(epoch {later['best_epoch']})."
        )
    t1, t2 = n1["test_accuracy"], n2["test_accuracy"]
    g1, g2 = n1["final_gap"], n2["final_gap"]
    text = (
        f"{onset} The final train-validation accuracy gap is {_points(g2)} for NET II against "
        f"{_points(g1)} for NET I (widest {_points(n2['max_gap'])} against "
        f"{_points(n1['max_gap'])}), so NET II's curves deviate "
        f"{_compare_words(g2, g1, 'more', 'less')} than NET I's. NET II has "
        f"{n2['parameters']:,} parameters against {n1['parameters']:,} "
        f"({n2['parameters'] / n1['parameters']:.1f}x) and needs {n2['macs'] / 1e6:.1f} M "
        f"multiply-accumulates per image against {n1['macs'] / 1e6:.1f} M. "
    )
    if t1 is not None and t2 is not None:
        diff = t1 - t2
        agrees = diff > 0
        text += (
            f"On the test set the 3x3 NET I scores {_pct(t1)} and the 5x5 NET II {_pct(t2)} "
            f"({'+' if diff >= 0 else ''}{100 * diff:.1f} points for the small kernels). "
            "The course's note says that smaller kernels keep more of the variation in the "
            "input because fewer pixels are averaged at once; "
            + (
                "these runs agree with it: the larger kernels cost accuracy although they "
                "add parameters."
                if agrees
                else "these runs do not show it: the 5x5 net is not worse on the test set, "
                "so here the note's advantage is smaller than the other differences between "
                "the nets (NET II also pools once less)."
            )
        )
    return text


def net3_paragraph(rows: Sequence[Row]) -> str:
    """Exercise 18: does NET III overfit, and how large is its gap next to NET I and II."""
    n3 = first_of(rows, "net3")
    if n3 is None:
        return "This report has no finished NET III job."
    n = n3["epochs"]
    if n3["overfitting_after_epoch"] is not None:
        verdict = (
            f"NET III overfits too, but late: its validation loss is lowest at epoch "
            f"{n3['best_epoch']} of {n}"
        )
    elif n3["best_epoch"] is not None:
        verdict = (
            f"NET III does not overfit within {n} epochs: its validation loss is lowest at "
            f"epoch {n3['best_epoch']}"
        )
    else:
        verdict = "NET III was trained without validation data"
    text = (
        f"{verdict}. Its final train-validation accuracy gap is {_points(n3['final_gap'])} "
        f"(widest {_points(n3['max_gap'])})"
    )
    others = [r for r in (first_of(rows, "net1"), first_of(rows, "net2")) if r is not None]
    if others:
        text += ", against " + " and ".join(
            f"{_points(r['final_gap'])} for {title(r)}" for r in others
        )
        text += ": dropout after every pooling and FC layer and L2 on the FC weights " + (
            "narrow the gap."
            if n3["final_gap"] is not None
            and all(r["final_gap"] is not None and n3["final_gap"] < r["final_gap"] for r in others)
            else "do not narrow it below the smaller nets' here."
        )
    else:
        text += "."
    if n3["test_accuracy"] is not None:
        text += f" Test accuracy: {_pct(n3['test_accuracy'])}"
        if others and all(r["test_accuracy"] is not None for r in others):
            text += " (" + ", ".join(f"{title(r)} {_pct(r['test_accuracy'])}" for r in others) + ")"
        text += "."
    return text


def better_net_paragraph(rows: Sequence[Row]) -> str:
    """Exercise 19: the best net of the report against NET III."""
    scored = [r for r in rows if r["test_accuracy"] is not None]
    if not scored:
        return "No job in this report has a test evaluation yet."
    best = max(scored, key=lambda r: r["test_accuracy"])
    n3 = first_of(scored, "net3")
    text = (
        f"The best job of this report is {name(best)}: {_pct(best['test_accuracy'])} test "
        f"accuracy after {best['epochs']} epochs and {_minutes(best['training_seconds'])} of "
        f"training on {best['device'] or 'an unknown device'} ({best['precision'] or 'default'} "
        "precision)"
    )
    if n3 is not None and best is not n3:
        text += (
            f", {100 * (best['test_accuracy'] - n3['test_accuracy']):+.1f} points over NET III's "
            f"{_pct(n3['test_accuracy'])} ({_minutes(n3['training_seconds'])}), with "
            f"{best['macs'] / n3['macs']:.2f}x its multiply-accumulates per image and "
            f"{best['parameters'] / n3['parameters']:.2f}x its parameters"
        )
    elif n3 is best:
        text += "; no net in this report beats NET III"
    text += "."
    used = levers(best)
    if used:
        text += " Its training options beyond the course's: " + ", ".join(
            f"`{k}={v}`" for k, v in used.items()
        )
        text += "."
    if best["final_gap"] is not None:
        text += f" Its final train-validation gap is {_points(best['final_gap'])}."
    return text


# ----------------------------------------------------------------------------- the report
def render_report(
    rows: Sequence[Row],
    *,
    compare_image: str,
    curve_images: Mapping[str, str],
    command: str,
    generated_at: str,
    reproduce: str = "",
) -> str:
    """The whole report. Image arguments are links (file names or URLs) to the PNGs."""
    parts = [
        "# Results: the course's nets and better ones on CIFAR-10",
        "",
        f"Generated {generated_at} by `{command}` from the jobs in the service's database; "
        "every number and sentence below comes from those jobs.",
        "",
        "## Comparison",
        "",
        table(rows),
        "",
        "Parameters and multiply-accumulates (MACs) per image are computed by formula "
        "(`GET /summary/{net}`); training time is the sum of the epochs' wall-clock seconds; "
        "gaps are training minus validation accuracy; the best epoch has the lowest "
        "validation loss.",
        "",
        f"![validation curves of every job]({compare_image})",
        "",
    ]
    for r in rows:
        if r["id"] in curve_images:
            parts += [f"![{title(r)} curves]({curve_images[r['id']]})", ""]
    parts += ["## Exercise 9: training against validation accuracy", ""]
    parts += [accuracy_paragraph(r) + "\n" for r in rows if r["history"]["epoch"]]
    parts += ["## Exercise 10: loss curves and the onset of overfitting", ""]
    parts += [overfitting_paragraph(r) + "\n" for r in rows if r["history"]["epoch"]]
    parts += [
        "## Exercise 16: NET II against NET I (and small kernels)",
        "",
        net2_vs_net1_paragraph(rows),
        "",
        "## Exercise 18: does NET III overfit?",
        "",
        net3_paragraph(rows),
        "",
        "## Exercise 19: a better net than NET III",
        "",
        better_net_paragraph(rows),
        "",
    ]
    if reproduce:
        parts += ["## Reproduce", "", reproduce, ""]
    return "\n".join(parts)
