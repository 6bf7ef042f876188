"""Measure how far a model's output moves under circular shifts of its input: what the analysis claims, tested.

``check_invariance(model, input_shape)`` runs the model on inputs and on their circular
shifts and reports the largest relative movement of each output: for an output without
spatial axes (logits), how far ``f(roll(x, t))`` is from ``f(x)``; for a per-pixel output
(a segmentation map, at the input's resolution or a whole fraction of it), how far it is
from ``roll(f(x), t)`` (shifts the fraction does not divide are skipped for it). Relative
movement is the largest absolute change over the largest absolute output value.

The inputs are random (Gaussian) and, with ``structured=True``, the kinds of images where
polyphase sampling meets exact or near ties between components
(``fxblur.evaluation.structured``): filled shapes on a flat background, saturated regions,
and low-resolution images resized up.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    ...                             torch.nn.AdaptiveAvgPool2d(1))
    >>> measured = check_invariance(model, (1, 3, 16, 16), structured=False)
    >>> measured.kind, measured.worst < 1e-12
    ('invariance', True)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fxblur.evaluation.structured import structured_inputs


@dataclass(frozen=True)
class Measurement:
    """The largest relative movement of a model's outputs under circular shifts.

    Attributes:
        kind: ``"invariance"`` when every output has no spatial axes, else ``"equivariance"``.
        worst: the largest relative movement over every input, shift and output.
        by_input: the same, per kind of input (``"random"``, ``"flat shapes"``, ...).
        shifts: the shifts tried, one offset per spatial axis.
        dtype: the dtype the model ran in.
    """

    kind: str
    worst: float
    by_input: dict[str, float]
    shifts: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    def share_within(self, tolerance: float) -> float:
        """The share of kinds of input whose worst movement is at most ``tolerance``."""
        return sum(value <= tolerance for value in self.by_input.values()) / len(self.by_input)


def check_invariance(
    model: nn.Module,
    input_shape: Sequence[int],
    shifts: Iterable[Sequence[int]] | None = None,
    *,
    structured: bool = True,
    samples: int = 2,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Measurement:
    """Run ``model`` (a copy, in eval mode and ``dtype``) on inputs and their circular shifts (module docstring).

    Args:
        model: any model that takes one (N, C, *spatial) input.
        input_shape: the shape of one input; the batch size is ``samples`` (its first entry is replaced).
        shifts: offsets along the spatial axes; by default a few small, odd and large ones.
        structured: also try the structured inputs of ``fxblur.evaluation.structured``.
        samples: inputs of each kind.
        dtype: the dtype to run in (float64 by default, so that only the model moves the output).
        seed: the seed of every random input.
    """
    spatial = tuple(input_shape[2:])
    shifts = tuple(tuple(shift) for shift in (shifts if shifts is not None else default_shifts(spatial)))
    model = copy.deepcopy(model).to(dtype).eval()
    shape = (samples, *input_shape[1:])
    generator = torch.Generator().manual_seed(seed)
    inputs = [("random", torch.randn(shape, generator=generator, dtype=torch.float64))]
    if structured:
        inputs += list(structured_inputs(shape, seed))
    by_input: dict[str, float] = {}
    kinds: set[str] = set()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        for name, x in inputs:
            x = x.to(device=device, dtype=dtype)
            reference = _leaves(model(x))
            for shift in shifts:
                moved = _leaves(model(torch.roll(x, shift, tuple(range(2, x.dim())))))
                for before, after in zip(reference, moved, strict=True):
                    movement, kind = _movement(before, after, shift, spatial)
                    if movement is not None:
                        kinds.add(kind)
                        by_input[name] = max(by_input.get(name, 0.0), movement)
    kind = "equivariance" if "equivariance" in kinds else "invariance"
    return Measurement(kind, max(by_input.values(), default=0.0), by_input, shifts, dtype)


def default_shifts(spatial: Sequence[int]) -> list[tuple[int, ...]]:
    """A few shifts along every spatial axis: by one, odd, and large ones (within each axis' size)."""
    offsets = [1, 3, 7, -13, 32, 17]
    found = [tuple((o * (1 + i)) % max(size, 1) for i, size in enumerate(spatial)) for o in offsets]
    found.append(tuple(1 if i == 0 else 0 for i in range(len(spatial))))
    return list(dict.fromkeys(shift for shift in found if any(shift)))


def _leaves(output: object) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [leaf for value in output.values() for leaf in _leaves(value)]
    if isinstance(output, (tuple, list)):
        return [leaf for value in output for leaf in _leaves(value)]
    return []


def _movement(before: torch.Tensor, after: torch.Tensor, shift: tuple[int, ...], spatial: tuple[int, ...]):
    """(relative movement, ``"invariance"`` or ``"equivariance"``), or ``(None, "")`` where a shift cannot apply.

    A per-pixel output's movement is relative to how much it varies over space (its largest
    distance from its spatial mean), so that a map dominated by a constant does not hide it.
    """
    scale = before.abs().max().item() or 1.0
    dims = len(spatial)
    trailing = tuple(before.shape[-dims:])
    if before.dim() >= dims + 2 and any(size > 1 for size in trailing):
        ratios = [size // out if out and size % out == 0 else 0 for size, out in zip(spatial, trailing, strict=True)]
        if all(ratios):
            if any(t % r for t, r in zip(shift, ratios, strict=True)):
                return None, ""
            steps = tuple(t // r for t, r in zip(shift, ratios, strict=True))
            axes = tuple(range(before.dim() - dims, before.dim()))
            expected = torch.roll(before, steps, axes)
            variation = (before - before.mean(axes, keepdim=True)).abs().max().item() or scale
            return (after - expected).abs().max().item() / variation, "equivariance"
    return (after - before).abs().max().item() / scale, "invariance"
