"""Blur the downsamplers that are not convs or pools: strided slices, space-to-depth, downscaling interpolation.

``x[..., ::2, ::2]``, ``F.pixel_unshuffle(x, 2)`` and ``F.interpolate(x, scale_factor=0.5)``
subsample as a strided conv does, and alias as much; none of them can run "at stride 1",
so each gets its blur before it (``BLUR_BEFORE``), along the axes it subsamples (a
channels-last map's too), in every placement the options ask for. With polyphase sampling
``PolyphaseSampling`` takes them like the other downsamplers (``fxblur.analysis.subsampling``
reads them; ``replace_subsampling`` turns this on, by default under ``polyphase``).

This is the pass ``docs/architecture.md`` walks through: it reads ops through a view of its
own, decides, and edits only through ``fxblur.passes.edit``.

Example:
    >>> from torch.fx.passes.infra.pass_manager import PassManager
    >>> from fxblur.record import logged
    >>> class Halve(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x[..., ::2, ::2]
    >>> gm = fx.symbolic_trace(Halve())
    >>> PassManager([BlurSubsampling(BlurOptions())])(gm).modified
    True
    >>> [(str(c.action), c.op, c.stride) for c in logged(gm, "decisions")]
    [('blur_before', 'strided_slice', (2, 2))]
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxblur.analysis.subsampling import SubsamplingOp, change_of_subsampling, read_subsampling
from fxblur.ops.along import blur_along, roll_along
from fxblur.ops.blur_module import Blur
from fxblur.ops.polyphase import roll_to_phase, select_phase
from fxblur.options import BlurOptions
from fxblur.passes.context import RewriteContext
from fxblur.passes.edit import insert_before, replace_uses
from fxblur.passes.window_pass import Plan
from fxblur.record import Action, Change, log_decision


class BlurSubsampling(PassBase):
    """Blur every strided slice, space-to-depth and downscaling interpolation before it (module docstring).

    Args:
        options: the rewrite options (the filter, its padding, ``exclude``).
        context: shared by the passes over every graph of one model.
    """

    def __init__(self, options: BlurOptions, context: RewriteContext | None = None) -> None:
        self.options = options
        self.context = context

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        context = self.context or RewriteContext([graph_module])
        modified = False
        for node in list(graph_module.graph.nodes):
            op = read_subsampling(node, graph_module)
            if op is None or not op.downsamples:
                continue
            reason = self.skip_reason(op, graph_module, context)
            if reason:
                log_decision(graph_module, change_of_subsampling(op, Action.SKIPPED, reason))
                continue
            log_decision(graph_module, self.blur_before(graph_module, op, context))
            modified = True
        return PassResult(graph_module, modified)

    def plan(self, op: SubsamplingOp, gm: fx.GraphModule, context: RewriteContext) -> Plan:
        """Skip ``op`` (with the reason), or blur before it: its only placement."""
        reason = self.skip_reason(op, gm, context)
        return Plan(reason=reason) if reason else Plan(Action.BLUR_BEFORE)

    def skip_reason(self, op: SubsamplingOp, gm: fx.GraphModule, context: RewriteContext) -> str:
        """Why ``op`` must be left alone, or ``""``."""
        pattern = self.options.excluded(f"{context.scope}.{op.target}" if context.scope else op.target)
        if pattern is not None:
            return f"excluded by {pattern!r}"
        source = op.input
        if source.op == "call_function" and source.target in (roll_to_phase, select_phase, roll_along):
            return "already subsampled by polyphase sampling"
        if source.op == "call_function" and source.target is blur_along:
            return "already blurred"
        if source.op == "call_module" and isinstance(gm.get_submodule(source.target), Blur):
            return "already blurred"
        return ""

    def blur_before(self, gm: fx.GraphModule, op: SubsamplingOp, context: RewriteContext) -> Change:
        """A stride-1 blur along the op's axes, before it."""
        blurred = blur_node(op, op.input, self.options)
        replace_uses(op.input, blurred, only=[op.node])
        return change_of_subsampling(op, Action.BLUR_BEFORE, added=(blurred,))


def blur_node(op: SubsamplingOp, value: fx.Node, options: BlurOptions) -> fx.Node:
    """``value`` through a stride-1 blur along ``op``'s axes (``fxblur.ops.along.blur_along``), before ``op``.

    A slice names its axes, not the rank of the map it slices (``x[..., ::2]`` may be the width
    of an NCHW map), so the blur is a function of the axes, not a ``Blur`` module of a fixed rank.
    """
    taps = list(options.filter_taps(op.stride))
    filter_size = taps[0] if op.axes is None else taps
    return insert_before(op.node, blur_along, (value, op.axes, filter_size, options.padding_mode))
