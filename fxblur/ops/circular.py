"""Convs and padding layers that pad circularly by any amount: PyTorch's circular padding wraps around once at most.

A dilated conv pads by more than a small map is wide (DeepLab's ASPP at 12, 24 and 36 on an
8x8 map); ``F.pad(mode="circular")`` refuses that. A conv of these classes pads with
``fxblur.ops.padding.circular_pad`` where ``padding_mode`` is ``"circular"``, which indexes
modulo the size, and otherwise as PyTorch's does. They are still ``nn.Conv1d/2d/3d``, with
the same parameters under the same names, and script with TorchScript. ``CircularPad`` is
the padding layer (``nn.CircularPad2d``) that wraps around so: circular padding makes an
explicit padding layer ahead of a conv or pool one (timm's BiT stem pads with
``nn.ConstantPad2d`` before its max pool).

Example:
    >>> conv = circular_conv(nn.Conv2d(2, 2, 3, padding=12, dilation=12))
    >>> type(conv).__name__, conv.padding_mode, conv(torch.randn(1, 2, 8, 8)).shape
    ('CircularConv2d', 'circular', torch.Size([1, 2, 8, 8]))
    >>> CircularPad((1, 2))(torch.arange(3.0).view(1, 1, 3))
    tensor([[[2., 0., 1., 2., 0., 1.]]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fxblur.ops.padding import circular_pad


class CircularPaddingConv:
    """What the convs of this module share: their padding, done before the conv (``_padded``)."""


def _padded(input: Tensor, mode: str, flat: list[int]) -> Tensor:
    """``input`` padded as a conv with ``padding_mode`` ``mode`` and these paddings (F.pad's order) pads it."""
    if mode == "circular":
        return circular_pad(input, flat)
    return F.pad(input, flat, mode=mode)


class CircularConv1d(CircularPaddingConv, nn.Conv1d):
    """``nn.Conv1d`` padding circularly by any amount."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode == "zeros":
            return F.conv1d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.conv1d(
            _padded(input, self.padding_mode, list(self._reversed_padding_repeated_twice)),
            weight,
            bias,
            self.stride,
            0,
            self.dilation,
            self.groups,
        )


class CircularConv2d(CircularPaddingConv, nn.Conv2d):
    """``nn.Conv2d`` padding circularly by any amount."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode == "zeros":
            return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.conv2d(
            _padded(input, self.padding_mode, list(self._reversed_padding_repeated_twice)),
            weight,
            bias,
            self.stride,
            0,
            self.dilation,
            self.groups,
        )


class CircularConv3d(CircularPaddingConv, nn.Conv3d):
    """``nn.Conv3d`` padding circularly by any amount."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode == "zeros":
            return F.conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.conv3d(
            _padded(input, self.padding_mode, list(self._reversed_padding_repeated_twice)),
            weight,
            bias,
            self.stride,
            0,
            self.dilation,
            self.groups,
        )


CIRCULAR_CLASSES = {nn.Conv1d: CircularConv1d, nn.Conv2d: CircularConv2d, nn.Conv3d: CircularConv3d}


def circular_conv(conv: nn.Module) -> nn.Module:
    """``conv`` (one of torch.nn's own conv classes) padding circularly by any amount, in place: pass a copy."""
    conv.__class__ = CIRCULAR_CLASSES[type(conv)]
    conv.padding_mode = "circular"
    return conv


# torch.nn's padding layers: those that pad otherwise, and those that wrap around (once at most).
OTHER_PADDING_LAYERS = tuple(
    getattr(nn, f"{kind}Pad{dims}d") for kind in ("Constant", "Zero", "Reflection", "Replication") for dims in (1, 2, 3)
)
CIRCULAR_PADDING_LAYERS = (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)


class CircularPad(nn.Module):
    """Pads its input circularly by ``padding`` (``F.pad``'s order: the last axis first), by any amount."""

    def __init__(self, padding: Sequence[int]) -> None:
        super().__init__()
        self.padding = tuple(padding)

    def forward(self, input: Tensor) -> Tensor:
        return circular_pad(input, list(self.padding))

    def extra_repr(self) -> str:
        return f"{self.padding}"


def circular_padding_layer(layer: nn.Module) -> nn.Module:
    """``layer`` (a torch.nn padding layer) padding circularly by the same amounts, in place: pass a copy."""
    layer.__class__ = CircularPad
    layer.__dict__.pop("value", None)  # a constant padding's fill value
    return layer
