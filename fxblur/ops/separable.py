"""The blur as weighted sums of shifted views: no padded copy, no convolution, a gather-form adjoint.

On CPU a depthwise ``F.conv2d`` over an NCHW tensor, after the copy that padding makes,
can cost several times the memory traffic the blur needs. A binomial filter is separable,
so along each axis the blur is a weighted sum of shifted (and, with a stride, strided)
views of its input, written straight into the output: ``k - 1`` elementwise passes for
``k`` taps, which PyTorch vectorises in any memory layout. The filter weights sum to one,
so the sum is built as a running mean of the views with ``lerp`` and needs no final
scaling pass. The few outputs whose window reaches past the border are summed from the
samples the padding mode maps them to, so the input is never copied into a padded buffer.

The adjoint (the backward pass) transposes each axis's filter, also in gather form: the
input positions of one phase modulo the stride all read the same taps of the incoming
gradient, so each phase is one weighted sum of views (for stride 2 and 3 taps, half the
positions read one tap and half read two), and padded positions fold back onto the
samples they copied.

Derivatives: the blur is linear, so ``SeparableBlur`` is a ``LinearMap``
(``fxblur.ops.eager.apply_linear``): its backward is the adjoint, the adjoint's backward
is the blur, and the forward-mode derivative is the blur of the tangent. Every order
(Hessians, gradient penalties, ``torch.func``) is exact, as through a convolution.

Infinities: ``lerp`` computes ``a + w * (b - a)``, so a running mean turns ``-inf`` into
NaN (``-inf + w * inf``) and overflows on values beyond half the dtype's range. One sum
over the result tells whether anything came out non-finite; only then is it recomputed
with plain multiply-adds, which give what the definition gives: ``±inf`` where a window's
infinities share a sign, NaN where they do not or where it holds a NaN.

Example:
    >>> x = torch.randn(2, 3, 9, 8)
    >>> y = separable_blur(x, taps=(3, 3), stride=(2, 2), padding_mode="reflect")
    >>> torch.allclose(y, fxblur.blur(x, 2, 3, "reflect"), atol=1e-6)
    True
    >>> separable_blur(torch.tensor([[[0.0, float("-inf"), 4.0]]]), taps=(3,), stride=(1,), padding_mode="zeros")
    tensor([[[-inf, -inf, -inf]]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fxblur.ops.eager import apply_linear
from fxblur.ops.padding import feasible_mode, interior, taps_padding


def separable_blur(x: torch.Tensor, taps: Sequence[int], stride: Sequence[int], padding_mode: str) -> torch.Tensor:
    """Blur the last ``len(taps)`` axes of ``x``; differentiable to every order. See the module docstring."""
    blur = SeparableBlur.of(x.shape, taps, stride, padding_mode)
    return apply_linear(blur, x) if blur.axes else x.clone()


@dataclass(frozen=True)
class AxisBlur:
    """One filtered axis: ``taps`` binomial taps at ``stride`` over ``size`` samples, padded as ``mode``.

    ``axis`` counts from the end (-1 is the last axis), so that the same blur applies to a
    tensor with more leading axes (``torch.func.vmap`` adds one); ``mode`` is one this axis
    can take (``feasible_mode``).
    """

    axis: int
    size: int
    taps: int
    stride: int
    mode: str

    @property
    def outputs(self) -> int:
        return (self.size - 1) // self.stride + 1


@dataclass(frozen=True)
class SeparableBlur:
    """The blur of one input geometry as a linear map, or (``adjoint=True``) its transpose.

    Example:
        >>> blur = SeparableBlur.of((1, 1, 4), taps=(3,), stride=(2,), padding_mode="zeros")
        >>> blur(torch.tensor([[[4.0, 8.0, 4.0, 0.0]]]))
        tensor([[[4., 4.]]])
        >>> blur.transpose(torch.tensor([[[4.0, 4.0]]]))
        tensor([[[2., 2., 2., 1.]]])
    """

    axes: tuple[AxisBlur, ...]
    adjoint: bool = False

    @classmethod
    def of(cls, shape: Sequence[int], taps: Sequence[int], stride: Sequence[int], padding_mode: str) -> SeparableBlur:
        """The blur of the last ``len(taps)`` axes of a tensor of ``shape``; it skips axes it leaves as they are."""
        axes = []
        for axis, k, s in zip(range(-len(taps), 0), taps, stride, strict=True):
            size = shape[axis]
            if k > 1 or s > 1:
                axes.append(AxisBlur(axis, size, k, s, feasible_mode(padding_mode, size, max(taps_padding(k)))))
        return cls(tuple(axes))

    @property
    def transpose(self) -> SeparableBlur:
        return replace(self, adjoint=not self.adjoint)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = self._run(v, exact=False)
        if self._may_run_means and not bool(out.sum().isfinite()):
            out = self._run(v, exact=True)
        return out

    @property
    def _may_run_means(self) -> bool:
        """Whether some weighted sum may be a running mean: the filter's, not the adjoint's at a stride.

        (At a stride every phase of the adjoint reads only some of the taps: its weights add up to less than one.)
        """
        return any(a.taps > 1 and (a.stride == 1 or not self.adjoint) for a in self.axes)

    def _run(self, v: torch.Tensor, exact: bool) -> torch.Tensor:
        if self.adjoint:
            for axis in reversed(self.axes):
                v = _filter_axis_adjoint(v, axis, exact)
        else:
            for axis in self.axes:
                v = _filter_axis(v, axis, exact)
        return v


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


def _weighted_sum(out: torch.Tensor, terms: list[tuple[torch.Tensor, float]], exact: bool) -> None:
    """``out = sum(weight * view)``: one elementwise pass per term after the first.

    Weights that sum to one make a running mean (``lerp``, no scaling pass) unless ``exact``,
    which multiplies and adds (see the module docstring).
    """
    if not terms:
        out.zero_()
        return
    (first, w_first), *rest = terms
    if rest and not exact and sum(w for _, w in terms) == 1:
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


def _filter_axis(x: torch.Tensor, a: AxisBlur, exact: bool) -> torch.Tensor:
    """The ``a.taps``-tap binomial filter along ``a.axis``, every ``a.stride``-th output."""
    n, k, s, axis, mode, outputs = a.size, a.taps, a.stride, a.axis, a.mode, a.outputs
    before, _ = taps_padding(k)
    shape = list(x.shape)
    shape[axis] = outputs
    out = _empty_like_layout(x, shape)
    weights = _weights(k)
    lo, hi = interior(n, k, s)
    if hi > lo:
        first = lo * s - before
        terms = [(_along(x, axis, first + j, hi - lo, s), weights[j]) for j in _tap_order(k)]
        _weighted_sum(out.narrow(axis, lo, hi - lo), terms, exact)
    for i in [*range(lo), *range(hi, outputs)]:
        sources = _border_sources(i, n, k, s, mode)
        _weighted_sum(out.narrow(axis, i, 1), [(x.narrow(axis, src, 1), w) for src, w in sources.items()], exact)
    return out


def _filter_axis_adjoint(grad: torch.Tensor, a: AxisBlur, exact: bool) -> torch.Tensor:
    """The transpose of ``_filter_axis``: the gradient of its ``a.size`` inputs from that of its outputs."""
    n, k, s, axis, mode, outputs = a.size, a.taps, a.stride, a.axis, a.mode, a.outputs
    before, _ = taps_padding(k)
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
            _weighted_sum(_along(result, axis, phase + t_lo * s, t_hi - t_lo, s), terms, exact)
        else:
            t_lo = t_hi = 0
        for t in [*range(t_lo), *range(t_hi, count)]:
            terms = [(grad.narrow(axis, t + d, 1), weights[j]) for j, d in offsets.items() if lo <= t + d < hi]
            _weighted_sum(result.narrow(axis, phase + t * s, 1), terms, exact)
    # Border outputs: each padded position folds back onto the sample it copied.
    for i in [*range(lo), *range(hi, outputs)]:
        for source, w in _border_sources(i, n, k, s, mode).items():
            result.narrow(axis, source, 1).add_(grad.narrow(axis, i, 1), alpha=w)
    return result
