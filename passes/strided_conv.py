"""Blur strided convolutions (``nn.Conv2d`` modules and ``F.conv2d`` calls, 1-D and 3-D too)."""

from __future__ import annotations

import torch.fx as fx

from fxblur.analysis.pointwise import pointwise_chain
from fxblur.analysis.window_ops import WindowOp
from fxblur.passes.context import RewriteContext
from fxblur.passes.window_pass import Plan, Rewrite, WindowOpPass
from fxblur.record import Action, Change


class BlurStridedConvs(WindowOpPass):
    """Anti-alias every conv with a stride above 1.

    Convs with fewer than ``min_channels`` input channels are skipped, as in Composer:
    an RGB stem conv keeps its full resolution input.

    Placement: ``BLUR_BEFORE`` with ``blur_first``; otherwise ``BLUR_AFTER``, or
    ``BLUR_PAST_NONLINEARITY`` with ``past_nonlinearity``. A 1x1 conv without padding
    gets ``SUBSAMPLE_BEFORE`` instead, at a quarter of the cost of the others:

    - instead of ``BLUR_BEFORE``: the strided 1x1 conv only reads every ``stride``-th
      sample of the stride-1 blur, exactly the samples a subsampling blur computes;
    - instead of the other two: a 1x1 conv mixes channels at each position and a blur
      filters each channel over positions, so the two commute. (With zero padding the
      blur darkens a constant border, so a conv with a bias only commutes under reflect,
      replicate or circular padding.)

    Example:
        >>> from torch.fx.passes.infra.pass_manager import PassManager
        >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, stride=2)))
        >>> PassManager([BlurStridedConvs(BlurOptions())])(gm).modified
        True
    """

    kinds = ("conv",)

    def rewrites(self) -> dict[Action, Rewrite]:
        return {**super().rewrites(), Action.BLUR_PAST_NONLINEARITY: self.blur_past_nonlinearity}

    def skip_reason(self, op: WindowOp, gm: fx.GraphModule, context: RewriteContext) -> str:
        reason = super().skip_reason(op, gm, context)
        minimum = self.options.min_channels
        if not reason and op.in_channels is not None and op.in_channels < minimum:
            reason = f"in_channels {op.in_channels} < min_channels {minimum}"
        elif not reason and op.in_channels is None and op.module is not None and minimum:
            reason = f"in_channels not known before the lazy conv's first call (min_channels {minimum}): run one first"
        return reason

    def placement(self, op: WindowOp) -> Action:
        pointwise = _is_unpadded_1x1(op)
        if self.options.blur_first and not self.options.past_nonlinearity:
            return Action.SUBSAMPLE_BEFORE if pointwise else Action.BLUR_BEFORE
        if pointwise and self._bias_commutes_with_blur(op):
            return Action.SUBSAMPLE_BEFORE
        return Action.BLUR_PAST_NONLINEARITY if self.options.past_nonlinearity else Action.BLUR_AFTER

    def plan(self, op: WindowOp, gm: fx.GraphModule, context: RewriteContext) -> Plan:
        plan = super().plan(op, gm, context)
        if plan.placement is not Action.BLUR_PAST_NONLINEARITY:
            return plan
        chain = tuple(pointwise_chain(op.node, gm, op.dims))
        # a conv that feeds a branch or a non-pointwise op straight away is blurred right after
        return Plan(Action.BLUR_PAST_NONLINEARITY, chain=chain) if chain else Plan(Action.BLUR_AFTER)

    def blur_past_nonlinearity(self, gm: fx.GraphModule, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        """Run the conv at stride 1 and subsample after the per-channel ops that follow it."""
        source = op.input
        added = self.run_at_stride_one(gm, op, context)
        return self.blur_output(gm, op, Action.BLUR_PAST_NONLINEARITY, source, added, plan.chain, context)

    def _bias_commutes_with_blur(self, op: WindowOp) -> bool:
        has_bias = op.module.bias is not None if op.module is not None else op.arguments.get("bias") is not None
        return self.options.padding_mode != "zeros" or not has_bias


def _is_unpadded_1x1(op: WindowOp) -> bool:
    pointwise = op.kernel_size is not None and all(k == 1 for k in op.kernel_size)
    unpadded = op.padding == "valid" or (not isinstance(op.padding, str) and not any(op.padding))
    return pointwise and unpadded
