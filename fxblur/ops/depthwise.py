"""The blur as padding and a depthwise convolution: for layouts and devices where convolutions are fast.

This is the blur as its definition reads, and what ``fxblur.blur`` runs on channels-last
tensors (oneDNN vectorises across channels), on CUDA (cuDNN), in half precision, on
``meta`` tensors, under ``torch.compile`` (which fuses the padding into the convolution)
and in TorchScript.

Example:
    >>> x = torch.ones(2, 3, 9, 8)
    >>> kernel = fxblur.ops.filters.binomial_kernel((3, 3), torch.float32)
    >>> depthwise_blur(x, kernel, stride=(2, 2), padding_mode="reflect").shape
    torch.Size([2, 3, 5, 4])
    >>> depthwise_blur(x, kernel, stride=(1, 1), padding_mode="zeros")[0, 0, 0, :3]  # the border darkens
    tensor([0.5625, 0.7500, 0.7500])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxblur.ops.padding import pad, taps_padding


def depthwise_blur(x: torch.Tensor, kernel: torch.Tensor, stride: list[int], padding_mode: str) -> torch.Tensor:
    """Filter ``x`` with ``kernel`` (taps per spatial axis) at ``stride``, padding as ``padding_mode``.

    Written in TorchScript's subset of Python: ``Blur`` runs it under ``torch.jit.script``.
    """
    padded = pad(x, [taps_padding(taps) for taps in kernel.shape], padding_mode)
    channels = x.shape[1]
    weight = kernel.to(x).expand([channels, 1] + list(kernel.shape))  # noqa: RUF005 (TorchScript cannot unpack)
    if kernel.dim() == 1:
        return F.conv1d(padded, weight, stride=stride, groups=channels)
    if kernel.dim() == 2:
        return F.conv2d(padded, weight, stride=stride, groups=channels)
    return F.conv3d(padded, weight, stride=stride, groups=channels)
