"""The stride-1 max pool that a blurred max pool runs before its subsampling blur.

Run at stride 1, a max pool computes four times the windows it did at stride 2, and on
CPU PyTorch's kernel for NCHW tensors visits every window element by element: a 3x3
stride-1 ``F.max_pool2d`` there costs some fifty copies of its input. A max over a box
is separable, so ``separable_max_pool`` takes it one axis at a time, each as ``k - 1``
elementwise ``torch.maximum`` passes over shifted views, written straight into the
output: the values are exactly those of ``F.max_pool2d`` (a max rounds nothing).

Its backward routes each output's gradient to the element PyTorch's kernel picks: the
first maximum of the window in row-major order. Taking the last axis first and the first
axis last makes the per-axis first maxima compose to exactly that element: the first
row (of the window) that holds the maximum, and the first maximum within that row. On
each axis, taps claim outputs in tap order: a tap takes the gradient still unclaimed at
the outputs whose maximum it holds, so a later tap that ties gets nothing, and the last
tap takes what is left. (A window holding NaN outputs NaN, as PyTorch's kernel does; its
gradient goes to the window's last tap on that axis, PyTorch's to the last NaN.)

``max_pool_stride_one`` picks this path where it is faster: float32/float64 NCHW tensors
on CPU in eager mode. Everywhere else, channels-last, CUDA, ``meta``, ``torch.compile``,
TorchScript and ``torch.jit.trace``, it calls ``F.max_pool{1,2,3}d`` at stride 1.

Example:
    >>> x = torch.randn(2, 3, 8, 8)
    >>> y = max_pool_stride_one(x, kernel_size=[3, 3], padding=[1, 1], dilation=[1, 1])
    >>> torch.equal(y, F.max_pool2d(x, 3, stride=1, padding=1))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fxblur.ops.eager import runs_eagerly_on_cpu


def max_pool_stride_one(x: Tensor, kernel_size: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """Max pool the last ``len(kernel_size)`` axes of ``x`` at stride 1, ``-inf`` padded.

    Equal to ``F.max_pool{n}d(x, kernel_size, 1, padding, dilation)``, values and gradients.
    """
    if torch.jit.is_scripting():  # TorchScript compiles only this branch
        return _native(x, kernel_size, padding, dilation)
    else:
        if runs_eagerly_on_cpu(x) and x.is_contiguous():
            return separable_max_pool(x, kernel_size, padding, dilation)
        return _native(x, kernel_size, padding, dilation)


torch.fx.wrap("max_pool_stride_one")  # re-tracing a rewritten graph keeps it one call


def _native(x: Tensor, kernel_size: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    if len(kernel_size) == 1:
        return F.max_pool1d(x, kernel_size, 1, padding, dilation)
    if len(kernel_size) == 2:
        return F.max_pool2d(x, kernel_size, 1, padding, dilation)
    return F.max_pool3d(x, kernel_size, 1, padding, dilation)


def stride_one_max_pool(pool: nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d) -> nn.Module:
    """A copy of ``pool`` at stride 1, on the fast path: a ``StrideOneMaxPool{1,2,3}d``.

    It is still an ``nn.MaxPool{1,2,3}d`` (with ``stride=1``, ``ceil_mode=False``), and like
    any max pool holds no parameters or buffers.

    Example:
        >>> stride_one_max_pool(nn.MaxPool2d(3, stride=2, padding=1))
        StrideOneMaxPool2d(kernel_size=3, stride=(1, 1), padding=1, dilation=1, ceil_mode=False)
    """
    dims = next(d for d, cls in enumerate((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), start=1) if isinstance(pool, cls))
    stride_one = (StrideOneMaxPool1d, StrideOneMaxPool2d, StrideOneMaxPool3d)[dims - 1]
    return stride_one(pool.kernel_size, (1,) * dims, pool.padding, pool.dilation)


def _through_fast_path(pool: nn.Module, x: Tensor, dims: int) -> Tensor:
    """``pool``'s window (ints or tuples, as ``nn.MaxPool`` keeps them) through ``max_pool_stride_one``."""
    geometry = ([v] * dims if isinstance(v, int) else list(v) for v in (pool.kernel_size, pool.padding, pool.dilation))
    return max_pool_stride_one(x, *geometry)


class StrideOneMaxPool1d(nn.MaxPool1d):
    """``nn.MaxPool1d`` at stride 1 through ``max_pool_stride_one``."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return F.max_pool1d(x, self.kernel_size, 1, self.padding, self.dilation)
        else:
            return _through_fast_path(self, x, 1)


class StrideOneMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` at stride 1 through ``max_pool_stride_one``."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return F.max_pool2d(x, self.kernel_size, 1, self.padding, self.dilation)
        else:
            return _through_fast_path(self, x, 2)


class StrideOneMaxPool3d(nn.MaxPool3d):
    """``nn.MaxPool3d`` at stride 1 through ``max_pool_stride_one``."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return F.max_pool3d(x, self.kernel_size, 1, self.padding, self.dilation)
        else:
            return _through_fast_path(self, x, 3)


def separable_max_pool(
    x: Tensor, kernel_size: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> Tensor:
    """The stride-1 max pool one axis at a time; differentiable. See the module docstring."""
    return _SeparableMaxPool.apply(x, tuple(kernel_size), tuple(padding), tuple(dilation))


class _SeparableMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kernel_size: tuple, padding: tuple, dilation: tuple) -> torch.Tensor:
        first = x.dim() - len(kernel_size)
        stages = []  # (axis, taps, padding, dilation), last axis first
        for axis in reversed(range(first, x.dim())):
            k, p, d = kernel_size[axis - first], padding[axis - first], dilation[axis - first]
            if k > 1 or p > 0:
                stages.append((axis, k, p, d))
        values = [x]
        for axis, k, p, d in stages:
            values.append(_max_axis(values[-1], axis, k, p, d))
        ctx.stages = stages
        ctx.save_for_backward(*values)
        return x.clone() if len(values) == 1 else values[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        values = ctx.saved_tensors
        for (axis, k, p, d), source, result in reversed(list(zip(ctx.stages, values[:-1], values[1:], strict=True))):
            grad = _max_axis_adjoint(grad, source, result, axis, k, p, d)
        return grad, None, None, None


def _tap_range(j: int, n: int, outputs: int, p: int, d: int) -> tuple[int, int]:
    """The outputs whose tap ``j`` reads a real sample (not padding), as a range."""
    return max(0, p - j * d), min(outputs, n + p - j * d)


def _max_axis(x: torch.Tensor, axis: int, k: int, p: int, d: int) -> torch.Tensor:
    """The max of every ``k``-tap window (dilation ``d``, ``p`` samples of ``-inf`` each side)."""
    n = x.shape[axis]
    outputs = n + 2 * p - d * (k - 1)
    ranges = [_tap_range(j, n, outputs, p, d) for j in range(k)]
    full = next((j for j, (lo, hi) in enumerate(ranges) if lo == 0 and hi == outputs), None)
    if full is None:
        shape = list(x.shape)
        shape[axis] = outputs
        out = x.new_full(shape, float("-inf"))
    else:
        out = x.narrow(axis, full * d - p, outputs).clone()
    for j, (lo, hi) in enumerate(ranges):
        if j != full and hi > lo:
            view = out.narrow(axis, lo, hi - lo)
            torch.maximum(view, x.narrow(axis, lo + j * d - p, hi - lo), out=view)
    return out


def _max_axis_adjoint(
    grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor, axis: int, k: int, p: int, d: int
) -> torch.Tensor:
    """Route each output's gradient to the first tap of its window that holds the max.

    ``unclaimed`` is the gradient of the outputs no tap has claimed yet; a tap claims the
    outputs its sample equals, in tap order, and the last tap takes what is left.
    Winners are 1.0/0.0 floats, so that claiming is two fused multiply-adds.
    """
    n = x.shape[axis]
    outputs = out.shape[axis]
    taps = [(j, *_tap_range(j, n, outputs, p, d)) for j in range(k)]
    taps = [(j, lo, hi) for j, lo, hi in taps if hi > lo]
    result = torch.zeros_like(x)
    unclaimed = grad
    for i, (j, lo, hi) in enumerate(taps):
        target = result.narrow(axis, lo + j * d - p, hi - lo)
        claimable = unclaimed.narrow(axis, lo, hi - lo)
        if i == len(taps) - 1:
            target.add_(claimable)
            break
        source = x.narrow(axis, lo + j * d - p, hi - lo)
        wins = torch.eq(source, out.narrow(axis, lo, hi - lo), out=torch.empty_like(source))
        target.addcmul_(claimable, wins)
        if unclaimed is grad:
            unclaimed = grad.clone()
            claimable = unclaimed.narrow(axis, lo, hi - lo)
        claimable.addcmul_(claimable, wins, value=-1)
    return result
