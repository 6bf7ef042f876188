"""Ceil-mode max pools run at stride 1 without losing their last, partial windows.

A ``ceil_mode`` pool keeps a last window that hangs over the end of its input, as long as
it starts inside the input or its left padding. Run at stride 1, the pool only computes
windows that fit, so the rewrite first appends ``-inf`` samples to its input: the max
over the valid part of each partial window is then exactly what the strided pool returned,
and the subsampling blur after the pool sees every window the original produced.

Example:
    >>> ceil_mode_padding(size=56, kernel=3, stride=2, padding=0, dilation=1)  # GoogLeNet
    1
    >>> pad_for_ceil_mode(torch.zeros(1, 1, 56, 56), (3, 3), (2, 2), (0, 0), (1, 1)).shape
    torch.Size([1, 1, 57, 57])
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F


def ceil_mode_padding(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Samples to append to an input of ``size`` so a stride-1 pool yields every ceil-mode window."""
    span = dilation * (kernel - 1)
    windows = -(-(size + 2 * padding - span - 1) // stride) + 1  # PyTorch's ceil-mode output size
    if (windows - 1) * stride >= size + padding:  # the last window must start inside
        windows -= 1
    return max(0, (windows - 1) * stride + 1 - (size + 2 * padding - span))


def pad_for_ceil_mode(
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """Append the ``-inf`` samples a max pool of this geometry needs (see ``ceil_mode_padding``).

    Written in TorchScript's subset of Python: blurred max pools run it under ``torch.jit.script``.
    """
    first = x.dim() - len(kernel_size)
    flat: list[int] = []  # F.pad's order: the last axis first
    for i in range(len(kernel_size) - 1, -1, -1):
        flat += [0, ceil_mode_padding(x.shape[first + i], kernel_size[i], stride[i], padding[i], dilation[i])]
    if max(flat) == 0:
        return x
    return F.pad(x, flat, value=float("-inf"))


torch.fx.wrap("pad_for_ceil_mode")  # re-tracing a rewritten graph keeps it one call
