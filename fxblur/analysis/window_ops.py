"""One normalised view of every conv and pool node, module call or functional call.

Convs, max pools, average pools and power-average (LP) pools, in 1-D, 2-D and 3-D.

Passes never parse arguments themselves: ``read_window_op`` binds positional and keyword
arguments to parameter names, turns ints into per-axis tuples, resolves ``stride=None``
(and the builtins' ``stride=()``) to the kernel size, and looks up what a module holds.

Example:
    >>> import torch.fx as fx
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.MaxPool2d(3, 2, ceil_mode=True)))
    >>> op = read_window_op(next(n for n in gm.graph.nodes if n.op == "call_module"), gm)
    >>> op.op, op.kernel_size, op.stride, op.ceil_mode, op.downsamples
    ('max_pool2d', (3, 3), (2, 2), True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from fxblur._compat import WITH_INDICES_BUILTINS
from fxblur.record import Action, Change
from fxblur.trace.calls import SITE

_CONV_PARAMETERS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_MAX_POOL_PARAMETERS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_MAX_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
_AVG_POOL_PARAMETERS = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "ceil_mode",
    "count_include_pad",
    "divisor_override",
)
_AVG_POOL_DEFAULTS = {
    "stride": None,
    "padding": 0,
    "ceil_mode": False,
    "count_include_pad": True,
    "divisor_override": None,
}

_LP_POOL_PARAMETERS = ("input", "norm_type", "kernel_size", "stride", "ceil_mode")
_LP_POOL_DEFAULTS = {"stride": None, "ceil_mode": False}


@dataclass(frozen=True)
class _Function:
    kind: str
    dims: int
    parameters: tuple[str, ...]
    defaults: Mapping[str, Any]
    returns_indices: bool = False


def _functions() -> dict[Callable, _Function]:
    table: dict[Callable, _Function] = {}
    for dims in (1, 2, 3):
        conv = _Function("conv", dims, _CONV_PARAMETERS, _CONV_DEFAULTS)
        max_pool = _Function("max_pool", dims, _MAX_POOL_PARAMETERS, _MAX_POOL_DEFAULTS)
        with_indices = _Function("max_pool", dims, _MAX_POOL_PARAMETERS, _MAX_POOL_DEFAULTS, True)
        avg_pool = _Function("avg_pool", dims, _AVG_POOL_PARAMETERS, _AVG_POOL_DEFAULTS)
        table[getattr(F, f"conv{dims}d")] = conv  # torch.convNd is the same builtin
        table[getattr(F, f"max_pool{dims}d")] = max_pool
        table[getattr(torch, f"max_pool{dims}d")] = max_pool
        table[getattr(F, f"max_pool{dims}d_with_indices")] = with_indices
        table[getattr(F, f"avg_pool{dims}d")] = avg_pool
        table[getattr(F, f"lp_pool{dims}d")] = _Function("lp_pool", dims, _LP_POOL_PARAMETERS, _LP_POOL_DEFAULTS)
    for dims, builtin in enumerate(WITH_INDICES_BUILTINS, start=1):
        table[builtin] = table[getattr(F, f"max_pool{dims}d_with_indices")]
    return table


FUNCTIONS = _functions()

MODULES: dict[type[nn.Module], tuple[str, int]] = {
    nn.Conv1d: ("conv", 1),
    nn.Conv2d: ("conv", 2),
    nn.Conv3d: ("conv", 3),
    nn.MaxPool1d: ("max_pool", 1),
    nn.MaxPool2d: ("max_pool", 2),
    nn.MaxPool3d: ("max_pool", 3),
    nn.AvgPool1d: ("avg_pool", 1),
    nn.AvgPool2d: ("avg_pool", 2),
    nn.AvgPool3d: ("avg_pool", 3),
    nn.LPPool1d: ("lp_pool", 1),
    nn.LPPool2d: ("lp_pool", 2),
    nn.LPPool3d: ("lp_pool", 3),
}


@dataclass(frozen=True)
class WindowOp:
    """A conv or pool node as every pass sees it.

    ``target`` names it in reports and ``exclude`` patterns: the module path for a module
    call; for a functional call, its site (``fxblur.trace.calls``: the path of the module
    that made the call and the function's name, ``"Mixed_6a.max_pool2d"``), or the node's
    name in a graph that was not traced by fxblur. ``arguments`` holds a functional call's
    arguments by parameter name; it is empty for module calls, whose ``module`` is set.
    """

    node: fx.Node
    kind: str
    dims: int
    target: str
    kernel_size: tuple[int, ...] | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    ceil_mode: bool = False
    return_indices: bool = False
    in_channels: int | None = None  # unknown for a functional call on a computed weight, or a lazy conv
    out_channels: int | None = None
    module: nn.Module | None = None
    custom_forward: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)

    @property
    def op(self) -> str:
        """``"conv2d"``, ``"max_pool2d"``, ``"avg_pool3d"``, ..."""
        return f"{self.kind}{self.dims}d"

    @property
    def downsamples(self) -> bool:
        return any(s > 1 for s in self.stride)

    @property
    def input(self) -> fx.Node:
        """The node that feeds the op's input tensor."""
        return self.node.args[0] if self.node.args else self.node.kwargs["input"]


def read_window_op(node: fx.Node, root: nn.Module) -> WindowOp | None:
    """The normalised view of ``node`` if it is a conv or pool call, else ``None``.

    ``root`` is the module that owns the graph (module targets and weights are looked up
    in it). Calls whose geometry is not constant are not recognised.
    """
    if node.op == "call_module":
        return _read_module_call(node, root.get_submodule(node.target))
    if node.op == "call_function" and node.target in FUNCTIONS:
        return _read_function_call(node, FUNCTIONS[node.target], root)
    return None


def _read_module_call(node: fx.Node, module: nn.Module) -> WindowOp | None:
    base = base_class(module)
    if base is None:
        return None
    kind, dims = MODULES[base]
    custom_forward = type(module).forward is not base.forward
    common = {
        "kernel_size": expand_to_axes(module.kernel_size, dims),
        "stride": _module_stride(module, dims),
        "dilation": expand_to_axes(getattr(module, "dilation", 1), dims),  # avg and LP pools have none
        "module": module,
    }
    if kind == "conv":
        padding = module.padding
        lazy = isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()
        return WindowOp(
            node,
            kind,
            dims,
            node.target,
            padding=padding if isinstance(padding, str) else expand_to_axes(padding, dims),
            in_channels=None if lazy else module.in_channels,  # a lazy conv learns it on its first call
            out_channels=module.out_channels,
            custom_forward=custom_forward or type(module)._conv_forward is not base._conv_forward,
            **common,
        )
    return WindowOp(
        node,
        kind,
        dims,
        node.target,
        padding=expand_to_axes(getattr(module, "padding", 0), dims),  # LP pools have none
        ceil_mode=bool(module.ceil_mode),
        return_indices=bool(getattr(module, "return_indices", False)),
        custom_forward=custom_forward,
        **common,
    )


def base_class(module: nn.Module) -> type[nn.Module] | None:
    """The torch.nn conv or pool class ``module`` is (``nn.Conv2d`` for timm's ``Conv2dSame``), or ``None``."""
    return next((cls for cls in MODULES if isinstance(module, cls)), None)


def _read_function_call(node: fx.Node, function: _Function, root: nn.Module) -> WindowOp | None:
    if len(node.args) > len(function.parameters) or not set(node.kwargs) <= set(function.parameters):
        return None
    arguments = {**function.defaults, **dict(zip(function.parameters, node.args, strict=False)), **node.kwargs}
    geometry = {k: v for k, v in arguments.items() if k not in ("input", "weight", "bias")}
    if _mentions_a_node(geometry):
        return None
    dims = function.dims
    if function.kind == "conv":
        weight = _constant(arguments["weight"], root)
        kernel_size = tuple(weight.shape[2:]) if weight is not None else None
        padding = arguments["padding"]
        return WindowOp(
            node,
            "conv",
            dims,
            node.meta.get(SITE, node.name),
            kernel_size=kernel_size,
            stride=expand_to_axes(arguments["stride"], dims),
            padding=padding if isinstance(padding, str) else expand_to_axes(padding, dims),
            dilation=expand_to_axes(arguments["dilation"], dims),
            in_channels=None if weight is None else weight.shape[1] * arguments["groups"],
            out_channels=None if weight is None else weight.shape[0],
            arguments=arguments,
        )
    kernel_size = expand_to_axes(arguments["kernel_size"], dims)
    stride = arguments["stride"]
    return WindowOp(
        node,
        function.kind,
        dims,
        node.meta.get(SITE, node.name),
        kernel_size=kernel_size,
        stride=kernel_size if stride is None or stride in ((), []) else expand_to_axes(stride, dims),
        padding=expand_to_axes(arguments.get("padding", 0), dims),
        dilation=expand_to_axes(arguments.get("dilation", 1), dims),
        ceil_mode=bool(arguments["ceil_mode"]),
        return_indices=function.returns_indices or bool(arguments.get("return_indices", False)),
        arguments=arguments,
    )


def _module_stride(module: nn.Module, dims: int) -> tuple[int, ...]:
    """A module's stride per axis; an LP pool's ``stride=None`` is its kernel size."""
    return expand_to_axes(module.kernel_size if module.stride is None else module.stride, dims)


def expand_to_axes(value: int | tuple[int, ...] | list[int], dims: int) -> tuple[int, ...]:
    """A conv or pool argument as one value per spatial axis: ``2`` -> ``(2, 2)`` for ``dims=2``."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return values * dims if len(values) == 1 else values


def _mentions_a_node(value: Any) -> bool:
    nodes: list[fx.Node] = []
    fx.node.map_arg(value, nodes.append)
    return bool(nodes)


def _constant(value: Any, root: nn.Module) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or ``None`` if it is computed at run time."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        owner, _, name = value.target.rpartition(".")
        tensor = getattr(root.get_submodule(owner), name)
        return tensor if isinstance(tensor, torch.Tensor) else None
    return None


def set_call_argument(node: fx.Node, name: str, value: Any) -> None:
    """Set argument ``name`` (not the input) of a functional conv/pool call, where the call passes it."""
    parameters = FUNCTIONS[node.target].parameters
    index = parameters.index(name)
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def change_of(
    op: WindowOp,
    action: Action,
    reason: str = "",
    blur: str | None = None,
    input_node: fx.Node | None = None,
    output_node: fx.Node | None = None,
    added: tuple[fx.Node, ...] = (),
    enlarged: tuple[fx.Node, ...] = (),
    blurred_module: bool = False,
) -> Change:
    """The record of what a pass did to ``op`` (see ``fxblur.record.Change``)."""
    return Change(
        target=op.target,
        op=op.op,
        action=action,
        reason=reason,
        kernel_size=op.kernel_size,
        stride=op.stride,
        in_channels=op.in_channels,
        out_channels=op.out_channels,
        blur=blur,
        node=op.node.name,
        input_node=(input_node or op.input).name,
        output_node=(output_node or op.node).name,
        added_nodes=tuple(n.name for n in added),
        enlarged_nodes=tuple(n.name for n in enlarged),
        blurred_module=blurred_module,
    )


def skipped_module(module: nn.Module, target: str, reason: str) -> Change | None:
    """The record of a strided conv or pool module that no graph calls (it runs inside a leaf module), or ``None``."""
    base = base_class(module)
    if base is None:
        return None
    kind, dims = MODULES[base]
    stride = _module_stride(module, dims)
    if not any(s > 1 for s in stride):
        return None
    return Change(
        target=target,
        op=f"{kind}{dims}d",
        action=Action.SKIPPED,
        reason=reason,
        kernel_size=expand_to_axes(module.kernel_size, dims),
        stride=stride,
        in_channels=getattr(module, "in_channels", None),
        out_channels=getattr(module, "out_channels", None),
        blur=None,
        node="",
        input_node="",
        output_node="",
    )
