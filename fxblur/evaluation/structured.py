"""Structured inputs: images on which polyphase sampling meets exact or near ties between its components.

A random image makes every component's norm distinct; real images do not. These do not either:

- ``flat shapes``: filled disks and rectangles of one colour on a flat background, at random
  positions and sizes (the components of a shape's map often have equal norms, or norms
  equal up to the order of their samples);
- ``saturated``: a smooth random image pushed into its limits, so that large regions hold
  exactly 0 or 1 (the largest absolute value ties across components);
- ``upsampled xK``: a random image of a K-th of the size (K = 2, 4, 8) resized up by
  nearest and by bilinear interpolation (neighbouring components are equal, or nearly).

Every image is in [0, 1], made from ``seed`` alone.

Example:
    >>> [name for name, _ in structured_inputs((2, 3, 32, 32), seed=0)]
    ['flat shapes', 'saturated', 'upsampled x2 nearest', 'upsampled x2 bilinear', 'upsampled x4 nearest', \
'upsampled x4 bilinear', 'upsampled x8 nearest', 'upsampled x8 bilinear']
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

UPSAMPLING = (2, 4, 8)


def structured_inputs(shape: Sequence[int], seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, images)`` for each kind of structured input, of ``shape`` (N, C, *spatial), float64."""
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    yield "flat shapes", flat_shapes(shape, generator)
    yield "saturated", saturated(shape, generator)
    spatial = shape[2:]
    for factor in UPSAMPLING:
        if all(size % factor == 0 and size // factor >= 2 for size in spatial):
            small = torch.rand(
                (*shape[:2], *(size // factor for size in spatial)), generator=generator, dtype=torch.float64
            )
            for mode in ("nearest", _linear_mode(len(spatial))):
                upsampled = F.interpolate(
                    small, size=spatial, mode=mode, **({} if mode == "nearest" else {"align_corners": False})
                )
                yield f"upsampled x{factor} {'nearest' if mode == 'nearest' else 'bilinear'}", upsampled


def flat_shapes(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Filled disks and boxes of one colour each on a flat background, one to three per image."""
    images = torch.empty(shape, dtype=torch.float64)
    spatial = shape[2:]
    grids = torch.meshgrid(*(torch.arange(size, dtype=torch.float64) for size in spatial), indexing="ij")
    for n in range(shape[0]):
        background = torch.rand(shape[1], generator=generator, dtype=torch.float64)
        images[n] = background.view(-1, *([1] * len(spatial)))
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            colour = torch.rand(shape[1], generator=generator, dtype=torch.float64)
            centre = [float(torch.randint(0, size, (1,), generator=generator)) for size in spatial]
            radius = [float(torch.randint(2, max(3, size // 3), (1,), generator=generator)) for size in spatial]
            if torch.rand(1, generator=generator) < 0.5:  # a disk (an ellipse)
                inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius, strict=True)) <= 1
            else:  # a box
                inside = torch.ones(spatial, dtype=torch.bool)
                for g, c, r in zip(grids, centre, radius, strict=True):
                    inside &= (g - c).abs() <= r
            images[n][:, inside] = colour.view(-1, 1)
    return images


def saturated(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A smooth random image, scaled up and clipped to [0, 1]: wide regions exactly 0 or exactly 1."""
    spatial = shape[2:]
    coarse = torch.randn(
        (*shape[:2], *(max(2, size // 8) for size in spatial)), generator=generator, dtype=torch.float64
    )
    smooth = F.interpolate(coarse, size=spatial, mode=_linear_mode(len(spatial)), align_corners=False)
    return (smooth * 3 + 0.5).clamp(0, 1)


def _linear_mode(dims: int) -> str:
    return {1: "linear", 2: "bilinear", 3: "trilinear"}[dims]
