"""The blur as weighted sums of shifted views: no padded copy, no convolution, a gather-form backward.

On CPU a depthwise ``F.conv2d`` over an NCHW tensor, after the copy that padding makes,
can cost several times the memory traffic the blur needs. A binomial filter is separable,
so along each axis the blur is a weighted sum of shifted (and, with a stride, strided)
views of its input, written straight into the output: ``k - 1`` elementwise passes for
``k`` taps, which PyTorch vectorises in any memory layout. The filter weights sum to one,
so the sum is built as a running mean of the views with ``lerp`` and needs no final
scaling pass. The few outputs whose window reaches past the border are summed from the
samples the padding mode maps them to, so the input is never copied into a padded buffer.

The backward pass is the adjoint of each axis's filter, also in gather form: the input
positions of one phase modulo the stride all read the same taps of the incoming gradient,
so each phase is one weighted sum of views (for stride 2 and 3 taps, half the positions
read one tap and half read two), and padded positions fold back onto the samples they
copied.

Example:
    >>> x = torch.randn(2, 3, 9, 8)
    >>> y = separable_blur(x, taps=(3, 3), stride=(2, 2), padding_mode="reflect")
    >>> torch.allclose(y, fxblur.blur(x, 2, 3, "reflect"), atol=1e-6)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from fxblur.ops.padding import feasible_mode, interior, taps_padding


def separable_blur(x: torch.Tensor, taps: Sequence[int], stride: Sequence[int], padding_mode: str) -> torch.Tensor:
    """Blur the last ``len(taps)`` axes of ``x``; differentiable. See the module docstring."""
    return _SeparableBlur.apply(x, tuple(taps), tuple(stride), padding_mode)


class _SeparableBlur(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, taps: tuple, stride: tuple, padding_mode: str) -> torch.Tensor:
        ctx.geometry = (taps, stride, padding_mode)
        ctx.sizes = []
        first = x.dim() - len(taps)
        out = x
        for axis, (k, s) in enumerate(zip(taps, stride, strict=True), start=first):
            if k > 1 or s > 1:
                ctx.sizes.append((axis, out.shape[axis]))
                out = _filter_axis(out, axis, k, s, padding_mode)
        return x.clone() if out is x else out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        taps, stride, padding_mode = ctx.geometry
        first = grad.dim() - len(taps)
        for axis, size in reversed(ctx.sizes):
            grad = _filter_axis_adjoint(grad, axis, size, taps[axis - first], stride[axis - first], padding_mode)
        return grad, None, None, None


def _weights(k: int) -> list[float]:
    """The normalised binomial taps (exact in binary floating point)."""
    return [math.comb(k - 1, j) / 2 ** (k - 1) for j in range(k)]


def _tap_order(k: int) -> list[int]:
    """The outer pair first: equal weights, so the running mean starts with an exact halving."""
    return [0, k - 1, *range(1, k - 1)] if k > 1 else [0]


def _source(position: int, size: int, mode: str) -> int | None:
    """The input sample a padded position holds (``None``: a zero)."""
    if 0 <= position < size:
        return position
    if mode == "zeros":
        return None
    if mode == "replicate":
        return min(max(position, 0), size - 1)
    if mode == "reflect":
        return -position if position < 0 else 2 * (size - 1) - position
    return position % size  # circular


def _along(x: torch.Tensor, axis: int, start: int, count: int, step: int) -> torch.Tensor:
    """``count`` samples of ``x`` along ``axis``, from ``start``, ``step`` apart (a view)."""
    index = [slice(None)] * x.dim()
    index[axis] = slice(start, start + (count - 1) * step + 1, step)
    return x[tuple(index)]


def _weighted_sum(out: torch.Tensor, terms: list[tuple[torch.Tensor, float]]) -> None:
    """``out = sum(weight * view)``: one elementwise pass per term after the first."""
    if not terms:
        out.zero_()
        return
    (first, w_first), *rest = terms
    if rest and sum(w for _, w in terms) == 1:  # a running mean: no scaling pass
        (second, w_second), *rest = rest
        total = w_first + w_second
        torch.lerp(first, second, w_second / total, out=out)
        for view, w in rest:
            total += w
            out.lerp_(view, w / total)
        return
    if w_first == 1:
        out.copy_(first)
    else:
        torch.mul(first, w_first, out=out)
    for view, w in rest:
        out.add_(view, alpha=w)


def _empty_like_layout(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """An empty tensor of ``shape`` in the memory layout of ``x`` (NCHW or channels-last)."""
    layout = torch.contiguous_format
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            layout = torch.channels_last
        elif x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            layout = torch.channels_last_3d
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)


def _border_sources(i: int, n: int, k: int, s: int, mode: str) -> dict[int, float]:
    """Output ``i``'s window as weights on the input samples its padded positions hold."""
    before, _ = taps_padding(k)
    weights: dict[int, float] = {}
    for j, w in enumerate(_weights(k)):
        source = _source(i * s + j - before, n, mode)
        if source is not None:
            weights[source] = weights.get(source, 0.0) + w
    return weights


def _filter_axis(x: torch.Tensor, axis: int, k: int, s: int, padding_mode: str) -> torch.Tensor:
    """The ``k``-tap binomial filter along ``axis``, every ``s``-th output."""
    n = x.shape[axis]
    before, after = taps_padding(k)
    mode = feasible_mode(padding_mode, n, max(before, after))
    outputs = (n - 1) // s + 1
    shape = list(x.shape)
    shape[axis] = outputs
    out = _empty_like_layout(x, shape)
    weights = _weights(k)
    lo, hi = interior(n, k, s)
    if hi > lo:
        first = lo * s - before
        terms = [(_along(x, axis, first + j, hi - lo, s), weights[j]) for j in _tap_order(k)]
        _weighted_sum(out.narrow(axis, lo, hi - lo), terms)
    for i in [*range(lo), *range(hi, outputs)]:
        sources = _border_sources(i, n, k, s, mode)
        _weighted_sum(out.narrow(axis, i, 1), [(x.narrow(axis, src, 1), w) for src, w in sources.items()])
    return out


def _filter_axis_adjoint(grad: torch.Tensor, axis: int, n: int, k: int, s: int, padding_mode: str) -> torch.Tensor:
    """The transpose of ``_filter_axis``: the gradient of its ``n`` inputs from that of its outputs."""
    before, after = taps_padding(k)
    mode = feasible_mode(padding_mode, n, max(before, after))
    outputs = grad.shape[axis]
    shape = list(grad.shape)
    shape[axis] = n
    result = _empty_like_layout(grad, shape)
    weights = _weights(k)
    lo, hi = interior(n, k, s)
    # Interior outputs: input p = i * s + j - before received tap j of output i, so the
    # inputs p = phase + t * s read output t + offset[j] for each tap j of their phase.
    for phase in range(min(s, n)):
        offsets = {j: (phase + before - j) // s for j in _tap_order(k) if (phase + before - j) % s == 0}
        count = len(range(phase, n, s))
        t_lo = max([0, *(lo - d for d in offsets.values())])
        t_hi = min([count, *(hi - d for d in offsets.values())])
        if t_hi > t_lo:
            terms = [(grad.narrow(axis, t_lo + d, t_hi - t_lo), weights[j]) for j, d in offsets.items()]
            _weighted_sum(_along(result, axis, phase + t_lo * s, t_hi - t_lo, s), terms)
        else:
            t_lo = t_hi = 0
        for t in [*range(t_lo), *range(t_hi, count)]:
            terms = [(grad.narrow(axis, t + d, 1), weights[j]) for j, d in offsets.items() if lo <= t + d < hi]
            _weighted_sum(result.narrow(axis, phase + t * s, 1), terms)
    # Border outputs: each padded position folds back onto the sample it copied.
    for i in [*range(lo), *range(hi, outputs)]:
        for source, w in _border_sources(i, n, k, s, mode).items():
            result.narrow(axis, source, 1).add_(grad.narrow(axis, i, 1), alpha=w)
    return result
