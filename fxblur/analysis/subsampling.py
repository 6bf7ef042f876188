"""Downsamplers that are not a conv or pool window: one normalised view, as ``window_ops`` gives convs and pools.

- strided slicing: ``x[..., ::2, ::2]``, ``x[:, :, 1::2]``, the four slices of a patch
  merging (``x[..., i::2, j::2, :]`` on a channels-last map): every axis sliced by a step
  above 1, from an offset below it, to its end; a slice of axis 1 alone (``x[:, ::2]``) is an
  NCHW map's channels, not read. A slice names its axes, not the layout: ``x[..., ::2]`` on a
  channels-last map is read as subsampling its last axis, and the equivariance analysis, which
  knows where the spatial axes are, then says the claim fails there;
- space-to-depth: ``F.pixel_unshuffle`` / ``torch.pixel_unshuffle`` / ``nn.PixelUnshuffle``;
- downscaling interpolation: ``F.interpolate`` / ``nn.Upsample`` by a ``scale_factor`` whose
  inverse is a whole number (0.5: by 2), in any mode.

``read_subsampling`` says which axes an op subsamples (negative: counted from the end, as
a channels-last map's are) and by what factor. An op whose geometry depends on values
computed at run time is not recognised.

Example:
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.PixelUnshuffle(2)))
    >>> op = read_subsampling(next(n for n in gm.graph.nodes if n.op == "call_module"), gm)
    >>> op.kind, op.axes, op.stride
    ('space_to_depth', (-2, -1), (2, 2))
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxblur.record import Action, Change
from fxblur.trace.calls import SITE


@dataclass(frozen=True)
class SubsamplingOp:
    """A downsampler that is not a window op, as every pass sees it.

    ``axes`` are the tensor axes it subsamples, from the end (``-2, -1`` for the height and
    width of an NCHW map; ``-3, -2`` for those of a channels-last one), ``stride`` the factor
    along each; ``axes`` is ``None`` for an interpolation by one factor, which subsamples
    every spatial axis of the (N, C, *spatial) map it gets (``stride`` then holds that one
    factor). ``module`` is set for a module call.
    """

    node: fx.Node
    kind: str  # "slice", "space_to_depth" or "interpolate"
    target: str
    axes: tuple[int, ...] | None
    stride: tuple[int, ...]
    module: nn.Module | None = None

    @property
    def op(self) -> str:
        return {"slice": "strided_slice", "space_to_depth": "pixel_unshuffle", "interpolate": "interpolate"}[self.kind]

    @property
    def dims(self) -> int | None:
        """How many axes it subsamples (``None``: every spatial axis, however many there are)."""
        return None if self.axes is None else len(self.axes)

    @property
    def downsamples(self) -> bool:
        return any(s > 1 for s in self.stride)

    @property
    def input(self) -> fx.Node:
        return self.node.args[0] if self.node.args else self.node.kwargs["input"]


def read_subsampling(node: fx.Node, root: nn.Module) -> SubsamplingOp | None:
    """The normalised view of ``node`` if it is one of these downsamplers, else ``None``."""
    target = node.meta.get(SITE, node.target if node.op == "call_module" else node.name)
    if node.op == "call_function" and node.target is operator.getitem:
        return _strided_slice(node, target)
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if isinstance(module, nn.PixelUnshuffle):
            return _space_to_depth(node, target, module.downscale_factor, module)
        if type(module) is nn.Upsample and module.size is None:
            return _interpolation(node, target, module.scale_factor, module)
        return None
    if node.op == "call_function" and node.target in (F.pixel_unshuffle, torch.pixel_unshuffle):
        factor = node.args[1] if len(node.args) > 1 else node.kwargs.get("downscale_factor")
        return _space_to_depth(node, target, factor, None)
    if node.op == "call_function" and node.target is F.interpolate:
        arguments = dict(zip(("input", "size", "scale_factor"), node.args, strict=False)) | node.kwargs
        if arguments.get("size") is not None or arguments.get("antialias"):
            return None  # a size: its factor depends on the input; antialias: a filter of its own
        return _interpolation(node, target, arguments.get("scale_factor"), None)
    return None


def _strided_slice(node: fx.Node, target: str) -> SubsamplingOp | None:
    source, index = node.args
    if not isinstance(source, fx.Node) or not isinstance(index, tuple) or (Ellipsis not in index and len(index) < 2):
        return None  # a tensor index is a tuple (or an Ellipsis): a list sliced by a step is not a map
    if any(isinstance(e, fx.Node) or not (e is Ellipsis or isinstance(e, slice)) for e in index):
        return None
    if any(isinstance(v, fx.Node) for e in index if isinstance(e, slice) for v in (e.start, e.stop, e.step)):
        return None
    if Ellipsis in index:
        after = index[index.index(Ellipsis) + 1 :]
        positions = [i - len(after) for i in range(len(after))]
        entries = list(zip(positions, after, strict=True))
        before = index[: index.index(Ellipsis)]
        if any(e is Ellipsis for e in after) or any(e != slice(None) for e in before):
            return None
    else:
        entries = list(enumerate(index))
    axes, stride = [], []
    for axis, entry in entries:
        start, stop, step = entry.start or 0, entry.stop, entry.step or 1
        if step == 1 and start == 0 and stop is None:
            continue
        if stop is not None or not 0 <= start < step:
            return None  # a crop, not a subsampling
        axes.append(axis)
        stride.append(step)
    if not axes or (any(a >= 0 for a in axes) and any(a < 0 for a in axes)) or 0 in axes or axes == [1]:
        return None  # the batch, or axis 1 alone: an NCHW map's channels
    return SubsamplingOp(node, "slice", target, tuple(axes), tuple(stride))


def _space_to_depth(node: fx.Node, target: str, factor: Any, module: nn.Module | None) -> SubsamplingOp | None:
    if not isinstance(factor, int) or factor < 1:
        return None
    return SubsamplingOp(node, "space_to_depth", target, (-2, -1), (factor, factor), module)


def _interpolation(node: fx.Node, target: str, scale: Any, module: nn.Module | None) -> SubsamplingOp | None:
    scales = tuple(scale) if isinstance(scale, (tuple, list)) else (scale,)
    whole = all(isinstance(s, (int, float)) and 0 < s < 1 and abs(1 / s - round(1 / s)) < 1e-9 for s in scales)
    if not scales or not whole:
        return None
    stride = tuple(round(1 / s) for s in scales)
    axes = None if len(stride) == 1 else tuple(range(-len(stride), 0))  # one factor: every spatial axis
    return SubsamplingOp(node, "interpolate", target, axes, stride, module)


def change_of_subsampling(op: SubsamplingOp, action: Action, reason: str = "", blur: str | None = None,
                          added: tuple[fx.Node, ...] = ()) -> Change:  # fmt: skip
    """The record of what a pass did to ``op`` (see ``fxblur.record.Change``)."""
    return Change(
        target=op.target,
        op=op.op,
        action=action,
        reason=reason,
        kernel_size=(),  # no window: the report leaves the column empty
        stride=op.stride,
        in_channels=None,
        out_channels=None,
        blur=blur,
        node=op.node.name,
        input_node=op.input.name,
        output_node=op.node.name,
        added_nodes=tuple(n.name for n in added),
    )
