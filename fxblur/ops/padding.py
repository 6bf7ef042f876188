"""Padding for the blur: four modes, and a fallback for maps too small to reflect or wrap.

Example:
    >>> pad(torch.arange(3.0).view(1, 1, 3), [(1, 1)], "reflect")
    tensor([[[1., 0., 1., 2., 1.]]])
    >>> pad(torch.ones(1, 1, 1), [(1, 1)], "reflect")  # one sample cannot be reflected
    tensor([[[1., 1., 1.]]])
    >>> feasible_mode("reflect", size=1, amount=1)
    'replicate'
    >>> taps_padding(3), taps_padding(4)
    ((1, 1), (1, 2))
    >>> interior(size=8, taps=3, stride=2)  # outputs 1 to 3 of 4 never read padding
    (1, 4)
    >>> circular_pad(torch.arange(3.0).view(1, 1, 3), [4, 5])  # wraps around more than once
    tensor([[[2., 0., 1., 2., 0., 1., 2., 0., 1., 2., 0., 1.]]])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PADDING_MODES = ("reflect", "replicate", "zeros", "circular")


def check_padding_mode(padding_mode: str) -> None:
    """``ValueError`` unless ``padding_mode`` is one the blur supports."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")


def pad(x: torch.Tensor, padding: list[tuple[int, int]], padding_mode: str) -> torch.Tensor:
    """Pad the last ``len(padding)`` axes of ``x`` by (before, after) samples each.

    ``"circular"`` wraps around as often as it must (``circular_pad``). Axes too short for
    ``"reflect"`` (padding >= size) are padded by replication instead. Axes that share a
    mode are padded in one copy. Written in TorchScript's subset of Python, for ``Blur``
    under ``torch.jit.script``.
    """
    if padding_mode == "circular":
        flat: list[int] = []
        for i in range(len(padding) - 1, -1, -1):
            flat += [padding[i][0], padding[i][1]]
        return circular_pad(x, flat)
    first = x.dim() - len(padding)
    modes = [feasible_mode(padding_mode, x.shape[first + i], max(padding[i])) for i in range(len(padding))]
    for mode in ("reflect", "replicate", "zeros", "circular"):
        flat: list[int] = []  # F.pad's order: the last axis first
        for i in range(len(padding) - 1, -1, -1):
            before, after = padding[i] if modes[i] == mode else (0, 0)
            flat += [before, after]
        if max(flat) > 0:
            x = F.pad(x, flat, mode="constant" if mode == "zeros" else mode)
    return x


def circular_pad(x: torch.Tensor, flat: list[int]) -> torch.Tensor:
    """``F.pad(x, flat, mode="circular")`` (``flat`` in its order: the last axis first), for any amounts.

    Where an amount exceeds its axis (a dilated conv on a small map), or where ``F.pad`` takes
    no padding of so few axes (one axis of a 4-D map), the axis is indexed modulo its size,
    wrapping around as often as needed; elsewhere ``F.pad`` pads, in one copy.
    Every padded sample is a copy of one input sample: the padding commutes bitwise with a
    circular shift. Written in TorchScript's subset of Python.
    """
    axes = len(flat) // 2
    small = x.dim() - axes <= 2  # F.pad pads the last 1-3 axes of a map with at most 2 others
    for i in range(axes):
        if max(flat[2 * i], flat[2 * i + 1]) > x.shape[x.dim() - 1 - i]:
            small = False
    if small:
        return F.pad(x, flat, mode="circular") if max(flat) > 0 else x
    for i in range(axes):
        before, after = flat[2 * i], flat[2 * i + 1]
        axis = x.dim() - 1 - i
        size = x.shape[axis]
        index = torch.remainder(torch.arange(-before, size + after, device=x.device), size)
        x = x.index_select(axis, index)
    return x


def feasible_mode(mode: str, size: int, amount: int) -> str:
    """``mode``, or ``"replicate"`` where an axis of ``size`` is too short to reflect by ``amount``."""
    if mode == "reflect" and amount >= size:
        return "replicate"
    return mode


def taps_padding(taps: int) -> tuple[int, int]:
    """(before, after) padding of an axis filtered with ``taps`` taps: ``taps - 1`` in all."""
    return (taps - 1) // 2, taps - 1 - (taps - 1) // 2


def interior(size: int, taps: int, stride: int) -> tuple[int, int]:
    """The outputs ``[lo, hi)`` of a blur along an axis of ``size`` whose window reads no padding."""
    before, _ = taps_padding(taps)
    outputs = (size - 1) // stride + 1
    lo = min(outputs, -(-before // stride))
    hi = min(outputs, (size - taps + before) // stride + 1) if size - taps + before >= 0 else 0
    return lo, max(lo, hi)
