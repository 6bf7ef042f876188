"""Shift equivariance inferred over the graph, node by node, the way shapes are propagated.

Every value a graph computes is described by how it moves when the model's input is rolled
circularly along its spatial axes (``Value``); each op's rule (``fxblur.analysis.rules``)
derives its output's description from its inputs'. A value is

- ``CONSTANT``: it does not depend on the input (weights, buffers, sizes);
- ``SHIFTS``: it follows the input's shifts. For each spatial axis of the input, an
  ``Axis`` says which of the value's tensor axes carries it (``None`` once it is reduced
  away: the value is *invariant* along it), how many input samples one of its samples
  stands for (``scale``), and the shifts it follows exactly: multiples of ``lattice``.
  Fixed-phase subsampling coarsens the lattice (a stride-2 op follows only even shifts);
  polyphase sampling keeps it, at the price of a per-sample shift that the value carries
  in ``phases`` (the choices it depends on, outermost first);
- ``PHASE``: a phase chosen by ``fxblur.ops.polyphase.phase_of``;
- ``BROKEN``: some op on its way breaks equivariance; ``breaks`` names the first such node
  on every path (module path, source line, why);
- ``ITEMS``: a tuple of values (``split``, a module returning several tensors).

The model's output is then *exactly invariant* to circular shifts when every output value
is invariant along every axis with lattice 1, and *exactly equivariant* (``f(roll x) =
roll f(x)``) when it keeps every axis at scale 1, with lattice 1 and no phase left. The
analysis needs the shapes of one input (it runs the graph on fake tensors first): what it
proves holds for inputs of that size, for every circular shift. Unknown ops are never
assumed safe: a value that depends on the input and meets an op without a rule is broken
there.

Arithmetic is taken as exact: the polyphase choice is an argmax, and how the rewrite keeps
near-ties following the shift is in ``fxblur.ops.polyphase``.

Example:
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"), nn.AdaptiveAvgPool2d(1))
    >>> analyse(fx.symbolic_trace(model), torch.empty(1, 3, 16, 16)).exact
    True
    >>> verdict = analyse(fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten())),
    ...                   torch.empty(1, 3, 16, 16))
    >>> print(verdict.line())
    not exact at 1x3x16x16: 0 (conv2d): pads with zeros
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch import nn

from fxblur._compat import CONV_BASE
from fxblur.costs import propagate_shapes


class Kind(enum.Enum):
    CONSTANT = "constant"
    SHIFTS = "shifts"
    PHASE = "phase"
    BROKEN = "broken"
    ITEMS = "items"


class BreakKind(str, enum.Enum):
    """Why an op breaks equivariance (or, for ``FIXED_PHASE``, coarsens the shifts it holds for)."""

    PADDING = "padding"  # pads with zeros, -inf or by reflection, or wraps a map around more than once
    SIZE = "size"  # changes a map's size (crops, grows), or its size is not a multiple of its stride
    POSITIONAL = "positional"  # combines a map with a tensor that varies over space (a positional embedding)
    LAYOUT = "layout"  # flattens, reshapes, indexes or concatenates along a spatial axis
    LOCAL_POOL = "local_pool"  # pools to a grid, not to one value per channel
    MISALIGNED = "misaligned"  # joins maps that do not line up (other phases, resolutions or axes)
    UNKNOWN = "unknown"  # an op without a rule, or a module whose code fxblur does not see
    UPSAMPLING = "upsampling"  # places samples on a fixed grid: the phases chosen before it are lost
    FIXED_PHASE = "fixed_phase"  # subsamples at a fixed phase: the output follows only some shifts

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Break:
    """A node that breaks equivariance: which, where in the model, and why."""

    node: str
    where: str
    kind: BreakKind
    reason: str
    line: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" + (f" ({self.line})" if self.line else "")


@dataclass(frozen=True)
class Axis:
    """How a value carries one spatial axis of the input (see the module docstring)."""

    position: int | None
    scale: int = 1
    lattice: int = 1


@dataclass(frozen=True)
class Phase:
    """A polyphase choice: the ``phase_of`` node, its stride per spatial axis, and the map it was chosen on."""

    node: str
    stride: tuple[int, ...]
    scale: tuple[int, ...]
    before: tuple[Phase, ...] = ()


@dataclass(frozen=True)
class Value:
    """What the analysis knows of one value the graph computes (see the module docstring).

    ``aligned``: the value was rolled to this phase and waits for a subsampling by its
    stride (which then keeps the phase). ``padding``: the value is its map padded
    circularly by (before, after) samples along each spatial axis of the input, for the
    window op that reads it. ``fixed``: the fixed-phase subsamplings that coarsened the lattice.
    """

    kind: Kind
    axes: tuple[Axis, ...] = ()
    phases: tuple[Phase, ...] = ()
    aligned: Phase | None = None
    padding: tuple[tuple[int, int], ...] | None = None
    breaks: tuple[Break, ...] = ()
    fixed: tuple[Break, ...] = ()
    items: tuple[Value, ...] = ()
    phase: Phase | None = None

    @property
    def invariant(self) -> bool:
        return self.kind is Kind.SHIFTS and all(axis.position is None for axis in self.axes)

    @property
    def positions(self) -> tuple[int | None, ...]:
        return tuple(axis.position for axis in self.axes)

    def moved(self, positions: Iterable[int | None]) -> Value:
        """The same value with its spatial axes at ``positions``."""
        axes = tuple(replace(axis, position=p) for axis, p in zip(self.axes, positions, strict=True))
        return replace(self, axes=axes)


CONSTANT = Value(Kind.CONSTANT)


def broken(*breaks: Break) -> Value:
    return Value(Kind.BROKEN, breaks=_unique(breaks))


def _unique(breaks: Iterable[Break]) -> tuple[Break, ...]:
    return tuple(dict.fromkeys(breaks))


@dataclass(frozen=True)
class OutputVerdict:
    """One output tensor of the model: what it is, and the shifts it follows exactly."""

    path: str
    kind: str  # "invariant", "equivariant", or "neither"
    lattice: tuple[int, ...] = ()  # it follows input shifts by multiples of these, per spatial axis
    scale: tuple[int, ...] = ()  # input samples per output sample (1 for an invariant output)
    phases: bool = False  # it still depends on polyphase choices (a map not pooled or brought back)


@dataclass(frozen=True)
class Verdict:
    """What the analysis proved of a model at one input shape.

    Attributes:
        input_shape: the input the analysis ran on.
        outputs: one ``OutputVerdict`` per output tensor.
        breaks: the first node breaking equivariance on every path to an output.
        fixed: the fixed-phase subsamplings that keep an output from following every shift.
        error: why the graph could not be analysed at this shape (it does not run on it), or ``""``.
    """

    input_shape: tuple[int, ...]
    outputs: tuple[OutputVerdict, ...] = ()
    breaks: tuple[Break, ...] = ()
    fixed: tuple[Break, ...] = ()
    error: str = ""

    @property
    def exact(self) -> bool:
        """Every output exactly invariant, or exactly equivariant, to every circular shift of the input."""
        return bool(self.outputs) and not self.error and all(out.kind != "neither" for out in self.outputs)

    @property
    def property_name(self) -> str:
        """``"invariance"`` for a model whose outputs have no spatial axes, else ``"equivariance"``."""
        return "invariance" if all(out.kind == "invariant" for out in self.outputs) else "equivariance"

    def line(self) -> str:
        """One line for the report."""
        size = "x".join(map(str, self.input_shape))
        if self.error:
            return f"not analysed at {size}: {self.error}"
        if self.exact:
            kinds = " and ".join(sorted({out.kind for out in self.outputs}))
            return f"exact at {size}: {kinds} to every circular shift (proved on the graph)"
        if self.breaks:
            return f"not exact at {size}: " + "; ".join(str(b) for b in self.breaks)
        if self.fixed:
            lattice = "x".join(map(str, _lcm_all(out.lattice for out in self.outputs)))
            fixed = ", ".join(dict.fromkeys(b.where for b in self.fixed))
            return (
                f"not exact at {size}: follows only shifts by multiples of {lattice} ({fixed}: fixed-phase subsampling)"
            )
        return (
            f"not exact at {size}: an output is a map that follows shifts only up to the phases chosen on the way "
            "(pool it globally, or bring it back to full resolution)"
        )


def _lcm_all(lattices: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    found: tuple[int, ...] = ()
    for lattice in lattices:
        found = lattice if not found else tuple(math.lcm(a, b) for a, b in zip(found, lattice, strict=False))
    return found


@dataclass
class Analysis:
    """The value of every node of one graph, as the rules derived them."""

    graph_module: fx.GraphModule
    spatial: int
    values: dict[fx.Node, Value] = field(default_factory=dict)


def analyse(graph_module: fx.GraphModule, example: torch.Tensor) -> Verdict:
    """The verdict on ``graph_module`` for inputs shaped like ``example``, its first input (module docstring)."""
    from fxblur.analysis.rules import value_of  # the rules read this module's types

    shape = tuple(example.shape)
    try:
        propagate_shapes(graph_module, example)
    except Exception as error:  # the model does not run at this size
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return Verdict(shape, error=f"it does not run on this input ({reason})")
    analysis = Analysis(graph_module, spatial=max(0, len(shape) - 2))
    for node in graph_module.graph.nodes:
        analysis.values[node] = value_of(node, analysis)
    output = next(node for node in graph_module.graph.nodes if node.op == "output")
    return _verdict(shape, analysis.values[output])


def example_shape(model: nn.Module, size: Sequence[int] = (224,), frames: int = 16) -> tuple[int, ...]:
    """A one-sample input shape for ``model``: its first conv tells the channels and spatial axes.

    ``size`` is H, or H and W; a 3-D model gets ``frames`` frames too (video).

    Example:
        >>> example_shape(nn.Sequential(nn.Conv3d(3, 8, 3)), (64,))
        (1, 3, 16, 64, 64)
    """
    first = next((m for m in model.modules() if isinstance(m, CONV_BASE) and not m.transposed), None)
    channels, dims = (3, 2) if first is None else (first.in_channels, len(first.kernel_size))
    height, width = size[0], size[-1]
    return (1, channels, *{1: (height,), 2: (height, width), 3: (frames, height, width)}[dims])


def example_for(module: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """An empty input of ``shape`` in the dtype and on the device of ``module``'s parameters (``meta`` if they are)."""
    reference = next(module.parameters(), None)
    if reference is None:
        return torch.empty(tuple(shape), device="meta")
    device = "meta" if reference.is_meta else reference.device
    return torch.empty(tuple(shape), dtype=reference.dtype, device=device)


def values_of(graph_module: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, Value]:
    """Every node's value (for passes that act on the analysis, and for inspection)."""
    from fxblur.analysis.rules import value_of

    propagate_shapes(graph_module, example)
    analysis = Analysis(graph_module, spatial=max(0, example.dim() - 2))
    for node in graph_module.graph.nodes:
        analysis.values[node] = value_of(node, analysis)
    return analysis.values


def _verdict(shape: tuple[int, ...], output: Value) -> Verdict:
    leaves = list(_leaves(output, ""))
    outputs, breaks, fixed = [], [], []
    for path, value in leaves:
        breaks += value.breaks
        fixed += value.fixed
        if value.kind is Kind.CONSTANT:
            outputs.append(OutputVerdict(path, "invariant", (1,) * (len(shape) - 2)))
        elif value.kind is Kind.SHIFTS:
            outputs.append(_output(path, value))
    return Verdict(shape, tuple(outputs), _unique(breaks), _unique(fixed))


def _output(path: str, value: Value) -> OutputVerdict:
    lattice = tuple(axis.lattice for axis in value.axes)
    scale = tuple(axis.scale for axis in value.axes)
    exact = all(step == 1 for step in lattice) and value.aligned is None and value.padding is None
    if value.invariant:
        kind = "invariant" if exact else "neither"
    else:
        full = all(axis.position is not None and axis.scale == 1 for axis in value.axes)
        kind = "equivariant" if exact and full and not value.phases else "neither"
    return OutputVerdict(path, kind, lattice, scale, bool(value.phases))


def _leaves(value: Value, path: str) -> Iterable[tuple[str, Value]]:
    if value.kind is Kind.ITEMS:
        for i, item in enumerate(value.items):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path or "output", value
