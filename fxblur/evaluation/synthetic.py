"""A synthetic image-classification set where position varies and fine detail aliases.

``SyntheticShapes`` draws one shape (disk, square, triangle, cross, ring or diamond; the
first ``num_classes`` of these are the classes) at a random position and size on a
background of 1/f ("pink") noise, the spectrum natural images have. The shape is filled
with its own colour and a fine sine grating of random orientation and frequency, and
its edges are hard: the high frequencies that a strided conv or pool aliases are there
on purpose. The class depends only on the outline, never on colour, texture or position,
so a model has to recognise the shape wherever it is.

Every image is made on the fly from ``(seed, split, index)`` alone: the same arguments give
identical tensors in any order of access and in any worker, a new seed gives new images,
and nothing is written to disk. Labels cycle through the classes (``index % num_classes``),
so every class has the same count, give or take one.

Objects stay at least ``border`` pixels from every edge, so a crop that drops up to
``border`` pixels on each side of the image still holds the whole object: crops of
``image_size - border`` pixels at diagonal offsets 0 to ``border`` all show it.

Example:
    >>> data = SyntheticShapes(8, image_size=40, seed=0)
    >>> image, label = data[7]
    >>> tuple(image.shape), image.dtype, label, data.classes[label]
    ((3, 40, 40), torch.float32, 1, 'square')
    >>> torch.equal(image, SyntheticShapes(8, image_size=40, seed=0)[7][0])
    True
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("disk", "square", "triangle", "cross", "ring", "diamond")


class SyntheticShapes(Dataset):
    """``count`` images of textured shapes on 1/f noise; items are ``(image, label)``.

    Args:
        count: number of images.
        image_size: height and width in pixels (images are square, 3 channels, float32,
            roughly zero mean and unit variance: no further normalisation is needed).
        num_classes: how many of ``SHAPES`` are used, 2 to 6 (default: all 6).
        border: the margin in pixels that objects keep from every edge (default
            ``image_size // 8``); at most a third of the image.
        seed: any non-negative int; the images are a function of it.
        split: a name mixed into the seed, so ``split="test"`` gives images the ``"train"``
            split never shows with the same seed.
    """

    def __init__(
        self,
        count: int = 1000,
        *,
        image_size: int = 40,
        num_classes: int = len(SHAPES),
        border: int | None = None,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        border = image_size // 8 if border is None else border
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be from 2 to {len(SHAPES)}, got {num_classes}")
        if image_size < 16 or not 0 <= 3 * border <= image_size:
            raise ValueError(f"need image_size >= 16 and 0 <= border <= image_size / 3, got {image_size}, {border}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
        self.count, self.image_size, self.border, self.seed, self.split = count, image_size, border, seed, split
        self.classes = list(SHAPES[:num_classes])
        self._split_code = zlib.crc32(split.encode())
        centres = np.arange(image_size, dtype=np.float32) + 0.5
        self._y, self._x = np.meshgrid(centres, centres, indexing="ij")
        frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(image_size), np.fft.fftfreq(image_size), indexing="ij"))
        frequency[0, 0] = np.inf  # no DC: the noise has zero mean
        self._one_over_f = (1 / frequency).astype(np.float32)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} images")
        label = index % len(self.classes)
        rng = np.random.default_rng([self.seed, self._split_code, index])
        image = self._background(rng)
        mask = self._outline(rng, SHAPES[label])
        image = np.where(mask, self._fill(rng), image)
        return torch.from_numpy(image.astype(np.float32)), label

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """Pink noise, mostly shared by the three channels (as luminance is), unit variance."""
        white = rng.standard_normal((4, self.image_size, self.image_size))
        pink = np.fft.ifft2(np.fft.fft2(white) * self._one_over_f).real
        pink /= pink.std(axis=(1, 2), keepdims=True)
        noise = pink[:1] + 0.5 * pink[1:]
        return (noise - noise.mean()) / noise.std()

    def _outline(self, rng: np.random.Generator, shape: str) -> np.ndarray:
        """The pixels inside ``shape``, placed at random within the border."""
        room = self.image_size - 2 * self.border
        radius = rng.uniform(0.2, 0.4) * room
        cy, cx = rng.uniform(self.border + radius, self.image_size - self.border - radius, size=2)
        u, v = (self._x - cx) / radius, (self._y - cy) / radius
        r = np.hypot(u, v)
        inside = {
            "disk": lambda: r <= 1,
            "square": lambda: np.maximum(abs(u), abs(v)) <= 0.8,
            "triangle": lambda: (v <= 0.75) & (v >= 2 * abs(u) - 1),
            "cross": lambda: ((abs(u) <= 0.3) & (abs(v) <= 1)) | ((abs(v) <= 0.3) & (abs(u) <= 1)),
            "ring": lambda: (r <= 1) & (r >= 0.55),
            "diamond": lambda: abs(u) + abs(v) <= 1,
        }[shape]
        return inside()

    def _fill(self, rng: np.random.Generator) -> np.ndarray:
        """A random colour carrying a fine grating of random orientation and frequency."""
        colour = rng.normal(0, 1, size=(3, 1, 1))
        colour *= rng.uniform(1.0, 2.0) / np.linalg.norm(colour)
        angle, cycles_per_pixel, phase = rng.uniform(0, np.pi), rng.uniform(0.15, 0.4), rng.uniform(0, 2 * np.pi)
        along = self._x * np.cos(angle) + self._y * np.sin(angle)
        grating = np.sin(2 * np.pi * cycles_per_pixel * along + phase)
        return colour * (1 + 0.5 * grating)
