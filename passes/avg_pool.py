"""Blur strided average pools (``nn.AvgPool2d`` modules and ``F.avg_pool2d`` calls); off by default."""

from __future__ import annotations

import torch.fx as fx

from fxblur.analysis.window_ops import WindowOp
from fxblur.passes.context import RewriteContext
from fxblur.passes.window_pass import WindowOpPass
from fxblur.record import Action


class BlurAvgPools(WindowOpPass):
    """Anti-alias every average pool with a stride above 1 (``replace_avgpools=True``).

    Run at stride 1 and followed by a subsampling blur, an average pool becomes the
    paper's "AvgPool -> BlurPool". A ``ceil_mode`` pool is left alone in that placement:
    its last, partial windows average fewer samples than any stride-1 window, so no
    stride-1 pool computes them. Blurring before the pool works for every pool.

    Example:
        >>> from torch.fx.passes.infra.pass_manager import PassManager
        >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.AvgPool2d(2)))
        >>> PassManager([BlurAvgPools(BlurOptions(replace_avgpools=True))])(gm).modified
        True
    """

    kinds = ("avg_pool", "lp_pool")

    def skip_reason(self, op: WindowOp, gm: fx.GraphModule, context: RewriteContext) -> str:
        reason = super().skip_reason(op, gm, context)
        if not reason and op.ceil_mode and self.placement(op) is Action.BLUR_AFTER:
            reason = "ceil_mode=True: a stride-1 average pool cannot compute the last, partial windows"
        return reason
