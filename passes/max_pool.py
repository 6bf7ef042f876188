"""Blur strided max pools (``nn.MaxPool2d`` modules and ``F.max_pool2d`` calls)."""

from __future__ import annotations

import torch.fx as fx

from fxblur._compat import keep_opaque_when_retraced
from fxblur.analysis.window_ops import WindowOp
from fxblur.ops.ceil_mode import pad_for_ceil_mode
from fxblur.ops.max_pool import max_pool_stride_one, stride_one_max_pool
from fxblur.passes.context import RewriteContext
from fxblur.passes.edit import insert_before, mark_strided_as, replace_uses
from fxblur.passes.window_pass import WindowOpPass
from fxblur.trace.cloning import share_tensors


class BlurMaxPools(WindowOpPass):
    """Anti-alias every max pool with a stride above 1; stride-1 pools are left alone.

    A pool that runs at stride 1 becomes ``fxblur.ops.max_pool.max_pool_stride_one`` (a module
    call becomes a ``StrideOneMaxPool2d``, still an ``nn.MaxPool2d``): the same values and
    gradients, computed separably where PyTorch's own kernel is slow (NCHW on CPU).

    Pools that return indices are skipped: the indices point into the pool's input, and
    a consumer such as ``MaxUnpool2d`` relies on them matching the strided pool. A
    ``ceil_mode`` pool run at stride 1 gets ``-inf`` padding first, so that it still
    computes its last, partial windows (see ``fxblur.ops.ceil_mode``).

    Example:
        >>> from torch.fx.passes.infra.pass_manager import PassManager
        >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.MaxPool2d(3, 2)))
        >>> PassManager([BlurMaxPools(BlurOptions(blur_first=False))])(gm).modified
        True
    """

    kinds = ("max_pool",)

    def skip_reason(self, op: WindowOp, gm: fx.GraphModule, context: RewriteContext) -> str:
        reason = super().skip_reason(op, gm, context)
        if not reason and op.return_indices:
            reason = "return_indices=True: the indices must refer to the strided pool's input"
        return reason

    def run_at_stride_one(self, gm: fx.GraphModule, op: WindowOp, context: RewriteContext) -> tuple[fx.Node, ...]:
        mark_strided_as(op.node, op.stride, op.ceil_mode)
        added = ()
        if op.ceil_mode:
            geometry = (list(op.kernel_size), list(op.stride), list(op.padding), list(op.dilation))
            padded = insert_before(op.node, pad_for_ceil_mode, (op.input, *geometry))
            replace_uses(op.input, padded, only=[op.node])
            added = (padded,)
        if op.module is None:
            op.node.target = max_pool_stride_one
            op.node.args = (op.input, list(op.kernel_size), list(op.padding), list(op.dilation))
            op.node.kwargs = {}
            keep_opaque_when_retraced(op.node)
        elif op.custom_forward:  # a subclass pads in its own forward (timm's MaxPool2dSame): keep it, at stride 1
            added = (*added, *super().run_at_stride_one(gm, op, context))
        else:
            context.replace(op.target, op.module, lambda: stride_one_max_pool(share_tensors(op.module)))
        return added
