"""The blur and the polyphase ops along any axes: for downsamplers of channels-last maps, or of unknown rank.

A strided slice of a channels-last map (Swin's patch merging, ``x[..., 0::2, 0::2, :]`` on
(B, H, W, C)) subsamples axes that are not the last ones; ``F.interpolate(x, scale_factor=0.5)``
subsamples every spatial axis of whatever rank it is given. These functions move ``axes`` (or,
with ``axes=None``, every axis after the first two) to the end, with the others folded into
(batch, channels), apply ``fxblur.blur``, ``phase_of`` or ``roll_to_phase``, and move them
back. On an NCHW map's own spatial axes they are those ops.

Example:
    >>> x = torch.randn(2, 8, 6, 3)  # (B, H, W, C)
    >>> phase = phase_along(x, (-3, -2), [2, 2])
    >>> moved = roll_along(x, (-3, -2), phase)
    >>> torch.equal(moved, torch.stack([torch.roll(s, (-int(p[0]), -int(p[1])), (0, 1)) for s, p in zip(x, phase)]))
    True
    >>> blur_along(torch.randn(1, 2, 5, 5, 5), None, 3, "circular").shape
    torch.Size([1, 2, 5, 5, 5])
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor

from fxblur.ops.blur import blur
from fxblur.ops.polyphase import phase_of, roll_to_phase


def blur_along(x: Tensor, axes: tuple[int, ...] | None, taps: int | list[int], padding_mode: str) -> Tensor:
    """``fxblur.blur`` at stride 1 along ``axes`` (``None``: every spatial axis of an (N, C, *spatial) map)."""
    moved, back = _to_trailing(x, axes)
    return back(blur(moved, 1, taps, padding_mode))


torch.fx.wrap("blur_along")


def phase_along(x: Tensor, axes: tuple[int, ...] | None, stride: int | list[int], norm: str = "l2") -> Tensor:
    """``phase_of`` along ``axes``: int64 (N, number of axes); ``stride`` one per axis, or one for all."""
    moved, _ = _to_trailing(x, axes)
    dims = moved.dim() - 2
    strides = [stride] if isinstance(stride, int) else list(stride)
    return phase_of(moved, strides * dims if len(strides) == 1 else strides, norm)


torch.fx.wrap("phase_along")


def roll_along(x: Tensor, axes: tuple[int, ...] | None, phase: Tensor) -> Tensor:
    """``roll_to_phase`` along ``axes``: each sample rolled by ``-phase``."""
    moved, back = _to_trailing(x, axes)
    return back(roll_to_phase(moved, phase))


torch.fx.wrap("roll_along")


def _to_trailing(x: Tensor, axes: tuple[int, ...] | None):
    """``x`` as (N, C', *axes) and the function that turns a result of that layout back into ``x``'s."""
    if axes is None:
        return x, lambda y: y
    count = len(axes)
    positions = [a % x.dim() for a in axes]
    if positions == list(range(x.dim() - count, x.dim())) and x.dim() - count == 2:
        return x, lambda y: y
    trailing = list(range(x.dim() - count, x.dim()))
    moved = torch.movedim(x, positions, trailing)
    lead = list(moved.shape[: x.dim() - count])
    folded = moved.reshape([lead[0] if lead else 1, -1, *moved.shape[x.dim() - count :]])

    def back(y: Tensor) -> Tensor:
        return torch.movedim(y.reshape(lead + list(y.shape[2:])), trailing, positions)

    return folded, back
