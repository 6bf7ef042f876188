"""The blur as weighted sums of shifted views: no padded copy, no convolution, a gather-form adjoint.

On CPU a depthwise ``F.conv2d`` over an NCHW tensor, after the copy that padding makes,
can cost several times the memory traffic the blur needs. A binomial filter is separable,
so along each axis the blur is a weighted sum of shifted (and, with a stride, strided)
views of its input, written straight into the output: ``k - 1`` elementwise passes for
``k`` taps, which PyTorch vectorises in any memory layout. The filter weights sum to one,
so the sum is built as a running mean of the views with ``lerp`` and needs no final
scaling pass. The few outputs whose window reaches past the border are summed from the
samples the padding mode maps them to, so the input is never copied into a padded buffer.
Along the last axis, one sample per row costs nearly what a whole pass does: there the
border outputs of a stride-1 blur ride along in the same passes, with weights of their
own, where the padding only repeats samples of their window (reflect, replicate;
``_row_means``), and elsewhere each border output shares a pass with its mirror image at
the other end (``_mirror_passes``).

The adjoint (the backward pass) transposes each axis's filter, also in gather form: the
input positions of one phase modulo the stride all read the same taps of the incoming
gradient, so each phase is one weighted sum of views (for stride 2 and 3 taps, half the
positions read one tap and half read two), and the taps that read padding fold back onto
the samples it copied.

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
from functools import cache

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


@cache
def _weights(k: int) -> tuple[float, ...]:
    """The normalised binomial taps (exact in binary floating point)."""
    return tuple(math.comb(k - 1, j) / 2 ** (k - 1) for j in range(k))


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


Row = tuple[int, tuple[tuple[int, float], ...]]  # a target position and its (source position, weight) terms
Pass = tuple[tuple[int, ...], list[tuple[tuple[int, ...], float]]]  # the same for one or two targets at once


def _at(x: torch.Tensor, axis: int, positions: tuple[int, ...]) -> torch.Tensor:
    """The samples of ``x`` at one position, or two ascending ones, along ``axis`` (a view)."""
    if len(positions) == 1:
        return x.narrow(axis, positions[0], 1)
    first, last = positions
    size, stride = list(x.shape), list(x.stride())
    size[axis], stride[axis] = 2, stride[axis] * (last - first)
    return x.as_strided(size, stride, x.storage_offset() + first * x.stride(axis))


def _mirror_passes(rows: list[Row], pair: bool) -> list[Pass]:
    """One pass per row, or (``pair``) one for each pair of rows, the first with the last and so on, that match.

    Border rows come in mirror images at the two ends of an axis. Along an axis whose
    samples are adjacent in memory, a pass over one sample per row costs nearly what a
    pass over all of them does, so each pair takes one pass over two-sample views. Rows
    match when their weights do, term by term, and the positions of every term ascend
    with the targets (one stride for both).

    Example:
        >>> _mirror_passes([(0, ((0, 0.5), (1, 0.5))), (7, ((7, 0.5), (6, 0.5)))], pair=True)
        [((0, 7), [((0, 6), 0.5), ((1, 7), 0.5)])]
    """
    if not pair:
        return [_single(row) for row in rows]
    passes: list[Pass] = []
    for i in range((len(rows) + 1) // 2):
        mirror = len(rows) - 1 - i
        matched = _pair(rows[i], rows[mirror]) if mirror > i else None
        passes.extend([matched] if matched else [_single(rows[j]) for j in sorted({i, mirror})])
    return passes


def _single(row: Row) -> Pass:
    target, terms = row
    return (target,), [((source,), w) for source, w in terms]


def _pair(first: Row, last: Row) -> Pass | None:
    """``first`` and ``last`` as one pass, or ``None`` where they do not match."""
    (target, terms), (mirror_target, mirror_terms) = first, last
    if mirror_target <= target or len(terms) != len(mirror_terms):
        return None
    pairs = list(zip(sorted(terms, key=_by_weight), sorted(mirror_terms, key=_by_weight), strict=True))
    if any(w != mirror_w or mirror < source for (source, w), (mirror, mirror_w) in pairs):
        return None
    return (target, mirror_target), [((source, mirror), w) for (source, w), (mirror, _) in pairs]


def _by_weight(term: tuple[int, float]) -> tuple[float, int]:
    source, weight = term
    return weight, source


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


@cache
def _border_sources(i: int, n: int, k: int, s: int, mode: str, padding_only: bool) -> tuple[tuple[int, float], ...]:
    """Output ``i``'s window (or only its taps in the padding) as (input sample, weight) pairs.

    Example:
        >>> _border_sources(0, 8, 3, 1, "reflect", padding_only=False)  # x[1], x[0], x[1]
        ((1, 0.5), (0, 0.5))
        >>> _border_sources(0, 8, 3, 1, "reflect", padding_only=True)
        ((1, 0.25),)
    """
    before, _ = taps_padding(k)
    weights: dict[int, float] = {}
    for j, w in enumerate(_weights(k)):
        position = i * s + j - before
        source = _source(position, n, mode)
        if source is not None and not (padding_only and 0 <= position < n):
            weights[source] = weights.get(source, 0.0) + w
    return tuple(weights.items())


def _filter_axis(x: torch.Tensor, a: AxisBlur, exact: bool) -> torch.Tensor:
    """The ``a.taps``-tap binomial filter along ``a.axis``, every ``a.stride``-th output."""
    shape = list(x.shape)
    shape[a.axis] = a.outputs
    out = _empty_like_layout(x, shape)
    _by_rows_or_views(out, x, a, exact, adjoint=False)
    return out


def _filter_axis_adjoint(grad: torch.Tensor, a: AxisBlur, exact: bool) -> torch.Tensor:
    """The transpose of ``_filter_axis``: the gradient of its ``a.size`` inputs from that of its outputs."""
    shape = list(grad.shape)
    shape[a.axis] = a.size
    result = _empty_like_layout(grad, shape)
    _by_rows_or_views(result, grad, a, exact, adjoint=True)
    return result


def _by_rows_or_views(out: torch.Tensor, x: torch.Tensor, a: AxisBlur, exact: bool, adjoint: bool) -> None:
    """The filter (or its adjoint) of ``x`` into ``out``: by whole rows where ``_row_plan`` has a plan, or by views."""
    views = _adjoint_views if adjoint else _filter_views
    rows = not exact and a.axis == -1 and a.stride == 1 and x.is_contiguous() and x.numel() >= 3 * a.size
    plan = _row_plan(a.size, a.taps, a.mode, adjoint) if rows else None
    if plan is None:
        views(out, x, a, exact)
        return
    x_rows, out_rows = x.view(-1, a.size), out.view(-1, a.size)
    _filter_rows(out_rows[1:-1], x_rows, plan)
    for edge in (slice(None, 1), slice(-1, None)):  # the rows between read into these two
        views(out_rows[edge], x_rows[edge], a, exact)


def _filter_views(out: torch.Tensor, x: torch.Tensor, a: AxisBlur, exact: bool) -> None:
    """The filter into ``out``: interior outputs from shifted views, then the border outputs."""
    k, s = a.taps, a.stride
    before, _ = taps_padding(k)
    weights = _weights(k)
    lo, hi = interior(a.size, k, s)
    if hi > lo:
        first = lo * s - before
        terms = [(_along(x, a.axis, first + j, hi - lo, s), weights[j]) for j in _tap_order(k)]
        _weighted_sum(out.narrow(a.axis, lo, hi - lo), terms, exact)
    rows = [(i, _border_sources(i, a.size, k, s, a.mode, False)) for i in [*range(lo), *range(hi, a.outputs)]]
    for targets, terms in _mirror_passes(rows, pair=out.stride(a.axis) == 1):
        _weighted_sum(_at(out, a.axis, targets), [(_at(x, a.axis, sources), w) for sources, w in terms], exact)


def _adjoint_views(result: torch.Tensor, grad: torch.Tensor, a: AxisBlur, exact: bool) -> None:
    """The adjoint into ``result``, in gather form: each phase of the inputs from shifted views of ``grad``.

    Every output's taps that read real samples give the gather form, border outputs
    included; only the few inputs near the ends, and the taps that read padding (folded
    back onto the samples it copied), take passes over one or two samples.
    """
    n, k, s, axis = a.size, a.taps, a.stride, a.axis
    before, _ = taps_padding(k)
    columns = result.stride(axis) == 1
    weights = _weights(k)
    # Input p = i * s + j - before receives tap j of output i, so the inputs
    # p = phase + t * s receive output t + offset[j] for each tap j of their phase.
    for phase in range(min(s, n)):
        offsets = {j: (phase + before - j) // s for j in _tap_order(k) if (phase + before - j) % s == 0}
        count = len(range(phase, n, s))
        t_lo = max([0, *(-d for d in offsets.values())])
        t_hi = min([count, *(a.outputs - d for d in offsets.values())])
        if t_hi > t_lo:
            terms = [(grad.narrow(axis, t_lo + d, t_hi - t_lo), weights[j]) for j, d in offsets.items()]
            _weighted_sum(_along(result, axis, phase + t_lo * s, t_hi - t_lo, s), terms, exact)
        else:
            t_lo = t_hi = 0
        edges = [*range(t_lo), *range(t_hi, count)]
        rows = [
            (phase + t * s, tuple((t + d, weights[j]) for j, d in offsets.items() if 0 <= t + d < a.outputs))
            for t in edges
        ]
        for targets, terms in _mirror_passes(rows, pair=columns):
            _weighted_sum(_at(result, axis, targets), [(_at(grad, axis, sources), w) for sources, w in terms], exact)
    lo, hi = interior(n, k, s)
    borders = [*range(lo), *range(hi, a.outputs)]
    folds = [(source, ((i, w),)) for i in borders for source, w in _border_sources(i, n, k, s, a.mode, True)]
    for targets, ((sources, w),) in _mirror_passes(folds, pair=columns):
        _at(result, axis, targets).add_(_at(grad, axis, sources), alpha=w)


@dataclass(frozen=True)
class RowPlan:
    """The filter, or its adjoint, along the last axis at stride 1 as one running mean over whole rows.

    ``offsets``: where each tap reads, relative to the output, in ``_tap_order``; ``means``:
    the ``lerp`` weight of every tap after the first, per output; ``scales``: per output,
    the sum of its weights where they do not all sum to one (the adjoint at reflected borders).
    """

    offsets: tuple[int, ...]
    means: tuple[tuple[float, ...], ...]
    scales: tuple[float, ...] | None


@cache
def _row_plan(n: int, k: int, mode: str, adjoint: bool) -> RowPlan | None:
    """The ``RowPlan`` of a ``k``-tap blur (or ``adjoint``) of ``n`` samples, or ``None``.

    Where padding only repeats samples of the window itself (reflect with an odd number of
    taps, replicate) a border output is its window with other weights: weight 0 for a tap
    that reads padding, more on the tap it copies, and the same holds for the adjoint.
    Then every output is the same running mean over the same shifted views, with weights
    of its own: no border passes. ``None`` where padding reads outside the window
    (circular, reflect with an even number of taps), adds zeros, where there is no mean
    (one tap), or where the axis is shorter than the filter.

    Example:
        >>> _row_plan(4, 3, "reflect", adjoint=False)  # output 0 reads x[1] twice: tap 2, not tap 0
        RowPlan(offsets=(-1, 1, 0), means=((1.0, 0.5, 0.5, 0.0), (0.5, 0.5, 0.5, 0.5)), scales=None)
    """
    if k == 1 or n < k or mode in ("zeros", "circular"):
        return None
    before, _ = taps_padding(k)
    taps = [[0.0] * k for _ in range(n)]  # the weight of tap j in output i
    for i, tap_weights in enumerate(taps):
        for j, w in enumerate(_weights(k)):
            tap = _source(i + j - before, n, mode) - i + before
            if not 0 <= tap < k:
                return None
            tap_weights[tap] += w
    if adjoint:  # input p receives tap j of output p + before - j
        taps = [[taps[p + before - j][j] if 0 <= p + before - j < n else 0.0 for j in range(k)] for p in range(n)]
    order = _tap_order(k)
    totals = [tap_weights[order[0]] for tap_weights in taps]
    means = []
    for j in order[1:]:
        totals = [total + tap_weights[j] for total, tap_weights in zip(totals, taps, strict=True)]
        means.append(tuple(w[j] / total if total else 0.0 for w, total in zip(taps, totals, strict=True)))
    offsets = tuple(before - j if adjoint else j - before for j in order)
    return RowPlan(offsets, tuple(means), None if all(t == 1 for t in totals) else tuple(totals))


def _filter_rows(out: torch.Tensor, x: torch.Tensor, plan: RowPlan) -> None:
    """Rows 1 to R - 2 of ``out`` from the rows of ``x`` (R, size), as ``plan`` says: no border passes.

    Each tap is one view of all the rows, which at the border outputs reads the row before
    or after: those taps get weight 0, or are overwritten (weight 1) later in the running
    mean, and ``lerp`` with weight 0 or 1 gives the other operand exactly when both are
    finite (``SeparableBlur`` recomputes the rare others).
    """
    n = x.shape[-1]

    def tap(offset: int) -> torch.Tensor:
        return x.as_strided(out.shape, (n, 1), x.storage_offset() + n + offset)

    first, second, *rest = plan.offsets
    means = [torch.tensor(m, dtype=x.dtype) for m in plan.means]
    torch.lerp(tap(first), tap(second), means[0], out=out)
    for offset, m in zip(rest, means[1:], strict=True):
        out.lerp_(tap(offset), m)
    if plan.scales:
        out.mul_(torch.tensor(plan.scales, dtype=x.dtype))
