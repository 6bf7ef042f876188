"""The rules of the equivariance analysis: how each op moves the input's shifts (``fxblur.analysis.equivariance``).

``value_of(node, analysis)`` applies the rule of ``node``'s op to the values of its inputs.
First, what holds for every op:

- *constants*: an op whose inputs are all constant is constant;
- *broken inputs*: an op that reads a broken value is broken, for the same reasons;
- *invariant inputs*: an op whose inputs are all constant or invariant is invariant, along
  every axis, whatever it computes (the head after a global pool).

Then the rules per kind of op, each a function below:

- ``pointwise``: elementwise ops and activations keep every axis; operands that follow the
  shifts must agree (same axes, resolution, phases), and the others must be constant over
  space (a per-channel scale; a learned positional embedding added to a map breaks);
- ``window``: convs, pools and blurs keep every axis when they pad circularly and keep the
  map's size (padding that makes up for the kernel); a stride above 1 subsamples: at a
  fixed phase it coarsens the lattice (the output follows only shifts by multiples of the
  stride), on a map rolled to a polyphase phase it keeps the lattice and records the phase;
  zero, ``-inf`` or reflect padding, cropping, ceil-mode windows past the border and sizes
  the stride does not divide break. A conv subclass with a ``forward`` of its own breaks
  unless fxblur knows how it pads (``fxblur.known_layers``): timm's ``StdConv2d`` pads with
  zeros whatever its ``padding_mode``, and a layer padding 'same' at run time pads with zeros
  (or ``-inf``) until circular padding pads its input (``pad_same_circularly``);
- ``reduce``: means, sums, maxima and adaptive pools over every spatial axis make the value
  invariant along them (global pooling); an adaptive pool to a grid breaks;
- ``layout``: permutes, transposes and (un)squeezes move the axes; flattening or reshaping
  a spatial axis together with another breaks;
- ``index``: slicing keeps channels and subsamples the spatial axes by a step (as a strided
  op); any other index into a spatial axis (a crop, a position) breaks;
- ``join``: ``cat`` and ``stack`` along a non-spatial axis join their operands as a
  pointwise op does; along a spatial axis they break; ``split``, ``chunk`` and ``unbind``
  along a non-spatial axis give each piece the value;
- ``linear``: linear layers and matrix products over non-spatial axes keep the axes;
- ``norm``: batch, group, instance and layer norms keep the axes (statistics over a whole
  axis do not move under a circular shift); a layer norm whose weight varies over space breaks;
- the polyphase ops: ``phase_of`` chooses a phase on a map, ``roll_to_phase`` aligns a map
  that lines up with it, ``select_phase`` subsamples at it; circular padding
  (``pad_window_circularly``, ``pad_same_circularly``, ``F.pad(mode="circular")``,
  ``nn.CircularPad2d``, ``fxblur.ops.circular.CircularPad``) pads a map for the window op
  that reads it; padding in another mode (``F.pad``, ``nn.ZeroPad2d``) breaks;
- anything else that reads a value following the shifts breaks it: no rule, no claim.

Example:
    >>> from fxblur.analysis.equivariance import Axis, Kind, Value
    >>> shifted = Value(Kind.SHIFTS, axes=(Axis(2), Axis(3)))
    >>> lcm_lattice(shifted, (1, 2), (1, 2)).axes  # subsampled along the width at a fixed phase
    (Axis(position=2, scale=1, lattice=1), Axis(position=3, scale=2, lattice=2))
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.ops.stochastic_depth import stochastic_depth

from fxblur._compat import AVG_POOL_BASE, BATCH_NORM_BASE, CONV_BASE, LP_POOL_BASE, MAX_POOL_BASE
from fxblur.analysis.equivariance import CONSTANT, Analysis, Axis, Break, BreakKind, Kind, Phase, Value, broken
from fxblur.analysis.pointwise import FUNCTIONS as POINTWISE_FUNCTIONS
from fxblur.analysis.pointwise import MODULES as POINTWISE_MODULES
from fxblur.analysis.subsampling import read_subsampling
from fxblur.analysis.window_ops import WindowOp, read_window_op
from fxblur.known_layers import norm_act, pads_as_configured, pads_same_at_run_time, pads_with_zeros
from fxblur.ops.along import blur_along, phase_along, roll_along
from fxblur.ops.blur_module import Blur
from fxblur.ops.blurred import BlurredOp
from fxblur.ops.ceil_mode import pad_for_ceil_mode, pad_same_circularly, pad_window_circularly, same_padding
from fxblur.ops.circular import CIRCULAR_PADDING_LAYERS, OTHER_PADDING_LAYERS, CircularPad, CircularPaddingConv
from fxblur.ops.max_pool import max_pool_stride_one
from fxblur.ops.padding import circular_pad
from fxblur.ops.polyphase import phase_of, roll_to_phase, select_phase
from fxblur.trace.calls import LINE, SITE, nodes_in

Rule = Callable[[fx.Node, Analysis], Value]

_UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "clamp",
    "clamp_", "float", "double", "half", "bfloat16", "to", "type_as", "contiguous", "clone", "detach", "pow",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "square", "erf", "sin", "cos", "masked_fill",
    "softplus", "reciprocal", "expm1", "log1p", "sign", "where", "maximum", "minimum", "hardtanh",
}  # fmt: skip
_EXTRA_POINTWISE = {
    operator.neg, operator.pos, operator.abs, operator.pow, operator.floordiv, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.abs, torch.neg, torch.pow, torch.clamp, torch.clip, torch.where, torch.maximum,
    torch.minimum, torch.erf, torch.square, torch.reciprocal, F.elu, F.leaky_relu, F.softplus, F.glu,
    torch.nn.functional.hardtanh, F.logsigmoid, F.tanhshrink, F.softsign, torch.sign,
}  # fmt: skip
_PADDING_WORDS = {"zeros": "with zeros", "reflect": "by reflection", "replicate": "by replication", "circular": ""}
_SIZE_METHODS = {"size", "dim", "numel", "element_size", "nelement", "stride", "is_contiguous"}
_NORM_MODULES = (BATCH_NORM_BASE, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                 nn.LocalResponseNorm)  # fmt: skip
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)  # fmt: skip
_ADAPTIVE_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.adaptive_avg_pool1d,
}  # fmt: skip
_REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std, torch.var,
               torch.logsumexp)  # fmt: skip
_REDUCTION_METHODS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp")


# -- dispatch -----------------------------------------------------------------------------


def value_of(node: fx.Node, analysis: Analysis) -> Value:
    """The value of ``node``, from its inputs' values (see the module docstring)."""
    values = analysis.values
    if node.op == "placeholder":
        return _input(node, analysis)
    if node.op == "get_attr":
        return CONSTANT
    if node.op == "output":
        return _structure(node.args[0], values)
    if node.op == "call_function" and node.target is operator.getitem and values[node.args[0]].kind is Kind.ITEMS:
        return _item(node, analysis)
    if node.op == "call_function" and isinstance(node.target, type) and issubclass(node.target, (tuple, dict)):
        return _structure([*node.args, *node.kwargs.values()], values)  # an output class: OrderedDict, ModelOutput
    flat = [leaf for arg in nodes_in((node.args, node.kwargs)) for leaf in _flat(values[arg])]
    if any(value.kind is Kind.BROKEN for value in flat):
        return broken(*(b for value in flat for b in value.breaks))
    if all(value.kind is Kind.CONSTANT for value in flat):
        return CONSTANT
    if all(value.kind is Kind.CONSTANT or (value.invariant and value.aligned is None) for value in flat):
        return _invariant_of(flat)
    rule = _rule(node, analysis)
    if rule is None:
        return broken(
            _break(node, analysis, BreakKind.UNKNOWN, f"no equivariance rule for {_describe(node, analysis)}")
        )
    return rule(node, analysis)


def _rule(node: fx.Node, analysis: Analysis) -> Rule | None:
    if node.op == "call_module":
        module = analysis.graph_module.get_submodule(node.target)
        kind = norm_act(module)
        if kind is not None:  # a known norm with an activation: per channel, or over the last dim
            return _linear if kind == "last" else _norm
        return next((rule for cls, rule in _MODULE_RULES if isinstance(module, cls)), None)
    if node.op == "call_function":
        if node.target in _FUNCTION_RULES:
            return _FUNCTION_RULES[node.target]
        if node.target in POINTWISE_FUNCTIONS or node.target in _EXTRA_POINTWISE:
            return pointwise
        if read_window_op(node, analysis.graph_module) is not None:
            return window
        return None
    if node.op == "call_method":
        if node.target in _METHOD_RULES:
            return _METHOD_RULES[node.target]
        if node.target in _UNARY_METHODS:
            return pointwise
    return None


# -- inputs, constants, structures ----------------------------------------------------------


def _input(node: fx.Node, analysis: Analysis) -> Value:
    """The model's first input follows the shifts along its spatial axes; other inputs are held fixed."""
    first = next(n for n in analysis.graph_module.graph.nodes if n.op == "placeholder")
    if node is not first or analysis.spatial == 0:
        return CONSTANT
    return Value(Kind.SHIFTS, axes=tuple(Axis(2 + i) for i in range(analysis.spatial)))


def _structure(value: Any, values: dict[fx.Node, Value]) -> Value:
    if isinstance(value, fx.Node):
        return values[value]
    if isinstance(value, (tuple, list)):
        return Value(Kind.ITEMS, items=tuple(_structure(v, values) for v in value))
    if isinstance(value, dict):
        return Value(Kind.ITEMS, items=tuple(_structure(v, values) for v in value.values()))
    return CONSTANT


def _flat(value: Value) -> list[Value]:
    return [leaf for item in value.items for leaf in _flat(item)] if value.kind is Kind.ITEMS else [value]


def _item(node: fx.Node, analysis: Analysis) -> Value:
    """An item of a tuple (the pieces of a ``split``, a module's outputs) has that item's value."""
    source, index = analysis.values[node.args[0]], node.args[1]
    if isinstance(index, int) and -len(source.items) <= index < len(source.items):
        return source.items[index]
    if isinstance(index, slice):
        return Value(Kind.ITEMS, items=source.items[index])
    return broken(_break(node, analysis, BreakKind.UNKNOWN, "indexes a tuple by a value computed at run time"))


def _invariant_of(values: list[Value]) -> Value:
    """Any function of constant and invariant values: invariant, following their common lattice."""
    shifting = [value for value in values if value.kind is Kind.SHIFTS]
    lattices = [math.lcm(*(value.axes[i].lattice for value in shifting)) for i in range(len(shifting[0].axes))]
    return Value(Kind.SHIFTS, axes=tuple(Axis(None, 1, step) for step in lattices), fixed=_merged(shifting))


def _merged(values: Sequence[Value]) -> tuple[Break, ...]:
    return tuple(dict.fromkeys(b for value in values for b in value.fixed))


def _constant(node: fx.Node, analysis: Analysis) -> Value:
    """Sizes, shapes, dtypes and devices of a value, and checks on them, do not move when its content does."""
    return CONSTANT


# -- pointwise ------------------------------------------------------------------------------


def pointwise(node: fx.Node, analysis: Analysis) -> Value:
    """Elementwise ops: the operands that follow the shifts must agree; the others must not vary over space."""
    return _combine(node, analysis, nodes_in((node.args, node.kwargs)), _rank(node))


def _combine(node: fx.Node, analysis: Analysis, operands: Sequence[fx.Node], rank: int) -> Value:
    """``operands`` broadcast together into a value of ``rank`` dims (trailing dims aligned)."""
    values = analysis.values
    shifting = [arg for arg in operands if values[arg].kind is Kind.SHIFTS]
    placed = {arg: _aligned_to(values[arg], rank - _rank(arg)) for arg in shifting}
    following = [placed[arg] for arg in shifting if not values[arg].invariant]
    first = following[0]
    for other in following[1:]:
        problem = _disagreement(first, other)
        if problem:
            return broken(_break(node, analysis, BreakKind.MISALIGNED, problem))
    spatial = [p for p in first.positions if p is not None]
    for arg in operands:
        if arg in placed and not values[arg].invariant:
            continue
        shape, shift = _shape(arg), rank - _rank(arg)
        if shape is not None and any(0 <= p - shift < len(shape) and shape[p - shift] != 1 for p in spatial):
            what = (
                "a tensor that does not follow the input"
                if values[arg].kind is Kind.CONSTANT
                else "an invariant tensor"
            )
            why = f"combines the map with {what} that varies over space (as a positional embedding does)"
            return broken(_break(node, analysis, BreakKind.POSITIONAL, why))
    return _joined(first, list(placed.values()))


def _aligned_to(value: Value, shift: int) -> Value:
    return value.moved(None if p is None else p + shift for p in value.positions)


def _joined(first: Value, everything: Sequence[Value]) -> Value:
    """``first`` with the lattice and fixed-phase subsamplings of all of ``everything`` (maps and invariants)."""
    axes = tuple(
        replace(axis, lattice=math.lcm(*(v.axes[i].lattice for v in everything))) for i, axis in enumerate(first.axes)
    )
    return replace(first, axes=axes, fixed=_merged(everything))


def _disagreement(first: Value, other: Value) -> str:
    if first.positions != other.positions:
        return "joins maps whose spatial axes do not line up"
    if tuple(a.scale for a in first.axes) != tuple(a.scale for a in other.axes):
        return "joins maps of different resolutions"
    if first.phases != other.phases:
        return "joins maps subsampled at phases chosen apart"
    if first.aligned != other.aligned:
        return "joins a map rolled to a phase with one that is not"
    if first.padding != other.padding:
        return "joins maps padded differently"
    return ""


# -- window ops: convs, pools, blurs --------------------------------------------------------


def window(node: fx.Node, analysis: Analysis) -> Value:
    """A conv or pool (module or function): its padding, size and stride decide (see the module docstring)."""
    op = read_window_op(node, analysis.graph_module)
    module = op.module
    if module is not None and isinstance(module, CONV_BASE) and module.transposed:
        return broken(
            _break(node, analysis, BreakKind.UPSAMPLING, "a transposed conv places its samples on a fixed grid")
        )
    zeros = module is not None and pads_with_zeros(type(module))  # whatever its padding_mode says
    if module is not None and pads_same_at_run_time(module):
        why = f"{type(module).__name__} pads 'same' with {'-inf' if op.kind == 'max_pool' else 'zeros'}"
        return broken(_break(node, analysis, BreakKind.PADDING, why))
    if module is not None and op.custom_forward and not (pads_as_configured(type(module)) or zeros):
        why = f"{type(module).__name__} has a forward of its own: fxblur cannot tell how it pads"
        return broken(_break(node, analysis, BreakKind.UNKNOWN, why))
    if op.kernel_size is None:  # a functional conv on a computed weight: its shape tells the kernel
        weight = _shape(op.arguments.get("weight"))
        if weight is None:
            return broken(_break(node, analysis, BreakKind.UNKNOWN, "convolves with a weight of unknown shape"))
        op = replace(op, kernel_size=tuple(weight[2:]))
    step = _Window.of(op, "zeros" if zeros else None)
    return step.apply(node, analysis, analysis.values[op.input], _shape(op.input), _shape(node))


class _Window:
    """The geometry of one window op along its spatial axes: what ``apply`` checks (see ``window``)."""

    def __init__(
        self, kernel, dilation, stride, circular, other, ceil_mode: bool, pads_with: str, uniform: bool = False,
        wraps_once: bool = False,
    ) -> None:  # fmt: skip
        self.kernel, self.dilation, self.stride = tuple(kernel), tuple(dilation), tuple(stride)
        self.uniform = uniform  # every sample of a window weighs alike (a pool): over a whole axis, a global pool
        self.wraps_once = wraps_once  # its own circular padding is PyTorch's, which wraps around once at most
        self.circular = tuple(circular)  # (before, after) the op pads circularly itself, per axis
        self.other = tuple(other)  # (before, after) it pads with zeros, -inf or by reflection
        self.ceil_mode = ceil_mode
        self.pads_with = pads_with

    @classmethod
    def of(cls, op: WindowOp, mode: str | None = None) -> _Window:
        """The geometry of ``op``, padding in ``mode`` (by default the mode its module names, else zeros)."""
        spans = [d * (k - 1) for k, d in zip(op.kernel_size, op.dilation, strict=True)]
        if op.padding == "same":
            padding = [(span // 2, span - span // 2) for span in spans]
        elif op.padding == "valid":
            padding = [(0, 0)] * op.dims
        else:
            padding = [(p, p) for p in op.padding]
        if mode is None:
            mode = op.module.padding_mode if op.kind == "conv" and op.module is not None else "zeros"
        none = [(0, 0)] * op.dims
        pads_with = "with -inf" if op.kind == "max_pool" else _PADDING_WORDS.get(mode, mode)
        uniform = op.kind != "conv"
        if mode == "circular":  # fxblur's circular convs wrap around as often as they must; PyTorch's once
            once = not isinstance(op.module, CircularPaddingConv)
            return cls(op.kernel_size, op.dilation, op.stride, padding, none, op.ceil_mode, pads_with, uniform, once)
        return cls(op.kernel_size, op.dilation, op.stride, none, padding, op.ceil_mode, pads_with, uniform)

    @classmethod
    def blur(cls, blur: Blur) -> _Window:
        dims = len(blur.stride)
        padding = [((t - 1) // 2, t - 1 - (t - 1) // 2) for t in blur.filter_size]
        none = [(0, 0)] * dims
        circular = blur.padding_mode == "circular"
        return cls(blur.filter_size, (1,) * dims, blur.stride, padding if circular else none,
                   none if circular else padding, False, _PADDING_WORDS[blur.padding_mode])  # fmt: skip

    def output_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        dims = len(self.kernel)
        out = []
        for n, k, d, s, c, o in zip(size[-dims:], self.kernel, self.dilation, self.stride, self.circular, self.other,
                                     strict=True):  # fmt: skip
            out.append((n + sum(c) + sum(o) - d * (k - 1) - 1) // s + 1)
        return (*size[:-dims], *out)

    def apply(self, node: fx.Node, analysis: Analysis, value: Value, size_in, size_out, axes=None) -> Value:
        """``value`` through this window op; it slides over ``axes`` (default: the last ones)."""

        def fail(kind: BreakKind, why: str) -> Value:
            return broken(_break(node, analysis, kind, why))

        dims = len(self.kernel)
        if size_in is None or size_out is None or len(size_in) < dims + 1:
            return fail(BreakKind.UNKNOWN, "its input or output has no shape")
        rank = len(size_in)
        op_axes = tuple(range(rank - dims, rank)) if axes is None else tuple(a % rank for a in axes)
        if len(value.axes) != dims or any(p is not None and p not in op_axes for p in value.positions):
            return fail(BreakKind.LAYOUT, "slides its window over axes that are not the input's spatial axes")
        stride, positions = [1] * dims, list(value.positions)
        for i, position in enumerate(value.positions):
            if position is None:
                continue
            j = op_axes.index(position)
            before, after = value.padding[i] if value.padding is not None else (0, 0)
            n = size_in[position] - before - after
            total = before + after + sum(self.circular[j]) + sum(self.other[j])
            span, s = self.dilation[j] * (self.kernel[j] - 1), self.stride[j]
            windows = (n + total - span - 1) // s + 1
            if self.uniform and total == 0 and windows == 1 and span + 1 == n:  # a pool over the whole axis
                positions[i] = None
                continue
            if self.ceil_mode and -(-(n + total - span - 1) // s) + 1 != windows:
                return fail(BreakKind.PADDING, "its ceil-mode windows reach past the map")
            if s == 1 and windows != n:
                return fail(BreakKind.SIZE, f"changes the map's size from {n} to {windows}: its padding does not "
                                            "make up for its kernel")  # fmt: skip
            if s > 1 and n % s:
                return fail(BreakKind.SIZE, f"subsamples a map of {n} by {s}, which does not divide it")
            if s > 1 and windows != n // s:
                return fail(BreakKind.SIZE, f"makes {windows} samples of a map of {n} at stride {s}, not {n // s}")
            if sum(self.other[j]):
                return fail(BreakKind.PADDING, f"pads {self.pads_with}")
            if self.wraps_once and max(self.circular[j]) > n:
                return fail(BreakKind.PADDING, f"pads a map of {n} by more than its size (PyTorch's circular padding "
                                               "wraps around once)")  # fmt: skip
            if size_out[position] != windows:
                return fail(BreakKind.SIZE, f"its output's size {size_out[position]} is not the {windows} expected")
            stride[i] = s
        result = replace(value.moved(positions), padding=None)
        return result if all(s == 1 for s in stride) else _subsample(node, analysis, result, tuple(stride))


def _subsample(node: fx.Node, analysis: Analysis, value: Value, stride: tuple[int, ...]) -> Value:
    """``value`` subsampled by ``stride`` (one per spatial axis): at its aligned phase, or at a fixed one."""
    if value.aligned is not None:
        if value.aligned.stride != stride:
            why = f"subsamples by {stride} a map rolled to a phase chosen for a stride of {value.aligned.stride}"
            return broken(_break(node, analysis, BreakKind.MISALIGNED, why))
        axes = tuple(replace(axis, scale=axis.scale * s) for axis, s in zip(value.axes, stride, strict=True))
        return replace(value, axes=axes, phases=(*value.phases, value.aligned), aligned=None)
    fixed = _break(node, analysis, BreakKind.FIXED_PHASE, f"subsamples at a fixed phase (stride {stride})")
    steps = tuple(axis.scale * s for axis, s in zip(value.axes, stride, strict=True))
    return replace(lcm_lattice(value, stride, steps), fixed=(*value.fixed, fixed))


def lcm_lattice(value: Value, stride: tuple[int, ...], steps: tuple[int, ...]) -> Value:
    """``value`` after a fixed-phase subsampling by ``stride``: it follows only shifts by multiples of ``steps``."""
    axes = tuple(
        replace(axis, scale=axis.scale * s, lattice=math.lcm(axis.lattice, step))
        for axis, s, step in zip(value.axes, stride, steps, strict=True)
    )
    return replace(value, axes=axes)


def _blur(node: fx.Node, analysis: Analysis) -> Value:
    """A blur: a window op of its taps, circular only with ``padding_mode="circular"``."""
    blur = analysis.graph_module.get_submodule(node.target)
    source = node.args[0]
    return _Window.blur(blur).apply(node, analysis, analysis.values[source], _shape(source), _shape(node))


def _blurred_op(node: fx.Node, analysis: Analysis) -> Value:
    """A blurred op module (``fxblur.ops.blurred``): its blur, then its op; or its op, then its blur."""
    module = analysis.graph_module.get_submodule(node.target)
    source = node.args[0]
    value, size_in, size_out = analysis.values[source], _shape(source), _shape(node)
    if getattr(module, "pads_for_ceil_mode", False):
        return broken(_break(node, analysis, BreakKind.PADDING, "pads its ceil-mode windows with -inf"))
    op = _Window.of(read_window_op(node, analysis.graph_module))
    blur = _Window.blur(module.fxblur)
    first, second = (blur, op) if module.blur_input else (op, blur)
    if size_in is None:
        return broken(_break(node, analysis, BreakKind.UNKNOWN, "its input has no shape"))
    size_mid = first.output_size(size_in)
    middle = first.apply(node, analysis, value, size_in, size_mid)
    return middle if middle.kind is Kind.BROKEN else second.apply(node, analysis, middle, size_mid, size_out)


def _max_pool_stride_one(node: fx.Node, analysis: Analysis) -> Value:
    """fxblur's stride-1 max pool (``x, kernel_size, padding, dilation``): padded with ``-inf``."""
    x, kernel, padding, dilation = node.args[:4]
    dims = len(kernel)
    step = _Window(kernel, dilation, (1,) * dims, [(0, 0)] * dims, [(p, p) for p in padding], False, "with -inf", True)
    return step.apply(node, analysis, analysis.values[x], _shape(x), _shape(node))


def _blur_along(node: fx.Node, analysis: Analysis) -> Value:
    """``blur_along(x, axes, taps, padding_mode)``: a stride-1 blur along ``axes`` (every spatial axis for ``None``).

    Along the map's other spatial axes it is a window of one tap, so it slides over all of them.
    """
    source, axes, taps, mode = node.args[:4]
    rank, value = _rank(source), analysis.values[source]
    axes = tuple(range(2, rank)) if axes is None else tuple(a % rank for a in axes)
    taps = [taps] * len(axes) if isinstance(taps, int) else list(taps)
    spatial = sorted({p for p in value.positions if p is not None} | set(axes))
    taps_of = dict(zip(axes, taps, strict=True))
    taps = [taps_of.get(a, 1) for a in spatial]
    padding = [((t - 1) // 2, t - 1 - (t - 1) // 2) for t in taps]
    none = [(0, 0)] * len(spatial)
    circular = mode == "circular"
    step = _Window(taps, (1,) * len(spatial), (1,) * len(spatial), padding if circular else none,
                   none if circular else padding, False, _PADDING_WORDS[mode])  # fmt: skip
    return step.apply(node, analysis, value, _shape(source), _shape(node), tuple(spatial))


def _space_to_depth(node: fx.Node, analysis: Analysis) -> Value:
    """``pixel_unshuffle``: the phases of each block become channels, so it subsamples the last two axes."""
    return _subsampler(node, analysis)


def _interpolate(node: fx.Node, analysis: Analysis) -> Value:
    """Interpolation by a scale below 1 whose inverse is whole: nearest, linear (``align_corners=False``) and area
    take each output from a window at a fixed place in its block, so they subsample at a fixed phase; bicubic
    reads past the border, which it clamps. Anything else (sizes, scales above 1) has no rule here."""
    op = read_subsampling(node, analysis.graph_module)
    arguments = dict(zip(("input", "size", "scale_factor", "mode", "align_corners"), node.args, strict=False))
    arguments |= node.kwargs
    if node.op == "call_module":
        module = analysis.graph_module.get_submodule(node.target)
        arguments |= {"mode": module.mode, "align_corners": module.align_corners}
    if op is None:
        why = "interpolates on a fixed grid (to a size, or by a scale above 1)"
        return broken(_break(node, analysis, BreakKind.UPSAMPLING, why))
    mode = arguments.get("mode", "nearest")
    if mode not in ("nearest", "nearest-exact", "area") and (mode not in _LINEAR or arguments.get("align_corners")):
        why = f"interpolates ({mode}, align_corners={arguments.get('align_corners')}) reading past the map's border"
        return broken(_break(node, analysis, BreakKind.PADDING, why))
    return _subsampler(node, analysis)


_LINEAR = ("linear", "bilinear", "trilinear")


def _subsampler(node: fx.Node, analysis: Analysis) -> Value:
    """A subsampling by the op's stride along its axes (``fxblur.analysis.subsampling``), at its aligned phase or a
    fixed one; its axes must be the map's spatial axes and their sizes multiples of the stride."""
    op = read_subsampling(node, analysis.graph_module)
    value, size = analysis.values[op.input], _shape(op.input)
    rank = len(size)
    axes = tuple(range(2, rank)) if op.axes is None else tuple(a % rank for a in op.axes)
    stride = op.stride * len(axes) if op.axes is None else op.stride
    if sorted(p for p in value.positions if p is not None) != sorted(axes):
        return broken(_break(node, analysis, BreakKind.LAYOUT, "subsamples axes that are not the map's spatial axes"))
    by_position = dict(zip(axes, stride, strict=True))
    per_axis = tuple(by_position.get(p, 1) for p in value.positions)
    if any(p is not None and size[p] % by_position[p] for p in value.positions):
        return broken(_break(node, analysis, BreakKind.SIZE, "subsamples an axis by a factor that does not divide it"))
    return _subsample(node, analysis, value, per_axis)


def _phase_along(node: fx.Node, analysis: Analysis) -> Value:
    """``phase_along(x, axes, stride)``: ``phase_of`` on ``x``'s ``axes``; along its other spatial axes, stride 1."""
    source, axes, stride = node.args[:3]
    value, rank = analysis.values[source], _rank(source)
    axes = tuple(range(2, rank)) if axes is None else tuple(a % rank for a in axes)
    stride = [stride] if isinstance(stride, int) else list(stride)
    stride = stride * len(axes) if len(stride) == 1 else stride
    if value.kind is not Kind.SHIFTS or not set(axes) <= {p for p in value.positions if p is not None}:
        return broken(_break(node, analysis, BreakKind.LAYOUT, "chooses a phase on axes that are not the map's"))
    if any(_shape(source)[a] % s for a, s in zip(axes, stride, strict=True)):
        return broken(_break(node, analysis, BreakKind.SIZE, "samples a map by a stride that does not divide it"))
    stride_of = dict(zip(axes, stride, strict=True))
    stride = tuple(stride_of.get(p, 1) for p in value.positions)
    scale = tuple(axis.scale for axis in value.axes)
    return Value(Kind.PHASE, phase=Phase(node.name, stride, scale, value.phases))


def _roll_along(node: fx.Node, analysis: Analysis) -> Value:
    """``roll_along(x, axes, phase)``: ``x`` aligned to the phase, as ``roll_to_phase`` does on the last axes."""
    value, phase = analysis.values[node.args[0]], analysis.values[node.args[2]]
    problem = _phase_problem(value, phase)
    if problem:
        return broken(_break(node, analysis, BreakKind.MISALIGNED, problem))
    return replace(value, aligned=phase.phase)


# -- padding --------------------------------------------------------------------------------


def _pad_window(node: fx.Node, analysis: Analysis) -> Value:
    """``pad_window_circularly(x, kernel, stride, padding, ...)``: the map padded circularly for the op reading it."""
    return _padded(node, analysis, node.args[0], list(node.args[3]))


def _circular_pad(node: fx.Node, analysis: Analysis) -> Value:
    """``circular_pad(x, flat)`` (fxblur's, any amount): as ``F.pad(mode="circular")``."""
    return _pad_by(node, analysis, node.args[1], None)


def _pad_same(node: fx.Node, analysis: Analysis) -> Value:
    """``pad_same_circularly(x, kernel, stride, dilation, ...)``: the map padded circularly for the op reading it."""
    size = _shape(node.args[0])
    if size is None:
        return broken(_break(node, analysis, BreakKind.UNKNOWN, "its input has no shape"))
    kernel, stride, dilation, at_stride_one = node.args[1:5]
    sizes = size[len(size) - len(kernel) :]
    geometry = zip(sizes, kernel, stride, dilation, strict=True)
    before = [same_padding(n, k, s, d, at_stride_one)[0] for n, k, s, d in geometry]
    return _padded(node, analysis, node.args[0], before)


def _pad(node: fx.Node, analysis: Analysis) -> Value:
    """``F.pad``: circular padding pads the map for a window op; any other mode, on a spatial axis, breaks."""
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    flat = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    return _pad_by(node, analysis, flat, f"F.pad(mode={mode!r})" if mode != "circular" else None)


def _padding_layer(node: fx.Node, analysis: Analysis) -> Value:
    """A padding layer (``nn.ZeroPad2d``, ``nn.CircularPad2d``): as ``F.pad`` in its mode."""
    layer = analysis.graph_module.get_submodule(node.target)
    circular = isinstance(layer, (CircularPad, *CIRCULAR_PADDING_LAYERS))
    return _pad_by(node, analysis, layer.padding, None if circular else type(layer).__name__)


def _pad_by(node: fx.Node, analysis: Analysis, flat: Any, other: str | None) -> Value:
    """``node``'s input padded by ``flat`` (``F.pad``'s order): circularly, or as ``other`` says (then it breaks)."""
    if not isinstance(flat, (tuple, list)) or any(isinstance(p, fx.Node) for p in flat):
        return broken(_break(node, analysis, BreakKind.UNKNOWN, "pads by amounts computed at run time"))
    before = [flat[i] for i in range(0, len(flat), 2)][::-1]  # F.pad: the last axis first
    source = node.args[0]
    if other is not None:
        rank = _rank(source)
        padded_axes = {rank - 1 - i // 2 for i, amount in enumerate(flat) if amount}
        if padded_axes & {p for p in analysis.values[source].positions if p is not None}:
            return broken(_break(node, analysis, BreakKind.PADDING, f"pads a spatial axis with {other}"))
        return analysis.values[source]
    return _padded(node, analysis, source, before)


def _padded(node: fx.Node, analysis: Analysis, source: fx.Node, before: list[int]) -> Value:
    """``source``'s map padded circularly, ``before[j]`` samples first along the ``j``-th of its last axes."""
    value, size_in, size_out = analysis.values[source], _shape(source), _shape(node)
    if size_in is None or size_out is None:
        return broken(_break(node, analysis, BreakKind.UNKNOWN, "its input or output has no shape"))
    if value.padding is not None:
        return broken(_break(node, analysis, BreakKind.PADDING, "pads a map that is padded already"))
    rank, dims = len(size_in), len(before)
    padding = []
    for position in value.positions:
        if position is None or position < rank - dims:
            return broken(_break(node, analysis, BreakKind.LAYOUT, "pads axes that are not the input's spatial axes"))
        first = before[position - (rank - dims)]
        padding.append((first, size_out[position] - size_in[position] - first))
    return replace(value, padding=tuple(padding))


def _pad_for_ceil_mode(node: fx.Node, analysis: Analysis) -> Value:
    """``-inf`` samples appended for ceil-mode windows at stride 1: not circular, where it adds any."""
    if _shape(node.args[0]) == _shape(node):
        return analysis.values[node.args[0]]
    return broken(_break(node, analysis, BreakKind.PADDING, "pads its ceil-mode windows with -inf"))


# -- polyphase --------------------------------------------------------------------------------


def _phase_of(node: fx.Node, analysis: Analysis) -> Value:
    """``phase_of(x, stride)``: a phase chosen on ``x``'s map, which must follow the shifts, by a stride dividing it."""
    source, stride = node.args[0], tuple(node.args[1])
    value = analysis.values[source]
    problem = _map_problem(source, value, stride)
    if problem:
        return broken(_break(node, analysis, problem[0], problem[1]))
    scale = tuple(axis.scale for axis in value.axes)
    return Value(Kind.PHASE, phase=Phase(node.name, stride, scale, value.phases))


def _map_problem(source: fx.Node, value: Value, stride: tuple[int, ...]) -> tuple[BreakKind, str] | None:
    """Why a polyphase op cannot act on ``value``'s map with ``stride``, or ``None``."""
    size = _shape(source)
    if value.kind is not Kind.SHIFTS or value.invariant or size is None:
        return BreakKind.LAYOUT, "chooses a phase on a value without spatial axes"
    rank, dims = len(size), len(stride)
    if value.positions != tuple(range(rank - dims, rank)) or value.padding is not None:
        return BreakKind.LAYOUT, "chooses a phase on axes that are not the map's spatial axes"
    sizes = size[rank - dims :]
    if any(n % s for n, s in zip(sizes, stride, strict=True)):
        size_text, stride_text = "x".join(map(str, sizes)), "x".join(map(str, stride))
        return BreakKind.SIZE, f"samples a map of {size_text} by {stride_text}, which does not divide it"
    return None


def _roll_to_phase(node: fx.Node, analysis: Analysis) -> Value:
    """``roll_to_phase(x, phase)``: ``x`` aligned to the phase, if its map lines up with the one it was chosen on."""
    value, phase = analysis.values[node.args[0]], analysis.values[node.args[1]]
    problem = _phase_problem(value, phase)
    if problem:
        return broken(_break(node, analysis, BreakKind.MISALIGNED, problem))
    return replace(value, aligned=phase.phase)


def _select_phase(node: fx.Node, analysis: Analysis) -> Value:
    """``select_phase(x, phase, stride)``: ``x`` subsampled at the phase (polyphase sampling after the op)."""
    source, stride = node.args[0], tuple(node.args[2])
    value, phase = analysis.values[source], analysis.values[node.args[1]]
    problem = _phase_problem(value, phase)
    if problem:
        return broken(_break(node, analysis, BreakKind.MISALIGNED, problem))
    size_problem = _map_problem(source, value, stride)
    if size_problem:
        return broken(_break(node, analysis, size_problem[0], size_problem[1]))
    return _subsample(node, analysis, replace(value, aligned=phase.phase), stride)


def _phase_problem(value: Value, phase: Value) -> str:
    if phase.kind is not Kind.PHASE:
        return "moves a map by something that is not a phase fxblur chose"
    if value.kind is not Kind.SHIFTS or value.invariant or value.aligned is not None:
        return "moves a value that is not a map following the shifts"
    chosen = phase.phase
    if tuple(axis.scale for axis in value.axes) != chosen.scale or value.phases != chosen.before:
        return f"moves a map by a phase chosen on one that does not line up with it ({chosen.node})"
    return ""


# -- reductions -----------------------------------------------------------------------------


def _reduce(node: fx.Node, analysis: Analysis) -> Value:
    """Means, sums and maxima: over every spatial axis they make the value invariant along it."""
    source = node.args[0]
    size = _shape(source)
    if size is None:
        return broken(_break(node, analysis, BreakKind.UNKNOWN, "its input has no shape"))
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    reduced = set(range(len(size))) if dims is None else {d % len(size) for d in _as_tuple(dims)}
    value = _reduced(node, analysis, analysis.values[source], reduced, bool(keepdim))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in ("max", "min") and dims is not None:  # (values, indices): where the extremum is moves with the map
        where = broken(_break(node, analysis, BreakKind.LAYOUT, "takes the position of an extremum"))
        return Value(
            Kind.ITEMS, items=(value, value if value.invariant and not reduced & set(value.positions) else where)
        )
    return value


def _reduced(node: fx.Node, analysis: Analysis, value: Value, reduced: set[int], keepdim: bool) -> Value:
    if value.padding is not None:
        return broken(_break(node, analysis, BreakKind.PADDING, "reduces a padded map"))
    positions = []
    for p in value.positions:
        if p is None or p in reduced:
            positions.append(None)
        else:
            positions.append(p if keepdim else p - sum(1 for d in reduced if d < p))
    moved = value.moved(positions)
    return replace(moved, aligned=None) if moved.invariant else moved


def _adaptive_pool(node: fx.Node, analysis: Analysis) -> Value:
    """An adaptive pool to one value per axis reduces it; to its input's size it changes nothing; else it breaks."""
    source = node.args[0]
    size_in, size_out = _shape(source), _shape(node)
    if size_in is None or size_out is None:
        return broken(_break(node, analysis, BreakKind.UNKNOWN, "its input has no shape"))
    value = analysis.values[source]
    reduced = set()
    for p in value.positions:
        if p is not None and size_out[p] == 1:
            reduced.add(p)
        elif p is not None and size_out[p] != size_in[p]:
            grid = "x".join(str(n) for n in size_out[2:])
            return broken(
                _break(node, analysis, BreakKind.LOCAL_POOL, f"pools to {grid}, not to one value per channel")
            )
    return _reduced(node, analysis, value, reduced, keepdim=True)


# -- layout ---------------------------------------------------------------------------------


def _permute(node: fx.Node, analysis: Analysis) -> Value:
    """``permute``/``transpose``/``swapaxes``/``movedim``: the spatial axes go where their dims go."""
    source = node.args[0]
    order = _permutation(node, _rank(source))
    if order is None:
        return broken(
            _break(node, analysis, BreakKind.UNKNOWN, f"no equivariance rule for {_describe(node, analysis)}")
        )
    value = analysis.values[source]
    return value.moved(None if p is None else order.index(p) for p in value.positions)


def _permutation(node: fx.Node, rank: int) -> list[int] | None:
    """The input dim each output dim takes, for a permuting op on ``rank`` dims."""
    name = _name(node)
    args = list(node.args[1:])
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return [d % rank for d in node.kwargs.get("dims", dims)]
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = [*args, node.kwargs.get("dim0"), node.kwargs.get("dim1")][:2]
        order = list(range(rank))
        order[a % rank], order[b % rank] = order[b % rank], order[a % rank]
        return order
    if name in ("movedim", "moveaxis"):
        sources = [s % rank for s in _as_tuple(args[0])]
        destinations = [d % rank for d in _as_tuple(args[1])]
        rest = iter(d for d in range(rank) if d not in sources)
        chosen = dict(zip(destinations, sources, strict=True))
        return [chosen[d] if d in chosen else next(rest) for d in range(rank)]
    return None


def _reshape(node: fx.Node, analysis: Analysis) -> Value:
    """``view``/``reshape``/``flatten``/``(un)squeeze``/``expand``: every spatial axis must stay a dim of its own,
    neither merged with another dim nor split."""
    source = node.args[0]
    size_in, size_out = _shape(source), _shape(node)
    if size_in is None or size_out is None:
        return broken(_break(node, analysis, BreakKind.UNKNOWN, "its input or output has no shape"))
    mapping = _kept_dims(size_in, size_out)
    if _name(node) in ("expand", "expand_as", "broadcast_to"):
        shift = len(size_out) - len(size_in)
        mapping = {d: d + shift for d in range(len(size_in)) if size_in[d] == size_out[d + shift]}
    value = analysis.values[source]
    if any(p is not None and p not in mapping for p in value.positions):
        return broken(_break(node, analysis, BreakKind.LAYOUT, "flattens or reshapes a spatial axis with another dim"))
    return value.moved(None if p is None else mapping[p] for p in value.positions)


def _kept_dims(size_in: tuple[int, ...], size_out: tuple[int, ...]) -> dict[int, int]:
    """The dims of ``size_in`` that a reshape to ``size_out`` keeps whole: ``{in dim: out dim}``.

    Example:
        >>> _kept_dims((2, 8, 4, 4), (2, 8, 16)), _kept_dims((2, 8, 1, 1), (2, 8))
        ({0: 0, 1: 1}, {0: 0, 1: 1})
    """
    mapping: dict[int, int] = {}
    i = j = 0
    while i < len(size_in) and j < len(size_out):
        if size_in[i] == size_out[j]:
            mapping[i] = j
            i, j = i + 1, j + 1
        elif size_in[i] == 1:
            i += 1
        elif size_out[j] == 1:
            j += 1
        else:  # dims merged or split: none of them is kept
            product_in, product_out = size_in[i], size_out[j]
            i, j = i + 1, j + 1
            while product_in != product_out and (i < len(size_in) or j < len(size_out)):
                if product_in < product_out and i < len(size_in):
                    product_in, i = product_in * size_in[i], i + 1
                elif j < len(size_out):
                    product_out, j = product_out * size_out[j], j + 1
                else:
                    break
    return mapping


# -- indexing, joins ---------------------------------------------------------------------------


def _index(node: fx.Node, analysis: Analysis) -> Value:
    """Indexing a tensor: a full slice keeps an axis and a step subsamples it (a strided op); any other index of a
    spatial axis (a crop, one position) breaks."""
    source, index = node.args[0], node.args[1]
    value, size = analysis.values[source], _shape(source)
    if size is None:
        return broken(_break(node, analysis, BreakKind.UNKNOWN, "indexes a value without a shape"))
    entries = _index_entries(index, len(size))
    if entries is None:
        return broken(_break(node, analysis, BreakKind.LAYOUT, "indexes by values computed at run time"))
    kept: dict[int, tuple[int, int]] = {}  # input dim -> (output dim, step)
    out = 0
    for dim, entry in entries:
        if dim is None:  # None: a new axis
            out += 1
            continue
        if isinstance(entry, slice):
            start, step = entry.start or 0, entry.step or 1
            whole = entry.stop is None or entry.stop >= size[dim]
            if whole and 0 <= start < step:
                kept[dim] = (out, step)
            out += 1
    positions, stride = [], []
    for p in value.positions:
        if p is not None and p not in kept:
            entry = dict(entries).get(p)
            why = "takes one position of a spatial axis" if isinstance(entry, int) else "crops a spatial axis"
            return broken(_break(node, analysis, BreakKind.LAYOUT, why))
        positions.append(None if p is None else kept[p][0])
        stride.append(1 if p is None else kept[p][1])
    moved = value.moved(positions)
    if all(s == 1 for s in stride):
        return moved
    if any(p is not None and size[p] % s for p, s in zip(value.positions, stride, strict=True)):
        return broken(_break(node, analysis, BreakKind.SIZE, "subsamples an axis by a step that does not divide it"))
    return _subsample(node, analysis, moved, tuple(stride))


def _index_entries(index: Any, rank: int) -> list[tuple[int | None, Any]] | None:
    """``(input dim or None for a new axis, entry)`` for each entry of a basic index, ``...`` expanded."""
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(e, fx.Node) or (isinstance(e, slice) and any(isinstance(v, fx.Node)
           for v in (e.start, e.stop, e.step))) for e in entries):  # fmt: skip
        return None
    if not all(e is None or e is Ellipsis or isinstance(e, (int, slice)) for e in entries):
        return None
    explicit = sum(1 for e in entries if e is not None and e is not Ellipsis)
    if Ellipsis in entries:
        at = entries.index(Ellipsis)
        entries = entries[:at] + [slice(None)] * (rank - explicit) + entries[at + 1 :]
    entries += [slice(None)] * (rank - sum(1 for e in entries if e is not None))
    found, dim = [], 0
    for entry in entries:
        found.append((None, None) if entry is None else (dim, entry))
        dim += entry is not None
    return found


def _cat(node: fx.Node, analysis: Analysis) -> Value:
    """``cat``/``stack`` along a non-spatial axis join their operands as a pointwise op does."""
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    rank = _rank(node)
    stack = _name(node) == "stack"
    dim %= rank
    operands = tensors if isinstance(tensors, (tuple, list)) else [tensors]
    values = [leaf for t in operands if isinstance(t, fx.Node) for leaf in _flat(analysis.values[t])]
    shifting = [v if not stack else v.moved(None if p is None else p + (p >= dim) for p in v.positions)
                for v in values if v.kind is Kind.SHIFTS]  # fmt: skip
    following = [v for v in shifting if not v.invariant]
    if any(dim in v.positions for v in following):
        return broken(_break(node, analysis, BreakKind.LAYOUT, "concatenates along a spatial axis"))
    for other in following[1:]:
        problem = _disagreement(following[0], other)
        if problem:
            return broken(_break(node, analysis, BreakKind.MISALIGNED, problem))
    return _joined(following[0], shifting)


def _split(node: fx.Node, analysis: Analysis) -> Value:
    """``split``/``chunk``/``tensor_split``/``unbind`` along a non-spatial axis: each piece keeps the value."""
    source = node.args[0]
    value, rank = analysis.values[source], _rank(source)
    unbind = _name(node) == "unbind"
    position = 1 if unbind else 2
    dim = node.kwargs.get("dim", node.args[position] if len(node.args) > position else 0) % max(rank, 1)
    if dim in value.positions:
        return broken(_break(node, analysis, BreakKind.LAYOUT, "splits along a spatial axis"))
    piece = value.moved(None if p is None else p - (p > dim) for p in value.positions) if unbind else value
    pieces = node.meta.get("val")
    return Value(Kind.ITEMS, items=(piece,) * (len(pieces) if isinstance(pieces, (tuple, list)) else 1))


# -- linear ops, norms, the rest ----------------------------------------------------------------


def _linear(node: fx.Node, analysis: Analysis) -> Value:
    """A linear layer mixes the last axis at each position: it keeps the axes unless the last one is spatial."""
    source = node.args[0]
    value = analysis.values[source]
    if _rank(source) - 1 in value.positions:
        return broken(_break(node, analysis, BreakKind.LAYOUT, "a linear layer over a spatial axis"))
    return value


def _matmul(node: fx.Node, analysis: Analysis) -> Value:
    """A matrix product over non-spatial axes (the spatial axes are batch dims) keeps the axes."""
    operands = [arg for arg in node.args[:2] if isinstance(arg, fx.Node)]
    for operand in operands:
        value, rank = analysis.values[operand], _rank(operand)
        if value.kind is Kind.SHIFTS and {rank - 1, rank - 2} & set(value.positions):
            return broken(_break(node, analysis, BreakKind.LAYOUT, "a matrix product over a spatial axis"))
    return _combine(node, analysis, operands, _rank(node))


def _norm(node: fx.Node, analysis: Analysis) -> Value:
    """Batch, group and instance norms: a per-channel affine map after statistics over whole axes."""
    source = node.args[0] if node.args else node.kwargs["input"]
    value = analysis.values[source]
    if 1 in value.positions:
        return broken(_break(node, analysis, BreakKind.LAYOUT, "normalises over channels that are a spatial axis"))
    return value


def _layer_norm(node: fx.Node, analysis: Analysis) -> Value:
    """A layer norm over the last dims: statistics over whole axes; a weight over a spatial axis varies over space."""
    source = node.args[0]
    value, rank = analysis.values[source], _rank(source)
    if node.op == "call_module":
        module = analysis.graph_module.get_submodule(node.target)
        normalized, affine = len(module.normalized_shape), module.weight is not None
    else:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        normalized, affine = len(_as_tuple(shape)), weight is not None
    if affine and any(p is not None and p >= rank - normalized for p in value.positions):
        return broken(_break(node, analysis, BreakKind.POSITIONAL, "its weight varies over a spatial axis"))
    return value


def _along_any_axis(node: fx.Node, analysis: Analysis) -> Value:
    """Softmax, and dropout when not training: every position treated alike, along any axis."""
    return analysis.values[node.args[0]]


def _stochastic_depth(node: fx.Node, analysis: Analysis) -> Value:
    """torchvision's stochastic depth: the identity when not training, random otherwise."""
    training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
    if training is False:
        return analysis.values[node.args[0]]
    return broken(_break(node, analysis, BreakKind.UNKNOWN, "drops samples at random (it is training)"))


def _torch_module(node: fx.Node, analysis: Analysis) -> Value:
    """An activation, dropout or identity module of torch.nn (not a subclass with a forward of its own)."""
    module = analysis.graph_module.get_submodule(node.target)
    if type(module).forward.__module__.startswith("torch.nn."):
        return pointwise(node, analysis)
    return broken(_break(node, analysis, BreakKind.UNKNOWN, f"{type(module).__name__} has a forward of its own"))


# -- helpers ----------------------------------------------------------------------------------


def _shape(node: Any) -> tuple[int, ...] | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _rank(node: Any) -> int:
    shape = _shape(node)
    return 0 if shape is None else len(shape)


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", "")


def _describe(node: fx.Node, analysis: Analysis) -> str:
    if node.op == "call_module":
        return type(analysis.graph_module.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    module = getattr(node.target, "__module__", "") or ""
    return f"{module}.{getattr(node.target, '__name__', str(node.target))}".lstrip(".")


def _break(node: fx.Node, analysis: Analysis, kind: BreakKind, reason: str) -> Break:
    where = str(node.meta.get(SITE) or _serving(node) or (node.target if node.op == "call_module" else node.name))
    op = read_window_op(node, analysis.graph_module)
    label = op.op if op is not None else _describe(node, analysis).rpartition(".")[2]
    line = node.meta.get(LINE)
    return Break(node.name, f"{where} ({label})" if label and label != where else where, kind, reason,
                 "" if line is None else f"{line[0]}:{line[1]}")  # fmt: skip


def _serving(node: fx.Node) -> str | None:
    """For a node a pass added (a phase, a padding), the site of the op it serves: the first one its uses reach."""
    frontier, seen = list(node.users), set()
    while frontier:
        user = frontier.pop(0)
        if user in seen:
            continue
        seen.add(user)
        if SITE in user.meta:
            return user.meta[SITE]
        frontier += list(user.users)
    return None


_MODULE_RULES: list[tuple[type | tuple[type, ...], Rule]] = [
    (BlurredOp, _blurred_op),
    (Blur, _blur),
    ((CONV_BASE, MAX_POOL_BASE, AVG_POOL_BASE, LP_POOL_BASE), window),
    (_ADAPTIVE, _adaptive_pool),
    (nn.PixelUnshuffle, _space_to_depth),
    ((CircularPad, *CIRCULAR_PADDING_LAYERS, *OTHER_PADDING_LAYERS), _padding_layer),
    (nn.Upsample, _interpolate),
    (nn.Linear, _linear),
    (nn.LayerNorm, _layer_norm),
    (_NORM_MODULES, _norm),
    (nn.Flatten, _reshape),
    ((nn.Softmax, nn.LogSoftmax), _along_any_axis),
    (POINTWISE_MODULES, _torch_module),
]

_FUNCTION_RULES: dict[Callable, Rule] = {
    getattr: _constant,
    len: _constant,
    torch._assert: _constant,
    operator.eq: _constant,
    operator.getitem: _index,
    phase_of: _phase_of,
    roll_to_phase: _roll_to_phase,
    select_phase: _select_phase,
    pad_window_circularly: _pad_window,
    pad_same_circularly: _pad_same,
    pad_for_ceil_mode: _pad_for_ceil_mode,
    max_pool_stride_one: _max_pool_stride_one,
    F.pad: _pad,
    circular_pad: _circular_pad,
    F.pixel_unshuffle: _space_to_depth,
    torch.pixel_unshuffle: _space_to_depth,
    F.interpolate: _interpolate,
    blur_along: _blur_along,
    phase_along: _phase_along,
    roll_along: _roll_along,
    torch.flatten: _reshape,
    torch.reshape: _reshape,
    torch.squeeze: _reshape,
    torch.unsqueeze: _reshape,
    torch.permute: _permute,
    torch.transpose: _permute,
    torch.swapaxes: _permute,
    torch.movedim: _permute,
    torch.cat: _cat,
    torch.concat: _cat,
    torch.stack: _cat,
    torch.chunk: _split,
    torch.split: _split,
    torch.tensor_split: _split,
    torch.unbind: _split,
    F.linear: _linear,
    torch.matmul: _matmul,
    operator.matmul: _matmul,
    torch.bmm: _matmul,
    F.layer_norm: _layer_norm,
    F.batch_norm: _norm,
    F.group_norm: _norm,
    F.instance_norm: _norm,
    F.softmax: _along_any_axis,
    F.log_softmax: _along_any_axis,
    torch.softmax: _along_any_axis,
    stochastic_depth: _stochastic_depth,
    **dict.fromkeys(_ADAPTIVE_FUNCTIONS, _adaptive_pool),
    **dict.fromkeys(_REDUCTIONS, _reduce),
}

_METHOD_RULES: dict[str, Rule] = {
    **dict.fromkeys(_SIZE_METHODS, _constant),
    **dict.fromkeys(_REDUCTION_METHODS, _reduce),
    **dict.fromkeys(
        ("flatten", "view", "reshape", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as"), _reshape
    ),
    **dict.fromkeys(("permute", "transpose", "swapaxes", "movedim"), _permute),
    **dict.fromkeys(("chunk", "split", "unbind", "tensor_split"), _split),
    **dict.fromkeys(("softmax", "log_softmax"), _along_any_axis),
}
