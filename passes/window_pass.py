"""The shared shape of every blur pass: find strided ops of one kind, skip or blur each.

A pass walks ``graph.nodes`` once. For every op of its kind that downsamples, it either
logs why it leaves the op alone, or rewrites it in one of these placements (``Action``)
and logs which:

- ``BLUR_BEFORE``: a stride-1 blur feeds the op, which keeps its stride;
- ``SUBSAMPLE_BEFORE``: a blur of the op's stride feeds the op, which runs at stride 1
  (for ops that commute with the blur, such as 1x1 convs);
- ``BLUR_AFTER``: the op runs at stride 1 and a blur of the op's stride subsamples its
  output, to exactly the size the op produced before;
- ``BLUR_PAST_NONLINEARITY`` (convs): as ``BLUR_AFTER``, with the blur moved past the
  per-channel ops that follow the conv.

Where the rewrite is carried out is decided per module, over every call of it in every
graph (``RewriteContext.realization``): when all of a conv or pool module's calls get the
same placement, and it is one of the first three, the module is replaced by a blurred
version of itself that carries the blur (``fxblur.ops.blurred``), and no caller changes.
Otherwise the graph gets blur nodes (``fxblur.passes.edit``); an op module that must run at
stride 1 is then replaced by a stride-1 copy, which every one of its calls must want. A
module that code outside the graph may call (one inside a ``leaf_modules`` module) is
never replaced: its ops are blurred before, in the graph, whatever the placement asked,
and the record says why.

Subclasses name the kind of op, choose the placement and add their own reasons to skip;
each placement is carried out by the method ``rewrites()`` maps it to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxblur.analysis.window_ops import WindowOp, change_of, read_window_op, set_call_argument
from fxblur.known_layers import anti_aliasing, trusts_forward
from fxblur.ops.blur_module import Blur
from fxblur.ops.blurred import BLURRED, BlurredOp, make_blurred
from fxblur.ops.ceil_mode import pad_for_ceil_mode, pad_window_circularly
from fxblur.ops.folded import FoldedLayer
from fxblur.ops.polyphase import roll_to_phase, select_phase
from fxblur.options import BlurOptions
from fxblur.passes.context import Realization, RewriteContext
from fxblur.passes.edit import BLUR_CONTAINER, add_submodule, insert_after, insert_before, mark_strided_as, replace_uses
from fxblur.record import Action, Change, log_decision
from fxblur.trace.cloning import share_tensors

# Placements a blurred op module carries whole.
IN_MODULE = frozenset({Action.BLUR_BEFORE, Action.SUBSAMPLE_BEFORE, Action.BLUR_AFTER})

Rewrite = Callable[[fx.GraphModule, WindowOp, "Plan", RewriteContext], Change]


@dataclass(frozen=True)
class Plan:
    """What to do with one call of an op: a placement, or the reason to leave it alone."""

    placement: Action | None = None
    reason: str = ""
    chain: tuple[fx.Node, ...] = ()  # the per-channel ops a blur past the nonlinearity moves past
    note: str = ""  # why the placement is not the one the options asked for


class WindowOpPass(PassBase):
    """Blur every downsampling op of the kinds in ``kinds`` (``"conv"``, ``"max_pool"``, ...) in a graph.

    Args:
        options: the rewrite options.
        context: shared by the passes over every graph of one model; a pass run on a
            single GraphModule on its own makes one for it.
    """

    kinds: tuple[str, ...]

    def __init__(self, options: BlurOptions, context: RewriteContext | None = None) -> None:
        self.options = options
        self.context = context

    def rewrites(self) -> dict[Action, Rewrite]:
        """The method that carries out each placement this pass may choose."""
        return {
            Action.BLUR_BEFORE: self.blur_before,
            Action.SUBSAMPLE_BEFORE: self.subsample_before,
            Action.BLUR_AFTER: self.blur_after,
        }

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        context = self.context or RewriteContext([graph_module])
        modified = False
        for node in list(graph_module.graph.nodes):
            op = read_window_op(node, graph_module)
            if op is None or op.kind not in self.kinds or not op.downsamples:
                continue
            plan = self.plan(op, graph_module, context)
            if plan.placement is None:
                log_decision(graph_module, change_of(op, Action.SKIPPED, plan.reason))
                continue
            change = self._rewrite(graph_module, op, plan, context)
            log_decision(graph_module, dataclasses.replace(change, note=plan.note or change.note))
            modified = True
        if self.context is None:
            context.install(graph_module)
        return PassResult(graph_module, modified)

    def plan(self, op: WindowOp, gm: fx.GraphModule, context: RewriteContext) -> Plan:
        """Skip ``op`` (with the reason) or choose its placement.

        An op whose module has a ``forward`` of its own that fxblur does not know to honour
        its ``stride`` is blurred before (that needs nothing from its ``forward``).
        """
        reason = self.skip_reason(op, gm, context)
        if reason:
            return Plan(reason=reason)
        placement = self.placement(op)
        if placement is not Action.BLUR_BEFORE and op.custom_forward and not trusts_forward(type(op.module)):
            name = type(op.module).__name__
            why = f"{name} has a forward of its own; fxblur.trust_forward({name}) allows {placement}"
            return Plan(Action.BLUR_BEFORE, note=why)
        return Plan(placement)

    def placement(self, op: WindowOp) -> Action:
        """The placement for ``op``, one of ``rewrites()``."""
        return Action.BLUR_BEFORE if self.options.pools_blur_first else Action.BLUR_AFTER

    def skip_reason(self, op: WindowOp, gm: fx.GraphModule, context: RewriteContext) -> str:
        """Why ``op`` must be left alone, or ``""``. Subclasses add their own reasons."""
        pattern = self.options.excluded(f"{context.scope}.{op.target}" if context.scope else op.target)
        if pattern is not None:
            return f"excluded by {pattern!r}"
        source = unpadded_input(op)
        if isinstance(op.module, BlurredOp) or _is_blurred_before(source, op, gm) or _folded_blur(op):
            return "already blurred"
        if source.op == "call_function" and source.target in (roll_to_phase, select_phase):
            return "already subsampled by polyphase sampling"
        layer = _anti_aliasing_before(op, gm)
        if layer:
            return f"already anti-aliased by {layer}"
        return ""

    def blur(self, op: WindowOp, stride: tuple[int, ...]) -> Blur:
        """The blur for ``op``, subsampling by ``stride``."""
        return Blur(self.options.filter_taps(op.stride), stride, self.options.padding_mode, op.dims)

    def realization(self, op: WindowOp, context: RewriteContext) -> Realization:
        """How the op's module takes part, decided over every call of it (see ``RewriteContext.realization``)."""

        def decide(calls: list[tuple[fx.GraphModule, fx.Node]]) -> Realization:
            placements = {self.plan(read_window_op(node, gm), gm, context).placement for gm, node in calls}
            if None in placements:
                return Realization.UNTOUCHED
            if (
                len(placements) == 1
                and placements <= IN_MODULE
                and type(op.module) in BLURRED
                and not (self.options.circular_padding and _pads_outside(op, next(iter(placements))))
            ):
                return Realization.MODULE
            if all(placement.at_stride_one for placement in placements):
                return Realization.STRIDE_ONE
            return Realization.UNTOUCHED

        return context.realization(op.module, decide)

    def why_untouched(self, op: WindowOp, placement: Action, context: RewriteContext) -> str:
        """Why ``placement`` could not be carried out on ``op``'s module, which stays as it is."""
        why = (
            "its module is also called from outside the graph"
            if id(op.module) in context.frozen
            else "its other calls need the module as it is"
        )
        return f"{placement} would change {op.target}, but {why}"

    def _rewrite(self, gm: fx.GraphModule, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        rewrites = self.rewrites()
        if op.module is None:
            return rewrites[plan.placement](gm, op, plan, context)
        realization = self.realization(op, context)
        if realization is Realization.MODULE:
            return self._blur_in_module(op, plan, context)
        if realization is Realization.UNTOUCHED and plan.placement is not Action.BLUR_BEFORE:
            change = self.blur_before(gm, op, plan, context)
            return dataclasses.replace(change, note=self.why_untouched(op, plan.placement, context))
        return rewrites[plan.placement](gm, op, plan, context)

    def _blur_in_module(self, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        blur_input = plan.placement is not Action.BLUR_AFTER
        stride_one = plan.placement is not Action.BLUR_BEFORE
        stride = op.stride if stride_one else (1,) * op.dims

        def blurred() -> nn.Module:
            return make_blurred(share_tensors(op.module), self.blur(op, stride), blur_input, stride_one)

        context.replace(op.target, op.module, blurred)
        return change_of(op, plan.placement, blur=f"{op.target}.{BLUR_CONTAINER}", blurred_module=True)

    def blur_before(self, gm: fx.GraphModule, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        """Blur the op's input at stride 1; the op keeps its stride."""
        return self._blur_input(gm, op, Action.BLUR_BEFORE, (1,) * op.dims, (), context)

    def subsample_before(self, gm: fx.GraphModule, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        """Blur and subsample the op's input; the op runs at stride 1 on what is left."""
        added = self.run_at_stride_one(gm, op, context)
        return self._blur_input(gm, op, Action.SUBSAMPLE_BEFORE, op.stride, added, context)

    def blur_after(self, gm: fx.GraphModule, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        """Run the op at stride 1 and subsample its output with a blur."""
        source = op.input
        added = self.run_at_stride_one(gm, op, context)
        return self.blur_output(gm, op, Action.BLUR_AFTER, source, added, (), context)

    def run_at_stride_one(self, gm: fx.GraphModule, op: WindowOp, context: RewriteContext) -> tuple[fx.Node, ...]:
        """Make ``op`` compute every window; return the nodes this needed to insert.

        At stride 1 a pool's ``ceil_mode`` has no effect, so it is switched off. The node
        remembers the stride it had (``fxblur.passes.edit.strided_as``), for passes that pad around it.
        """
        ones = (1,) * op.dims
        mark_strided_as(op.node, op.stride, op.ceil_mode)
        if op.module is None:
            set_call_argument(op.node, "stride", ones)
            if op.ceil_mode:
                set_call_argument(op.node, "ceil_mode", False)
            return ()

        def stride_one_copy() -> nn.Module:
            module = share_tensors(op.module)
            module.stride = ones
            if hasattr(module, "ceil_mode"):
                module.ceil_mode = False
            return module

        context.replace(op.target, op.module, stride_one_copy)
        return ()

    def _blur_input(
        self,
        gm: fx.GraphModule,
        op: WindowOp,
        action: Action,
        stride: tuple[int, ...],
        added: tuple[fx.Node, ...],
        context: RewriteContext,
    ) -> Change:
        source = op.input
        path = add_submodule(gm, op.node, op.target, self.blur(op, stride), context.frozen)
        blurred = insert_before(op.node, path, (source,))
        replace_uses(source, blurred, only=[op.node])
        return change_of(op, action, blur=path, input_node=source, added=(*added, blurred))

    def blur_output(
        self,
        gm: fx.GraphModule,
        op: WindowOp,
        action: Action,
        source: fx.Node,
        added: tuple[fx.Node, ...],
        chain: tuple[fx.Node, ...],
        context: RewriteContext,
    ) -> Change:
        """Subsample with a blur after the op, or after the per-channel ``chain`` that follows it."""
        last = chain[-1] if chain else op.node
        path = add_submodule(gm, last, op.target, self.blur(op, op.stride), context.frozen)
        blurred = insert_after(last, path, (last,))
        replace_uses(last, blurred, keep=[blurred])
        return change_of(
            op,
            action,
            blur=path,
            input_node=source,
            output_node=blurred,
            added=(*added, blurred),
            enlarged=(op.node, *chain),
        )


def _pads_outside(op: WindowOp, placement: Action) -> bool:
    """Whether circular padding would put a padding node before ``op`` (a blurred op module cannot hold it).

    A conv pads inside, circularly, when its padding makes up for its kernel (or, keeping
    its stride, when it needs none); a pool with padding or ceil-mode windows never does.
    """
    if op.kind != "conv":
        return bool(op.ceil_mode or any(op.padding))
    if isinstance(op.padding, str):
        return True
    spans = [d * (k - 1) for k, d in zip(op.kernel_size, op.dilation, strict=True)]
    if placement is Action.BLUR_BEFORE:
        return any(p and 2 * p != span for p, span in zip(op.padding, spans, strict=True))
    return any(2 * p != span for p, span in zip(op.padding, spans, strict=True))


def _anti_aliasing_before(op: WindowOp, gm: fx.GraphModule) -> str | None:
    """The known anti-aliasing layer that feeds ``op`` without subsampling (a blur at stride 1), if any."""
    source = op.input
    if source.op != "call_module":
        return None
    layer = gm.get_submodule(source.target)
    stride = getattr(layer, "stride", None)
    strides = stride if isinstance(stride, (tuple, list)) else (stride,)
    return anti_aliasing(layer) if all(s == 1 for s in strides) else None


def unpadded_input(op: WindowOp) -> fx.Node:
    """The op's input before the padding a rewrite put in front of it (circular padding, ceil-mode windows)."""
    source = op.input
    while source.op == "call_function" and source.target in (pad_window_circularly, pad_for_ceil_mode):
        source = source.args[0]
    return source


def _folded_blur(op: WindowOp) -> bool:
    """Whether the op is a layer that a rewrite folded a blur or a polyphase roll into (``fxblur.assemble.fold``)."""
    if not isinstance(op.module, FoldedLayer) or "before" not in op.module.fxblur:
        return False
    chain = op.module.fxblur["before"]
    called = [chain.get_submodule(node.target) for node in chain.graph.nodes if node.op == "call_module"]
    rolled = any(node.target in (roll_to_phase, select_phase) for node in chain.graph.nodes)
    return rolled or any(isinstance(module, Blur) for module in called)


def _is_blurred_before(source: fx.Node, op: WindowOp, gm: fx.GraphModule) -> bool:
    if source.op != "call_module" or not isinstance(gm.get_submodule(source.target), Blur):
        return False
    blur = gm.get_submodule(source.target)
    return all(s == 1 for s in blur.stride) and all(
        k > 1 for k, s in zip(blur.filter_size, op.stride, strict=True) if s > 1
    )
