"""Window padding done ahead of a pool: ceil-mode windows kept at stride 1, and circular padding.

A ``ceil_mode`` pool keeps a last window that hangs over the end of its input, as long as
it starts inside the input or its left padding. Run at stride 1, the pool only computes
windows that fit, so the rewrite first appends ``-inf`` samples to its input: the max
over the valid part of each partial window is then exactly what the strided pool returned,
and the subsampling blur after the pool sees every window the original produced.

With circular padding (``transform(circular_padding=True)``) a pool pads its input
itself, wrapping around: ``pad_window_circularly`` adds the pool's padding on both sides
and the samples its ceil-mode windows need at the end, and the pool then runs with no
padding, at the same output size. ``pad_same_circularly`` does the same for layers that
pad 'same' at run time as TensorFlow does (timm's ``Conv2dSame``): ``(kernel - 1) * dilation
+ 1 - stride`` samples in all, fewer before than after where the total is odd.

Example:
    >>> ceil_mode_padding(size=56, kernel=3, stride=2, padding=0, dilation=1)  # GoogLeNet
    1
    >>> pad_for_ceil_mode(torch.zeros(1, 1, 56, 56), [3, 3], [2, 2], [0, 0], [1, 1]).shape
    torch.Size([1, 1, 57, 57])
    >>> pad_window_circularly(torch.arange(4.0).view(1, 1, 4), [3], [1], [1], [1], False, False)
    tensor([[[3., 0., 1., 2., 3., 0.]]])
    >>> circular_padding(size=8, kernel=2, stride=2, padding=0, dilation=1, ceil_mode=False, at_stride_one=True)
    [0, 1]
    >>> same_padding(size=8, kernel=3, stride=2, dilation=1, at_stride_one=False)  # timm's Conv2dSame
    [0, 1]
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from fxblur.ops.padding import circular_pad


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


def pad_window_circularly(
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    at_stride_one: bool,
) -> torch.Tensor:
    """Pad ``x`` circularly for a window op of this geometry (see ``circular_padding``).

    Written in TorchScript's subset of Python.
    """
    first = x.dim() - len(kernel_size)
    flat: list[int] = []  # F.pad's order: the last axis first
    for i in range(len(kernel_size) - 1, -1, -1):
        size = x.shape[first + i]
        flat += circular_padding(size, kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode, at_stride_one)
    return circular_pad(x, flat)


def circular_padding(
    size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool, at_stride_one: bool
) -> list[int]:
    """[before, after] samples a window op pads by, wrapping around, along an axis of ``size``.

    An op that keeps its ``stride`` pads as it did, plus what its ceil-mode windows reach.
    One that runs at stride 1 before a subsampling of ``stride`` (a blur, a polyphase
    selection) gets every window that subsampling can keep, up to ``size`` of them (all of
    them where the stride divides the size): its output then wraps around like its input.
    """
    if not at_stride_one:
        return [padding, padding + (ceil_mode_padding(size, kernel, stride, padding, dilation) if ceil_mode else 0)]
    span = dilation * (kernel - 1)
    outputs = (size + 2 * padding - span - 1) // stride + 1
    if ceil_mode:
        outputs = -(-(size + 2 * padding - span - 1) // stride) + 1
        if (outputs - 1) * stride >= size + padding:  # the last window must start inside
            outputs -= 1
    return [padding, max(0, min(size, outputs * stride) + span - size - padding)]


torch.fx.wrap("pad_window_circularly")


def pad_same_circularly(
    x: torch.Tensor, kernel_size: list[int], stride: list[int], dilation: list[int], at_stride_one: bool
) -> torch.Tensor:
    """Pad ``x`` circularly as a 'same' layer of this geometry pads it with zeros (see ``same_padding``).

    Written in TorchScript's subset of Python.
    """
    first = x.dim() - len(kernel_size)
    flat: list[int] = []  # F.pad's order: the last axis first
    for i in range(len(kernel_size) - 1, -1, -1):
        flat += same_padding(x.shape[first + i], kernel_size[i], stride[i], dilation[i], at_stride_one)
    return circular_pad(x, flat)


def same_padding(size: int, kernel: int, stride: int, dilation: int, at_stride_one: bool) -> list[int]:
    """[before, after] samples a TensorFlow-style 'same' window op pads by along an axis of ``size``.

    It makes ``ceil(size / stride)`` windows and pads half the samples they need beyond the
    map before it (rounded down), the rest after. Run at stride 1 before a subsampling of
    ``stride``, it gets every window that subsampling can keep, as ``circular_padding`` says.
    """
    span = dilation * (kernel - 1)
    outputs = -(-size // stride)
    total = max((outputs - 1) * stride + span + 1 - size, 0)
    before = total // 2
    if not at_stride_one:
        return [before, total - before]
    return [before, max(0, min(size, outputs * stride) + span - size - before)]


torch.fx.wrap("pad_same_circularly")
