"""Diagonal shifts: the crop offsets of Zhang's consistency protocol, drawn from a seed, and circular shifts.

A crop of ``size`` pixels at diagonal offset ``d`` is ``image[..., d:d + size, d:d + size]``:
two crops of one image at offsets ``d1`` and ``d2`` show the same content shifted by
``d2 - d1`` pixels along both axes. Offsets range over every position that fits,
``0`` to ``max_shift = min(height, width) - size``.

The circular protocol takes the one centred crop and rolls it by ``d`` pixels along both
axes instead (``diagonal_rolls``): content that leaves one side comes back at the other, so
no pixel is new, which is the shift that polyphase sampling makes a network exactly
invariant to.

Example:
    >>> pairs = offset_pairs(3, max_shift=8, seed=0)
    >>> pairs.shape, bool(pairs.min() >= 0), bool(pairs.max() <= 8)
    (torch.Size([3, 2]), True, True)
    >>> torch.equal(pairs, offset_pairs(3, max_shift=8, seed=0))
    True
    >>> image = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> diagonal_crops(image, torch.tensor([1]), size=2).flatten().tolist()
    [5.0, 6.0, 9.0, 10.0]
    >>> diagonal_rolls(image, torch.tensor([1]))[0, 0, 0].tolist()  # the last row and column come first
    [15.0, 12.0, 13.0, 14.0]
"""

from __future__ import annotations

import torch


def max_shift(image_shape: torch.Size | tuple[int, ...], size: int) -> int:
    """The largest diagonal offset at which a ``size`` crop fits in an image of ``image_shape``.

    Raises:
        ValueError: the crop is larger than the image, or not positive.
    """
    height, width = image_shape[-2:]
    if not 0 < size <= min(height, width):
        raise ValueError(f"crop size must be from 1 to {min(height, width)} for {height}x{width} images, got {size}")
    return min(height, width) - size


def offset_pairs(count: int, max_shift: int, seed: int) -> torch.Tensor:
    """Two independent offsets per image, uniform over ``0..max_shift``: a ``(count, 2)`` int64 tensor.

    The same ``seed`` gives the same pairs on every machine (torch's CPU generator).
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, max_shift + 1, (count, 2), generator=generator)


def diagonal_crops(images: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size``x``size`` crop of each image in ``images`` (N, C, H, W) at its own diagonal offset."""
    pairs = zip(images, offsets.tolist(), strict=True)
    return torch.stack([image[..., d : d + size, d : d + size] for image, d in pairs])


def diagonal_rolls(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each image in ``images`` (N, C, H, W) rolled circularly by its offset, down and right."""
    pairs = zip(images, offsets.tolist(), strict=True)
    return torch.stack([torch.roll(image, (d, d), (-2, -1)) for image, d in pairs])
