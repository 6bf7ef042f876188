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

Derivatives of every order follow from that routing, as for PyTorch's kernel: the pool's
forward-mode derivative takes each output's tangent from the element its gradient goes
to (``Route``), the backward is the transpose (``RouteBack``), and both are linear maps
(``fxblur.ops.eager.apply_linear``) of the tangent or gradient given the pool's input and
per-axis maxima, so the backward of the backward is ``Route`` again and its derivative in
the input is zero. Hessians, gradient penalties, forward mode and ``torch.func`` (``grad``,
``vmap``, ``jacrev``, ``jacfwd``) give PyTorch's numbers, ties included.

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
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from fxblur.ops.eager import apply, apply_linear, runs_eagerly_on_cpu


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
    """``pool`` at stride 1 on the fast path, in place: a ``StrideOneMaxPool{1,2,3}d``.

    Pass a copy: the module changes class, and keeps everything else (its hooks included).
    It is still an ``nn.MaxPool{1,2,3}d`` (with ``stride=1``, ``ceil_mode=False``), and like
    any max pool holds no parameters or buffers.

    Example:
        >>> stride_one_max_pool(nn.MaxPool2d(3, stride=2, padding=1))
        StrideOneMaxPool2d(kernel_size=3, stride=(1, 1), padding=1, dilation=1, ceil_mode=False)
    """
    dims = next(d for d, cls in enumerate((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), start=1) if isinstance(pool, cls))
    pool.__class__ = (StrideOneMaxPool1d, StrideOneMaxPool2d, StrideOneMaxPool3d)[dims - 1]
    pool.stride, pool.ceil_mode = (1,) * dims, False
    return pool


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
    """The stride-1 max pool one axis at a time; differentiable to every order. See the module docstring."""
    stages = _stages(kernel_size, padding, dilation)
    if not stages:
        return x.clone()
    out, *_ = apply(_SeparableMaxPool, x, stages)
    return out


def _stages(kernel_size: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> tuple[tuple, ...]:
    """(axis, taps, padding, dilation) of every axis the pool changes, the last axis first.

    Axes count from the end, so a ``vmap`` rule may add leading axes.

    Example:
        >>> _stages([3, 1], [1, 0], [2, 1])
        ((-2, 3, 1, 2),)
    """
    geometry = zip(range(-len(kernel_size), 0), kernel_size, padding, dilation, strict=True)
    return tuple(stage for stage in reversed(list(geometry)) if stage[1] > 1 or stage[2] > 0)


class _SeparableMaxPool(torch.autograd.Function):
    """The pool, stage by stage; returns the output, then each stage's result before it.

    Those intermediate maxima (non-differentiable outputs, so that they may be saved in the
    ``setup_context`` form ``torch.func`` needs) tell the routing where every maximum came from.
    """

    @staticmethod
    def forward(x: Tensor, stages: tuple) -> tuple[Tensor, ...]:
        values = [x]
        for stage in stages:
            values.append(_max_axis(values[-1], *stage))
        return values[-1], *values[1:-1]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, outputs: tuple) -> None:
        x, stages = inputs
        out, *between = outputs
        ctx.mark_non_differentiable(*between)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for outputs that have none
        ctx.route = Route(stages)
        ctx.save_for_backward(x, *between, out)
        ctx.save_for_forward(x, *between, out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: None) -> tuple[Tensor | None, None]:
        # ``grad`` is None where only the backward's own use of ``out`` (as a constant) leads here
        return None if grad is None else apply_linear(ctx.route.transpose, grad, *ctx.saved_tensors), None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: None) -> tuple[Tensor | None, ...]:
        return apply_linear(ctx.route, tangent, *ctx.saved_tensors), *(None for _ in ctx.route.stages[1:])

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, stages: tuple) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        outputs = _SeparableMaxPool.apply(x.movedim(in_dims[0], 0), stages)
        return outputs, (0,) * len(outputs)


@dataclass(frozen=True)
class Route:
    """The pool's derivative: each output takes ``v`` at the element its window's maximum came from.

    A ``LinearMap`` (``fxblur.ops.eager``) of ``v`` given the pool's stage values ``x, *between,
    out``: it gives the tangent of the pool's output (forward mode); its transpose
    (``RouteBack``) sends each output's gradient back to that element (the backward pass).

    Example:
        >>> x = torch.tensor([[[1.0, 3.0, 2.0]]])
        >>> out = separable_max_pool(x, [2], [0], [1])
        >>> Route(_stages([2], [0], [1]))(torch.tensor([[[10.0, 20.0, 30.0]]]), x, out)
        tensor([[[20., 20.]]])
    """

    stages: tuple[tuple, ...]

    @property
    def transpose(self) -> RouteBack:
        return RouteBack(self.stages)

    def __call__(self, v: Tensor, *values: Tensor) -> Tensor:
        for stage, source, result in zip(self.stages, values[:-1], values[1:], strict=True):
            v = _pick_axis(v, source, result, *stage)
        return v


@dataclass(frozen=True)
class RouteBack:
    """The transpose of ``Route``: each output's gradient to the element its maximum came from."""

    stages: tuple[tuple, ...]

    @property
    def transpose(self) -> Route:
        return Route(self.stages)

    def __call__(self, grad: Tensor, *values: Tensor) -> Tensor:
        for stage, source, result in reversed(list(zip(self.stages, values[:-1], values[1:], strict=True))):
            grad = _max_axis_adjoint(grad, source, result, *stage)
        return grad


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


def _claiming_taps(n: int, outputs: int, k: int, p: int, d: int) -> list[tuple[int, int, int]]:
    """(tap, lo, hi) of every tap that reads a real sample for some output, in tap order."""
    taps = [(j, *_tap_range(j, n, outputs, p, d)) for j in range(k)]
    return [(j, lo, hi) for j, lo, hi in taps if hi > lo]


def _max_axis_adjoint(grad: Tensor, x: Tensor, out: Tensor, axis: int, k: int, p: int, d: int) -> Tensor:
    """Route each output's gradient to the first tap of its window that holds the max.

    ``unclaimed`` is the gradient of the outputs no tap has claimed yet; a tap claims the
    outputs its sample equals, in tap order, and the last tap takes what is left.
    Winners are 1.0/0.0 floats, so that claiming is two fused multiply-adds.
    """
    shape = list(grad.shape)
    shape[axis] = x.shape[axis]
    result = grad.new_zeros(shape)
    taps = _claiming_taps(x.shape[axis], out.shape[axis], k, p, d)
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


def _pick_axis(v: Tensor, x: Tensor, out: Tensor, axis: int, k: int, p: int, d: int) -> Tensor:
    """The transpose of ``_max_axis_adjoint``: each output takes ``v`` at the tap it routes to.

    Taps overwrite the outputs they win from the last tap to the first, so the first
    winning tap has the last word; the last tap gives what no tap wins (a NaN window).
    """
    shape = list(v.shape)
    shape[axis] = out.shape[axis]
    picked = v.new_zeros(shape)
    taps = _claiming_taps(x.shape[axis], out.shape[axis], k, p, d)
    for i, (j, lo, hi) in enumerate(reversed(taps)):
        target = picked.narrow(axis, lo, hi - lo)
        taken = v.narrow(axis, lo + j * d - p, hi - lo)
        if i == 0:
            target.copy_(taken)
        else:
            wins = torch.eq(x.narrow(axis, lo + j * d - p, hi - lo), out.narrow(axis, lo, hi - lo))
            torch.where(wins, taken, target, out=target)
    return picked
