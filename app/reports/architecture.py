"""Why one net has more parameters than another, read from /summary's per-layer figures.

Exercise 16 asks why NET II has more parameters than NET I. The answer is computed, never
written: layers are matched by name, the layer with the largest difference is named with
both formulas, and its cause is derived from the shapes: for a dense layer, the size of its
input (and, after a Flatten, the feature map and the number of poolings in front of it); for
a convolution, its kernel and channels. The rest of the difference is split the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.reports.export import LayerEntry, NetEntry

POOLING = ("MaxPooling2D", "AveragePooling2D")
WEIGHTED = ("Conv2D", "Dense")


@dataclass(frozen=True)
class LayerDifference:
    name: str
    type: str
    small: LayerEntry | None
    big: LayerEntry | None

    @property
    def extra(self) -> int:
        return (self.big.params if self.big else 0) - (self.small.params if self.small else 0)


def _shape(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape)


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def differences(small: NetEntry, big: NetEntry) -> list[LayerDifference]:
    """Every weighted layer of either net, matched by name, largest extra first."""
    small_layers = {layer.name: layer for layer in small.layers}
    big_layers = {layer.name: layer for layer in big.layers}
    names = [layer.name for layer in big.layers] + [
        layer.name for layer in small.layers if layer.name not in big_layers
    ]
    out = []
    for name in names:
        s, b = small_layers.get(name), big_layers.get(name)
        kind = (b or s).type  # type: ignore[union-attr]
        if (s is None or s.params == 0) and (b is None or b.params == 0):
            continue
        out.append(LayerDifference(name, kind, s, b))
    return sorted(out, key=lambda d: -d.extra)


def poolings_before(net: NetEntry, name: str) -> int:
    """Pooling layers in front of the named layer (in the summary's order)."""
    count = 0
    for layer in net.layers:
        if layer.name == name:
            return count
        count += layer.type in POOLING
    return count


def _flatten_before(net: NetEntry, name: str) -> LayerEntry | None:
    """The Flatten layer that feeds the named layer through weightless layers, if any."""
    found = None
    for layer in net.layers:
        if layer.name == name:
            return found
        if layer.type == "Flatten":
            found = layer
        elif layer.params:
            found = None
    return None


def cause(small: NetEntry, big: NetEntry, d: LayerDifference) -> str:
    """Why the layer has more weights in `big`, from the shapes around it."""
    s, b = d.small, d.big
    if s is None or b is None:
        return f"{big.title if b else small.title} alone has it"
    if d.type == "Dense":
        n_small, n_big = math.prod(s.input_shape), math.prod(b.input_shape)
        if n_small == n_big:
            return f"it has {b.output_shape[-1]:,} units against {s.output_shape[-1]:,}"
        text = f"it sees {n_big:,} inputs against {n_small:,}"
        fs, fb = _flatten_before(small, d.name), _flatten_before(big, d.name)
        if fs is not None and fb is not None:
            text += (
                f": the feature map before flatten is {_shape(fb.input_shape)} = {n_big:,} "
                f"values against {_shape(fs.input_shape)} = {n_small:,}"
            )
            ps, pb = poolings_before(small, fs.name), poolings_before(big, fb.name)
            if ps > pb and fb.input_shape[:2] != fs.input_shape[:2]:
                text += (
                    f", as {big.title} pools {_times(ps - pb)} less "
                    f"({pb} pooling{'s' if pb != 1 else ''} against {ps})"
                )
            elif fb.input_shape[-1] != fs.input_shape[-1]:
                text += (
                    f", as its last convolution has {fb.input_shape[-1]} channels "
                    f"against {fs.input_shape[-1]}"
                )
        return text
    if d.type == "Conv2D":
        parts = []
        if s.kernel != b.kernel and s.kernel and b.kernel:
            parts.append(f"{_shape(b.kernel)} kernels against {_shape(s.kernel)}")
        if s.input_shape[-1] != b.input_shape[-1]:
            parts.append(f"{b.input_shape[-1]} input channels against {s.input_shape[-1]}")
        if s.output_shape[-1] != b.output_shape[-1]:
            parts.append(f"{b.output_shape[-1]} filters against {s.output_shape[-1]}")
        return ", ".join(parts) or "its configuration differs"
    return "its configuration differs"


def explain_parameters(a: NetEntry, b: NetEntry) -> str:
    """One paragraph: which layers hold the extra parameters of the larger net, and why."""
    small, big = (a, b) if a.total_params <= b.total_params else (b, a)
    extra = big.total_params - small.total_params
    head = (
        f"{big.title} has {big.total_params:,} parameters against {small.title}'s "
        f"{small.total_params:,} ({extra:+,})"
    )
    if extra == 0:
        return head + "."
    diffs = differences(small, big)
    top = diffs[0]
    share = top.extra / extra
    amount = "most" if share > 0.5 else "the largest share"
    text = (
        f"{head}. {amount[0].upper() + amount[1:]} of the extra parameters "
        f"({top.extra:,}, {100 * share:.0f}%) are in {top.name}: "
        f"{top.big.formula.split(';')[0] if top.big else '0'} against "
        f"{top.small.formula.split(';')[0] if top.small else '0'}, "
        f"because {cause(small, big, top)}."
    )
    by_type: dict[str, list[LayerDifference]] = {}
    for d in diffs[1:]:
        if d.extra:
            by_type.setdefault(d.type, []).append(d)
    rest = []
    order = [layer.name for layer in big.layers] + [layer.name for layer in small.layers]
    for kind, group in by_type.items():
        total = sum(d.extra for d in group)
        names = ", ".join(d.name for d in sorted(group, key=lambda d: order.index(d.name)))
        reasons = sorted({cause(small, big, d) for d in group})
        rest.append(
            f"the {'convolutions' if kind == 'Conv2D' else kind + ' layers'} ({names}) "
            f"{'add' if total > 0 else 'save'} {abs(total):,} ({100 * total / extra:.0f}%): "
            + "; ".join(reasons)
        )
    if rest:
        text += " Besides, " + "; ".join(rest) + "."
    return text
