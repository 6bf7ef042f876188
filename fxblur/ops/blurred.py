"""Blurred convs and pools: an op module that carries its own blur, before or after the op.

When a rewrite touches nothing but one conv or pool module (a blur before it, or the op at
stride 1 with a subsampling blur after it), the blur belongs to that module: the module is
replaced by a blurred version of itself, and every caller keeps its own code. A
``BlurredConv2d`` is still an ``nn.Conv2d`` (it holds the same parameters under the same
names, so ``state_dict()`` keys do not change), and its output has the size the original
op's had, so it is right for any caller: a ``Sequential`` run layer by layer, a parent
that calls it directly, a hook on it.

A blurred op holds its ``Blur`` as the child ``fxblur`` and blurs its input
(``blur_input``, for a blur before the op or a subsampling blur before an op moved to
stride 1) or its output (the op at stride 1, then the subsampling blur). ``run_op`` is
the op alone, as configured. Max pools run at stride 1 through the fast stride-1 pool
(``fxblur.ops.max_pool``), ``-inf`` padded for the partial windows of a ``ceil_mode``
pool (``fxblur.ops.ceil_mode``), so that every output size stays the original's.

Example:
    >>> from fxblur.trace.cloning import share_tensors
    >>> conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
    >>> blurred = make_blurred(share_tensors(conv), Blur(3, stride=1), blur_input=True)
    >>> isinstance(blurred, nn.Conv2d), blurred.weight is conv.weight, list(blurred.state_dict())
    (True, True, ['weight', 'bias'])
    >>> x = torch.randn(1, 16, 9, 9)
    >>> torch.equal(blurred(x), conv(fxblur.blur(x, stride=1)))
    True
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fxblur.ops.blur_module import Blur
from fxblur.ops.ceil_mode import pad_for_ceil_mode
from fxblur.ops.circular import CircularConv1d, CircularConv2d, CircularConv3d
from fxblur.ops.max_pool import max_pool_stride_one


class BlurredOp:
    """What every blurred op has: a ``Blur`` child ``fxblur`` applied to its input (``blur_input``) or output."""

    def forward(self, x: Tensor) -> Tensor:
        if self.blur_input:
            return self.run_op(self.fxblur(x))
        return self.fxblur(self.run_op(x))


class _BlurredConv(BlurredOp):
    def run_op(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class BlurredConv1d(_BlurredConv, CircularConv1d):
    """``nn.Conv1d`` with its blur (circular padding of any extent: ``fxblur.ops.circular``)."""


class BlurredConv2d(_BlurredConv, CircularConv2d):
    """``nn.Conv2d`` with its blur (circular padding of any extent: ``fxblur.ops.circular``)."""


class BlurredConv3d(_BlurredConv, CircularConv3d):
    """``nn.Conv3d`` with its blur (circular padding of any extent: ``fxblur.ops.circular``)."""


class _BlurredMaxPool(BlurredOp):
    """A max pool blurred before (as it was), or run at stride 1 and blurred after.

    A ``ceil_mode`` pool run at stride 1 (``pads_for_ceil_mode``) gets its input ``-inf``
    padded for the original stride (``original_stride``), so that no partial window is lost.
    """

    def run_op(self, x: Tensor) -> Tensor:
        kernel, padding, dilation = list(self.kernel_size), list(self.padding), list(self.dilation)
        if self.blur_input:
            return self.strided_pool(x)
        if self.pads_for_ceil_mode:
            x = pad_for_ceil_mode(x, kernel, self.original_stride, padding, dilation)
        return max_pool_stride_one(x, kernel, padding, dilation)


class BlurredMaxPool1d(_BlurredMaxPool, nn.MaxPool1d):
    """``nn.MaxPool1d`` with its blur."""

    def strided_pool(self, x: Tensor) -> Tensor:
        return F.max_pool1d(x, self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)


class BlurredMaxPool2d(_BlurredMaxPool, nn.MaxPool2d):
    """``nn.MaxPool2d`` with its blur."""

    def strided_pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)


class BlurredMaxPool3d(_BlurredMaxPool, nn.MaxPool3d):
    """``nn.MaxPool3d`` with its blur."""

    def strided_pool(self, x: Tensor) -> Tensor:
        return F.max_pool3d(x, self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)


class BlurredAvgPool1d(BlurredOp, nn.AvgPool1d):
    """``nn.AvgPool1d`` with its blur."""

    def run_op(self, x: Tensor) -> Tensor:
        return F.avg_pool1d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)


class BlurredAvgPool2d(BlurredOp, nn.AvgPool2d):
    """``nn.AvgPool2d`` with its blur."""

    def run_op(self, x: Tensor) -> Tensor:
        geometry = (self.kernel_size, self.stride, self.padding)
        return F.avg_pool2d(x, *geometry, self.ceil_mode, self.count_include_pad, self.divisor_override)


class BlurredAvgPool3d(BlurredOp, nn.AvgPool3d):
    """``nn.AvgPool3d`` with its blur."""

    def run_op(self, x: Tensor) -> Tensor:
        geometry = (self.kernel_size, self.stride, self.padding)
        return F.avg_pool3d(x, *geometry, self.ceil_mode, self.count_include_pad, self.divisor_override)


BLURRED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: BlurredConv1d,
    nn.Conv2d: BlurredConv2d,
    nn.Conv3d: BlurredConv3d,
    nn.MaxPool1d: BlurredMaxPool1d,
    nn.MaxPool2d: BlurredMaxPool2d,
    nn.MaxPool3d: BlurredMaxPool3d,
    nn.AvgPool1d: BlurredAvgPool1d,
    nn.AvgPool2d: BlurredAvgPool2d,
    nn.AvgPool3d: BlurredAvgPool3d,
}


def make_blurred(op: nn.Module, blur: Blur, blur_input: bool, stride_one: bool = False) -> nn.Module:
    """Turn ``op`` (a conv or pool of one of torch.nn's own classes) into its blurred version, in place.

    Pass a copy: the module changes class. ``stride_one`` runs the op at stride 1 (a pool's
    ``ceil_mode`` is then carried by ``-inf`` padding).
    """
    dims = len(blur.stride)
    op.__class__ = BLURRED[type(op)]
    op.add_module("fxblur", blur)
    op.blur_input = blur_input
    if isinstance(op, _BlurredMaxPool):
        op.original_stride = list(_per_axis(op.stride, dims))
        op.pads_for_ceil_mode = bool(stride_one and op.ceil_mode)
    if isinstance(op, (_BlurredMaxPool, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        for name in ("kernel_size", "stride", "padding", "dilation"):
            if hasattr(op, name):
                setattr(op, name, _per_axis(getattr(op, name), dims))
    if stride_one:
        op.stride = (1,) * dims
        if hasattr(op, "ceil_mode"):
            op.ceil_mode = False
    return op


def _per_axis(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
