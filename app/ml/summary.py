"""Parameter counts and output shapes by formula (exercises 4 and 12), checked against Keras.

Each figure is computed from the layer's hyper-parameters alone:
  convolution  P_n = ((m * n * C_i) + 1) * C_o
  dense        P_n = (N_in + 1) * N_out
  pool/flatten/dropout  P_n = 0
  batch normalisation  P_n = 4 * C (gamma, beta trainable; moving mean and variance not),
                       3 * C without scale (NET V: beta trainable only)
  patch whitening      P_n = (p * p * C_i) * 2(p * p * C_i) + 2(p * p * C_i), the kernel frozen
  rescaling            P_n = 0
  add (residual)       P_n = 0, output shape = the (identical) input shapes
  output size  O_n = floor((N - F + 2P) / S) + 1
and then compared with what Keras reports for the built model. A disagreement is a bug
(and a failing test), not a footnote.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from app.ml.nets import INPUT_SHAPE, get_net

BYTES_PER_WEIGHT = 4  # float32 master weights, also under mixed precision


@dataclass
class LayerCalc:
    name: str
    type: str
    input_shape: list[int]
    output_shape: list[int]
    formula: str
    # Window layers (convolution, pooling) fill these; weightless layers keep the zeros.
    kernel: list[int] | None = None
    stride: list[int] | None = None
    padding: list[float] | None = None
    params: int = 0
    trainable_params: int = 0
    macs: int = 0
    keras_output_shape: list[int] = field(default_factory=list)
    keras_params: int = 0
    agrees: bool = False


@dataclass
class NetSummary:
    net: str
    title: str
    layout: str
    notes: str
    input_shape: list[int]
    layers: list[LayerCalc]
    total_params: int
    keras_total_params: int
    trainable_params: int
    non_trainable_params: int
    keras_trainable_params: int
    macs_per_image: int
    weight_bytes: int
    agrees: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _spatial(n: int, f: int, s: int, padding: str) -> tuple[int, float, str]:
    """Output size, the padding P per side, and the formula with the numbers filled in."""
    if padding == "valid":
        out = (n - f) // s + 1
        return out, 0, f"floor(({n} - {f} + 2*0) / {s}) + 1 = {out}"
    # 'same': Keras pads so that O = ceil(N / S); the total padding may be odd.
    out = math.ceil(n / s)
    pad = max((out - 1) * s + f - n, 0) / 2
    pad_text = f"{pad:g}"
    return out, pad, f"floor(({n} - {f} + 2*{pad_text}) / {s}) + 1 = {out} ('same')"


def _calc_layer(
    layer: Any, in_shape: list[int], in_shapes: list[list[int]] | None = None
) -> LayerCalc:
    """The formula view of one Keras layer, from its configuration only."""
    kind = type(layer).__name__
    cfg = layer.get_config()
    base: dict[str, Any] = {"name": layer.name, "type": kind, "input_shape": in_shape}
    if in_shapes is not None:
        return _calc_merge(layer, base | {"input_shapes": in_shapes})
    if kind == "Conv2D":
        (m, n), (sh, sw) = _pair(cfg["kernel_size"]), _pair(cfg["strides"])
        c_in, c_out = in_shape[2], int(cfg["filters"])
        oh, ph, fh = _spatial(in_shape[0], m, sh, cfg["padding"])
        ow, pw, _ = _spatial(in_shape[1], n, sw, cfg["padding"])
        bias = 1 if cfg["use_bias"] else 0
        params = (m * n * c_in + bias) * c_out
        formula = f"P = (({m}*{n}*{c_in}) + {bias}) * {c_out} = {params:,}; O = {fh}"
        return LayerCalc(
            **base,
            output_shape=[oh, ow, c_out],
            kernel=[m, n],
            stride=[sh, sw],
            padding=[ph, pw],
            params=params,
            trainable_params=params,
            macs=oh * ow * c_out * m * n * c_in,
            formula=formula,
        )
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        (m, n) = _pair(cfg["pool_size"])
        (sh, sw) = _pair(cfg["strides"] or cfg["pool_size"])
        oh, ph, fh = _spatial(in_shape[0], m, sh, cfg["padding"])
        ow, pw, _ = _spatial(in_shape[1], n, sw, cfg["padding"])
        return LayerCalc(
            **base,
            output_shape=[oh, ow, in_shape[2]],
            kernel=[m, n],
            stride=[sh, sw],
            padding=[ph, pw],
            formula=f"P = 0 (pooling has no weights); O = {fh}",
        )
    if kind == "Flatten":
        size = math.prod(in_shape)
        dims = " * ".join(str(d) for d in in_shape)
        return LayerCalc(
            **base,
            output_shape=[size],
            formula=f"P = 0; O = {dims} = {size:,}",
        )
    if kind == "Dense":
        n_in, n_out = in_shape[-1], int(cfg["units"])
        bias = 1 if cfg["use_bias"] else 0
        params = (n_in + bias) * n_out
        return LayerCalc(
            **base,
            output_shape=[*in_shape[:-1], n_out],
            params=params,
            trainable_params=params,
            macs=n_in * n_out,
            formula=f"P = ({n_in:,} + {bias}) * {n_out:,} = {params:,}",
        )
    if kind == "PatchWhitening":
        p, c_in = int(cfg["patch"]), in_shape[2]
        d = p * p * c_in
        oh, _, fh = _spatial(in_shape[0], p, 1, "valid")
        ow, _, _ = _spatial(in_shape[1], p, 1, "valid")
        params = d * 2 * d + 2 * d
        return LayerCalc(
            **base,
            output_shape=[oh, ow, 2 * d],
            kernel=[p, p],
            stride=[1, 1],
            padding=[0, 0],
            params=params,
            trainable_params=2 * d,
            macs=oh * ow * 2 * d * d,
            formula=f"P = ({p}*{p}*{c_in}) * {2 * d} + {2 * d} = {params:,} "
            f"(kernel frozen, bias trainable); O = {fh}",
        )
    if kind in ("Dropout", "Activation", "ReLU", "SpatialDropout2D", "Rescaling"):
        return LayerCalc(
            **base,
            output_shape=list(in_shape),
            formula="P = 0; O = input shape",
        )
    if kind == "BatchNormalization":
        if not cfg.get("center", True):
            raise NotImplementedError(f"BatchNormalization without center ({layer.name})")
        channels = in_shape[-1]
        if not cfg.get("scale", True):
            return LayerCalc(
                **base,
                output_shape=list(in_shape),
                params=3 * channels,
                trainable_params=channels,
                formula=f"P = 3 * {channels} = {3 * channels:,} "
                "(beta trainable, no gamma; moving mean, variance not)",
            )
        return LayerCalc(
            **base,
            output_shape=list(in_shape),
            params=4 * channels,
            trainable_params=2 * channels,
            formula=f"P = 4 * {channels} = {4 * channels:,} "
            "(gamma, beta trainable; moving mean, variance not)",
        )
    if kind in ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"):
        return _calc_merge(layer, base | {"input_shapes": [in_shape]})
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        return LayerCalc(
            **base,
            output_shape=[in_shape[-1]],
            formula=f"P = 0; O = {in_shape[-1]} channels",
        )
    raise NotImplementedError(f"no formula for layer type {kind} ({layer.name})")


def _calc_merge(layer: Any, base: dict[str, Any]) -> LayerCalc:
    """Element-wise merges (the residual Add): no weights, all inputs must have one shape."""
    shapes: list[list[int]] = base.pop("input_shapes")
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(f"{layer.name}: inputs of different shapes {shapes}")
    dims = "x".join(str(d) for d in shapes[0])
    return LayerCalc(
        **base,
        output_shape=list(shapes[0]),
        formula=f"P = 0; O = {dims} (element-wise over {len(shapes)} inputs of {dims})",
    )


def _inputs_of(layer: Any) -> list[Any]:
    tensors = layer.input
    return list(tensors) if isinstance(tensors, list | tuple) else [tensors]


def summarize(net: str) -> NetSummary:
    """Build `net`, compute every layer's figures by formula and put Keras' beside them."""
    spec = get_net(net)
    model = spec.builder()
    shape = list(INPUT_SHAPE)
    # Shapes by tensor, so that graphs with branches (residual blocks) are followed too;
    # a layer whose input is not found takes the previous layer's output (Sequential).
    by_tensor: dict[int, list[int]] = {id(t): list(INPUT_SHAPE) for t in model.inputs}
    layers: list[LayerCalc] = []
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        in_shapes = [by_tensor.get(id(t), shape) for t in _inputs_of(layer)]
        if len(in_shapes) > 1:
            calc = _calc_layer(layer, in_shapes[0], in_shapes)
        else:
            calc = _calc_layer(layer, in_shapes[0])
        by_tensor[id(layer.output)] = calc.output_shape
        calc.keras_output_shape = [int(d) for d in layer.output.shape[1:]]
        calc.keras_params = int(layer.count_params())
        calc.agrees = (
            calc.keras_output_shape == calc.output_shape and calc.keras_params == calc.params
        )
        layers.append(calc)
        shape = calc.output_shape
    total = sum(layer.params for layer in layers)
    trainable = sum(layer.trainable_params for layer in layers)
    keras_trainable = sum(int(math.prod(w.shape)) for w in model.trainable_weights)
    keras_total = int(model.count_params())
    return NetSummary(
        net=spec.name,
        title=spec.title,
        layout=spec.layout,
        notes=spec.notes,
        input_shape=list(INPUT_SHAPE),
        layers=layers,
        total_params=total,
        keras_total_params=keras_total,
        trainable_params=trainable,
        non_trainable_params=total - trainable,
        keras_trainable_params=keras_trainable,
        macs_per_image=sum(layer.macs for layer in layers),
        weight_bytes=total * BYTES_PER_WEIGHT,
        agrees=all(layer.agrees for layer in layers)
        and total == keras_total
        and trainable == keras_trainable,
    )


def format_table(summary: NetSummary) -> str:
    """A plain-text table for the CLI, one row per layer, formula beside the Keras figures."""
    header = f"{'layer':<12} {'type':<18} {'output':<14} {'params':>10} {'keras':>10} ok  formula"
    lines = [f"{summary.title} ({summary.net}): {summary.layout}", header, "-" * len(header)]
    for layer in summary.layers:
        shape = "x".join(str(d) for d in layer.output_shape)
        lines.append(
            f"{layer.name:<12} {layer.type:<18} {shape:<14} {layer.params:>10,} "
            f"{layer.keras_params:>10,} {'yes' if layer.agrees else 'NO ':<3} {layer.formula}"
        )
    lines += [
        "-" * len(header),
        f"total params {summary.total_params:,} (Keras: {summary.keras_total_params:,}); "
        f"trainable {summary.trainable_params:,}; non-trainable {summary.non_trainable_params:,}",
        f"weights {summary.weight_bytes:,} bytes (float32); "
        f"{summary.macs_per_image:,} multiply-accumulates per image",
        f"formulas agree with Keras: {'yes' if summary.agrees else 'NO'}",
    ]
    if summary.notes:
        lines.append(f"note: {summary.notes}")
    return "\n".join(lines)
