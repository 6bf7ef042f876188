"""How shift-invariant a classifier is: Zhang (2019)'s consistency, accuracy, feature sensitivity.

For every image of a dataset, two crops of ``crop_size`` pixels are taken at random
diagonal offsets ``d1`` and ``d2`` (each uniform over ``0..max_shift``, with ``max_shift``
the image size minus the crop size; see ``fxblur.evaluation.shifts``), so the two crops show the same
content shifted by ``d2 - d1`` pixels along both axes. Then:

- **consistency** is the fraction of images whose two crops get the same top-1 class
  (Zhang 2019). It needs no labels. The two offsets are drawn independently, so some
  pairs have ``d1 == d2`` and count as consistent whatever the model.
- **accuracy** is the fraction of crops classified as labelled (both crops of every pair).
- **sensitivity** is ``1 - cos(f1, f2)`` averaged over images, where ``f1`` and ``f2`` are
  the crops' pooled features: the input of the model's last ``nn.Linear`` by default, or a
  named module's output averaged over space (``fxblur.evaluation.features``). 0 means the features do
  not move at all under the shift; 1 means they become orthogonal.

``consistency_by_shift`` runs every offset on every image instead and gives consistency as
a function of the shift ``d2 - d1``, averaged over every pair of offsets that far apart.

``shift="circular"`` measures circular shifts instead: the centred crop of every image,
rolled by ``d1`` and by ``d2`` (``fxblur.evaluation.shifts.diagonal_rolls``), over the same
range of offsets. A network made exactly invariant by polyphase sampling scores 100% and a
sensitivity of 0 (to float rounding) there, as the crop protocol's new border content
cannot allow.

All of it runs batched, under ``torch.no_grad``, with the model in eval mode (its own
train/eval modes are restored afterwards), on the device of the model's parameters; the
offsets come from ``seed``, so a run is repeatable.

Example:
    >>> from fxblur.evaluation.synthetic import SyntheticShapes
    >>> data = SyntheticShapes(8, image_size=40, seed=0)
    >>> model = torchvision.models.resnet18(num_classes=4)
    >>> metrics = shift_metrics(model, data, crop_size=32, seed=0)
    >>> metrics.images, 0 <= metrics.consistency <= 1, 0 < metrics.sensitivity < 1
    (8, True, True)
    >>> metrics == shift_metrics(model, data, crop_size=32, seed=0)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fxblur.evaluation.features import penultimate_features
from fxblur.evaluation.shifts import diagonal_crops, diagonal_rolls, max_shift, offset_pairs

Progress = Callable[[int], None]
"""Called after each batch with the number of images it held."""


@dataclass(frozen=True)
class ShiftMetrics:
    """The shift metrics of one model on one dataset (see the module docstring)."""

    consistency: float
    accuracy: float
    sensitivity: float
    images: int


def shift_metrics(
    model: nn.Module,
    dataset: Dataset,
    crop_size: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    feature_layer: str | None = None,
    progress: Progress | None = None,
    shift: str = "crop",
) -> ShiftMetrics:
    """Consistency, accuracy and feature sensitivity of ``model`` under random diagonal shifts.

    Args:
        model: a classifier returning (N, classes) logits.
        dataset: items ``(image, label)`` with images (C, H, W) of one size, at least
            ``crop_size`` (a ``torchvision.datasets.ImageFolder`` with a resize and a centre
            crop in its transform, or ``fxblur.evaluation.synthetic.SyntheticShapes``).
        crop_size: side of the square crops; offsets range over ``0..H - crop_size``.
        seed: draws the offset pairs; the same seed gives the same pairs.
        batch_size: images per forward pass (each pass runs both crops of each image).
        feature_layer: module whose output, averaged over space, is the feature vector;
            ``None`` for the input of the last ``nn.Linear``.
        progress: called with the number of images after every batch.
        shift: ``"crop"`` (two crops at the offsets) or ``"circular"`` (the centred crop, rolled).

    Raises:
        ValueError: crops that do not fit, a model that does not return (N, classes)
            logits, or a forward pass that did not reach the feature layer.
    """
    count = len(dataset)
    if count == 0:
        raise ValueError("the dataset is empty")
    _check_shift(shift)
    agree = correct = 0
    distance = 0.0
    pairs = None
    with _evaluating(model) as device, penultimate_features(model, feature_layer) as features:
        for start, images, labels in _batches(dataset, batch_size):
            if pairs is None:
                pairs = offset_pairs(count, max_shift(images.shape, crop_size), seed)
            offsets = pairs[start : start + len(images)]
            crops = torch.cat([_views(images, offsets[:, i], crop_size, shift) for i in (0, 1)])
            predicted = _logits(model, crops.to(device)).argmax(1).cpu()
            first, second = features.take().chunk(2)
            agree += int((predicted[: len(images)] == predicted[len(images) :]).sum())
            correct += int((predicted == labels.repeat(2)).sum())
            distance += float((1 - F.cosine_similarity(first.double(), second.double(), dim=1)).sum())
            if progress is not None:
                progress(len(images))
    return ShiftMetrics(agree / count, correct / (2 * count), distance / count, count)


def consistency_by_shift(
    model: nn.Module,
    dataset: Dataset,
    crop_size: int,
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
    shift: str = "crop",
) -> dict[int, float]:
    """Consistency for each diagonal shift from 1 to ``max_shift``, over every pair of offsets.

    Every image is classified at every offset ``0..max_shift`` (``max_shift + 1`` forward
    passes per image, no randomness); the consistency at shift ``s`` is the fraction of
    offset pairs ``(d, d + s)``, over all images and all ``d``, that get the same class.

    Example:
        >>> class Pixel(nn.Module):  # class 0 when the crop's top-left red value is positive
        ...     def forward(self, x):
        ...         return torch.stack([x[:, 0, 0, 0], -x[:, 0, 0, 0]], dim=1)
        >>> stripes = torch.tensor([1.0, -1.0]).repeat(4)[:, None].expand(8, 8)  # rows +1, -1, +1...
        >>> data = [(stripes.expand(3, 8, 8), 0)]
        >>> consistency_by_shift(Pixel(), data, crop_size=4)
        {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0}
    """
    _check_shift(shift)
    agree: dict[int, int] = {}
    pairs: dict[int, int] = {}
    with _evaluating(model) as device:
        for _, images, _ in _batches(dataset, batch_size):
            shifts = max_shift(images.shape, crop_size)
            offsets = [torch.full((len(images),), d) for d in range(shifts + 1)]
            predicted = torch.stack([
                _logits(model, _views(images, d, crop_size, shift).to(device)).argmax(1).cpu() for d in offsets
            ])  # fmt: skip
            for shift in range(1, shifts + 1):
                same = predicted[shift:] == predicted[:-shift]
                agree[shift] = agree.get(shift, 0) + int(same.sum())
                pairs[shift] = pairs.get(shift, 0) + same.numel()
            if progress is not None:
                progress(len(images))
    return {shift: agree[shift] / pairs[shift] for shift in sorted(pairs)}


SHIFTS = ("crop", "circular")


def _check_shift(shift: str) -> None:
    if shift not in SHIFTS:
        raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")


def _views(images: torch.Tensor, offsets: torch.Tensor, crop_size: int, shift: str) -> torch.Tensor:
    """The shifted views the model sees: crops at ``offsets``, or the centred crop rolled by them."""
    if shift == "crop":
        return diagonal_crops(images, offsets, crop_size)
    centre = torch.full_like(offsets, max_shift(images.shape, crop_size) // 2)
    return diagonal_rolls(diagonal_crops(images, centre, crop_size), offsets)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode and no autograd while the block runs; every module's mode restored after."""
    modes = {module: module.training for module in model.modules()}
    tensor = next(model.parameters(), None)
    device = torch.device("cpu") if tensor is None else tensor.device
    model.eval()
    try:
        with torch.no_grad():
            yield device
    finally:
        model.train(modes[model])  # a GraphModule with a graph per mode switches back
        for module, training in modes.items():
            module.training = training


def _batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(index of the first image, images, labels)`` in dataset order."""
    start = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield start, images, torch.as_tensor(labels)
        start += len(images)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"expected (N, classes) logits from a classifier, got {got}")
    return out
