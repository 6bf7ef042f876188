"""Adaptive polyphase sampling (APS): per sample, keep the subsampling grid with the largest norm.

Subsampling by a stride ``s`` keeps one of ``s`` polyphase components along each axis; a
fixed stride always keeps the one that starts at 0. Here components are circular: component
``p`` (one offset per spatial axis, ``0 <= p_i < s_i``) is ``roll(x, -p)[..., ::s_0, ::s_1]``.
It has ``ceil(size / s)`` samples along each axis, odd sizes included: where ``s`` does not
divide the size, the last sample wraps around to the start.

APS (Chaman & Dokmanić, CVPR 2021) keeps, per sample, the component with the largest norm.
Where the stride divides the size, a circular shift by ``t`` turns component ``p`` into
component ``(p + t) % s``, itself rolled by ``(p + t) // s``: the shift only permutes the
components and rolls them, so their norms move with them, the largest one is still picked,
and the output is the unshifted output, rolled. A network that subsamples this way at every
stride, pads circularly and pools globally at the end is exactly invariant to circular shifts.

The ops are split so that a graph rewrite can place them on either side of a strided op:

- ``phase_of`` chooses the component: int64 offsets of shape (N, number of spatial axes).
- ``roll_to_phase`` rolls each sample by ``-phase``, so that a strided op that follows (a conv
  or pool with circular padding) reads component ``phase`` of its stride-1 output: the phase
  chosen on the op's input, at the cost of the original op plus one norm and one roll.
- ``select_phase`` takes component ``phase`` itself, after a stride-1 op: the published form.

``phase_of`` first reduces the channels to what every position adds to the norm (its square,
absolute value or largest absolute value): a shifted input gives every position the same
bits there. That map, C times smaller, is scaled by its largest value and rounded to
integers of 40 bits, and each component gathers its positions (wrapping around at
odd sizes: no padded copy of the input). Its norm is then an integer sum, which does not
depend on the order of its terms: a shifted input, whose components hold the same values
in another order, gives every component exactly the norm its shifted twin had, and the
choice follows the shift even where two components' norms agree to the last bit of a
float sum. Where norms tie exactly (the components of a flat shape, of a saturated region,
of an image resized up), the choice falls to statistics of each component that a roll of
it does not change but a mirror image does (``_component_keys``), and only where those tie
too (components that are one and the same up to a roll, which any choice serves alike) to
the first in row-major order. For the choice to follow the shift the map must itself
commute bitwise with shifts, as circular blurs and convolutions do.

``roll_to_phase`` and ``select_phase`` are one gather each: per sample, the flat spatial
index that every output sample reads, computed from the offsets with integer arithmetic and
expanded over the channels as a view; a channels-last input instead takes whole rows of
channels and stays channels-last. A roll is a permutation, so its backward rolls back with
one gather too (``_Roll``); the rest are plain differentiable PyTorch ops. Autograd (of any
order), forward-mode AD, ``vmap``, ``torch.compile``, ``torch.export`` and TorchScript go
through all three.

The norms are ``"l2"`` (the paper's; compared as sums of squares, which order the components
as the norms do), ``"l1"`` and ``"linf"``, over channels and space.

Example:
    >>> x = torch.zeros(1, 1, 4, 4)
    >>> x[0, 0, 1, 2] = 5.0
    >>> phase = phase_of(x, [2, 2])
    >>> phase
    tensor([[1, 0]])
    >>> select_phase(x, phase, [2, 2])
    tensor([[[[0., 5.],
              [0., 0.]]]])
    >>> torch.equal(roll_to_phase(x, phase)[..., ::2, ::2], select_phase(x, phase, [2, 2]))
    True

    Shifted by one pixel down and right, the input yields the same component, rolled:

    >>> shifted = torch.roll(x, (1, 1), (2, 3))
    >>> phase_of(shifted, [2, 2])
    tensor([[0, 1]])
    >>> select_phase(shifted, phase_of(shifted, [2, 2]), [2, 2])
    tensor([[[[0., 0.],
              [0., 5.]]]])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor

NORMS = ("l2", "l1", "linf")


def phase_of(x: Tensor, stride: list[int], norm: str = "l2") -> Tensor:
    """Per sample, the offsets of the component with the largest norm: int64 (N, len(stride)).

    ``stride`` applies to the last ``len(stride)`` axes of ``x`` (N, C, *spatial), 1 to 3 of
    them; axes with stride 1 get offset 0. ``norm`` is ``"l2"``, ``"l1"`` or ``"linf"``, over
    channels and space. Exact ties are broken by statistics that follow a shift (module
    docstring); the first component in row-major order of the offsets wins the rest.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0, 3.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 2.0, 0.0]]])
        >>> phase_of(x, [2])  # 5 samples: components [x0, x2, x4] and [x1, x3, x0]
        tensor([[0],
                [1]])
    """
    _check_norm(norm)
    _check_stride(x, stride)
    first_largest = _first_largest(_component_keys(x.detach(), stride, norm))
    offsets: list[Tensor] = []
    later = 1
    for i in range(len(stride) - 1, -1, -1):  # unravel the row-major index, last axis first
        offsets.insert(0, first_largest // later % stride[i])
        later = later * stride[i]
    return torch.stack(offsets, 1)


torch.fx.wrap("phase_of")  # re-tracing a rewritten graph keeps it one call


def roll_to_phase(x: Tensor, phase: Tensor) -> Tensor:
    """Each sample rolled by ``-phase`` along the last ``phase.shape[1]`` axes; same shape as ``x``.

    ``out[n, c, i, j] = x[n, c, (i + p0) % H, (j + p1) % W]`` with ``(p0, p1) = phase[n]``: a
    strided op applied to it reads component ``phase`` (any integer offsets work).

    Example:
        >>> roll_to_phase(torch.arange(8.0).view(2, 1, 4), torch.tensor([[1], [-1]]))
        tensor([[[1., 2., 3., 0.]],
        <BLANKLINE>
                [[7., 4., 5., 6.]]])
    """
    _check_phase(x, phase)
    # TorchScript compiles only this branch; dynamo traces no custom jvp, and fuses the gathers itself
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _read_grid(x, phase, [1] * phase.shape[1])
    else:
        return _Roll.apply(x, phase)


torch.fx.wrap("roll_to_phase")


class _Roll(torch.autograd.Function):
    """A per-sample roll is a permutation: its adjoint is the roll back, one gather too (autograd's is a scatter)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, phase: Tensor) -> Tensor:
        return _read_grid(x, phase, [1] * phase.shape[1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.phase = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _Roll.apply(grad, -ctx.phase), None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: Any) -> Tensor:
        return _Roll.apply(tangent, ctx.phase)


def select_phase(x: Tensor, phase: Tensor, stride: list[int]) -> Tensor:
    """Component ``phase`` of each sample: ``roll_to_phase(x, phase)[..., ::s0, ::s1]``, computed directly.

    ``ceil(size / s)`` samples per axis; the roll is never materialised.

    Example:
        >>> select_phase(torch.arange(5.0).view(1, 1, 5), torch.tensor([[1]]), [2])
        tensor([[[1., 3., 0.]]])
    """
    _check_phase(x, phase)
    _check_stride(x, stride)  # with _check_phase: one stride per offset
    return _read_grid(x, phase, stride)


torch.fx.wrap("select_phase")


def _component_keys(x: Tensor, stride: list[int], norm: str) -> Tensor:
    """What decides between the components: int64 (N, prod(stride), keys), compared in order of the keys.

    Components come in row-major order of their offsets. The contributions of the positions
    (``_contributions``) are scaled by each sample's largest one and rounded to integers of
    40 bits (a component of up to 2**22 positions sums without overflow); then, per
    component: its norm (the sum; for ``"linf"`` the largest value, then the sum), and for
    each spatial axis the sum over its positions of ``q[i] * q[i + 1] ** 2``, with ``q`` the
    values coarsened to 10 bits and ``i + 1`` the next position along that axis, wrapping
    around the component. A roll of the component leaves every key as it was; a mirror image
    of it changes the last ones. Integer sums do not depend on the order of their terms. The
    gathers depend on no size, so ``torch.export`` keeps sizes dynamic.
    """
    contributions = _contributions(x, norm).double()  # (N, *spatial), C times smaller than x
    dims = len(stride)
    top = contributions.flatten(1).amax(1).clamp_min(2.2250738585072014e-308)  # a map of zeros stays zeros
    scaled = contributions / top.view([-1] + [1] * dims)
    quantised = torch.round(scaled * 1099511627776.0).long()  # 2**40 (TorchScript takes no global constants)
    coarse = torch.div(quantised, 1073741824, rounding_mode="floor")  # 2**30: 10 bits are left
    components = [quantised]
    coarse_components = [coarse]
    for i, s in enumerate(stride):
        size = quantised.shape[1 + i]
        first = torch.arange((size + s - 1) // s, device=x.device) * s
        offsets = [(first + p) % size for p in range(s)]
        components = _split(components, 1 + i, offsets)
        coarse_components = _split(coarse_components, 1 + i, offsets)
    spatial = [1 + i for i in range(dims)]
    keys: list[Tensor] = []
    if norm == "linf":
        keys.append(torch.stack([each.amax(spatial) for each in components], 1))
    keys.append(torch.stack([each.sum(spatial) for each in components], 1))
    for axis in spatial:
        lags = [(each * torch.roll(each, -1, axis).square()).sum(spatial) for each in coarse_components]
        keys.append(torch.stack(lags, 1))
    return torch.stack(keys, 2)


def _split(maps: list[Tensor], axis: int, offsets: list[Tensor]) -> list[Tensor]:
    """Each map's components along ``axis``, one per index list of ``offsets``, map by map."""
    split: list[Tensor] = []
    for each in maps:
        for at in offsets:
            split.append(each.index_select(axis, at))
    return split


def _first_largest(keys: Tensor) -> Tensor:
    """Per sample, the first component whose keys are the largest, compared key by key: int64 (N,)."""
    best = torch.ones(keys.shape[:2], dtype=torch.bool, device=keys.device)
    for k in range(keys.shape[2]):
        key = keys[:, :, k].masked_fill(~best, -1)  # every key is a sum or a maximum of integers >= 0
        best = best & (key == key.amax(1, keepdim=True))
    return best.to(torch.int64).argmax(1)  # the first of the components left


def _contributions(x: Tensor, norm: str) -> Tensor:
    """What each position adds to the ``norm`` of its component, over all channels: (N, *spatial).

    Sums of squares (``"l2"``), of absolute values (``"l1"``), or the largest absolute value
    (``"linf"``); float32 for half-precision inputs.
    """
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        x = x.float()
    if norm == "l2":
        return x.square().sum(1)
    if norm == "l1":
        return x.abs().sum(1)
    return torch.maximum(x.amax(1), x.amin(1).neg())


def _check_norm(norm: str) -> None:
    if norm != "l2" and norm != "l1" and norm != "linf":
        raise ValueError(f"unknown norm '{norm}'; expected one of 'l2', 'l1', 'linf'")


def _check_stride(x: Tensor, stride: list[int]) -> None:
    if len(stride) not in (1, 2, 3) or x.dim() != len(stride) + 2:
        raise ValueError(
            f"expected (N, C, *spatial) input with one stride per spatial axis (1 to 3 of them), "
            f"got a {x.dim()}-d input and {len(stride)} strides"
        )
    for s in stride:
        if s < 1:
            raise ValueError(f"strides must be at least 1, got {stride}")


def _check_phase(x: Tensor, phase: Tensor) -> None:
    if (
        phase.dim() != 2
        or phase.shape[1] not in (1, 2, 3)
        or phase.shape[0] != x.shape[0]
        or x.dim() != phase.shape[1] + 2
    ):
        raise ValueError(
            f"expected phase of shape (N, spatial axes) for (N, C, *spatial) input, with 1 to 3 spatial axes; "
            f"got phase of shape {list(phase.shape)} for input of shape {list(x.shape)}"
        )
    if phase.is_floating_point() or phase.is_complex() or phase.dtype == torch.bool:
        raise ValueError(f"phase must hold integer offsets, got {phase.dtype}")


def _read_grid(x: Tensor, phase: Tensor, stride: list[int]) -> Tensor:
    """``out[n, c, k, l] = x[n, c, (p0 + k * s0) % H, (p1 + l * s1) % W]``, one gather."""
    sizes = x.shape[2:]
    grid = [(sizes[i] + stride[i] - 1) // stride[i] for i in range(len(stride))]
    index = _flat_index(phase, sizes, stride)  # (N, prod(grid))
    n, c = x.shape[0], x.shape[1]
    if not x.is_contiguous() and x.movedim(1, -1).is_contiguous():  # channels-last: copy rows of channels
        rows = x.movedim(1, -1).flatten(1, -2)  # (N, H * W, C), a view
        first_row = torch.arange(n, device=x.device).unsqueeze(1) * rows.shape[1]
        out = rows.flatten(0, 1).index_select(0, (index + first_row).flatten())
        return out.view(n, index.shape[1], c).unflatten(1, grid).movedim(-1, 1)
    flat = x.flatten(2)  # (N, C, H * W)
    return flat.gather(2, index.unsqueeze(1).expand(n, c, index.shape[1])).unflatten(2, grid)


def _flat_index(phase: Tensor, sizes: list[int], stride: list[int]) -> Tensor:
    """Per sample, the row-major flat index into the spatial axes that every grid point reads: (N, prod(grid))."""
    index = _along(phase, sizes, stride, 0)
    for i in range(1, len(stride)):  # no axis of size 1 to flatten: torch.export keeps the sizes dynamic
        index = (index.unsqueeze(2) * sizes[i] + _along(phase, sizes, stride, i).unsqueeze(1)).flatten(1)
    return index


def _along(phase: Tensor, sizes: list[int], stride: list[int], i: int) -> Tensor:
    """Per sample, the indices along axis ``i`` that the grid reads: (N, ceil(size / stride))."""
    return (torch.arange(0, sizes[i], stride[i], device=phase.device) + phase[:, i : i + 1].long()) % sizes[i]
