"""Blur strided convolutions (``nn.Conv2d`` modules and ``F.conv2d`` calls)."""

from __future__ import annotations

import torch.fx as fx

from fxblur.ops import WindowOp
from fxblur.passes.window_pass import WindowOpPass


class BlurStridedConvs(WindowOpPass):
    """Anti-alias every conv with a stride above 1.

    Convs with fewer than ``min_channels`` input channels are skipped, as in Composer:
    an RGB stem conv keeps its full resolution input.

    Example:
        >>> from torch.fx.passes.infra.pass_manager import PassManager
        >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, stride=2)))
        >>> PassManager([BlurStridedConvs(BlurOptions())])(gm).modified
        True
    """

    kind = "conv"

    def skip_reason(self, op: WindowOp, gm: fx.GraphModule) -> str:
        reason = super().skip_reason(op, gm)
        if not reason and op.in_channels is not None and op.in_channels < self.options.min_channels:
            reason = f"in_channels {op.in_channels} < min_channels {self.options.min_channels}"
        return reason
