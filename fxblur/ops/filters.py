"""Binomial low-pass filters, the anti-aliasing kernels of BlurPool.

A binomial filter of size ``k`` is row ``k - 1`` of Pascal's triangle divided by its sum
``2 ** (k - 1)``: ``[1]``, ``[1, 1] / 2``, ``[1, 2, 1] / 4``, ``[1, 3, 3, 1] / 8``, ...
Every coefficient is a small integer over a power of two, so the filters are exact in
float16, bfloat16, float32 and float64 alike.

Example:
    >>> binomial_filter(3)
    tensor([0.2500, 0.5000, 0.2500], dtype=torch.float64)
    >>> binomial_kernel((3, 1)).shape
    torch.Size([3, 1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MAX_FILTER_SIZE = 7


def binomial_filter(size: int) -> torch.Tensor:
    """The normalised 1-D binomial filter with ``size`` taps (float64)."""
    if not 1 <= size <= MAX_FILTER_SIZE:
        raise ValueError(f"filter size must be between 1 and {MAX_FILTER_SIZE}, got {size}")
    coefficients = [math.comb(size - 1, tap) for tap in range(size)]
    return torch.tensor(coefficients, dtype=torch.float64) / 2 ** (size - 1)


def binomial_kernel(sizes: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The separable N-d kernel: the outer product of one binomial filter per axis.

    A size of 1 on an axis leaves that axis unfiltered.
    """
    kernel = torch.ones((), dtype=torch.float64)
    for size in sizes:
        kernel = kernel.unsqueeze(-1) * binomial_filter(size)
    return kernel.to(dtype)
