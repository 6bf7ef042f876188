"""The blur op: a binomial low-pass filter, optionally subsampling, on (N, C, *spatial) input.

Each output sample is the filter-weighted sum of a window of the padded input; with a stride
``s`` only every ``s``-th window is kept. The input is padded by ``k - 1`` in total along an
axis filtered with ``k`` taps (``(k - 1) // 2`` before, the rest after), so the output has
``(size - 1) // s + 1`` samples: the input size at stride 1, and the size a floor-mode
conv or pool of stride ``s`` produces when it is fed the stride-1 map.

Padding modes are ``"reflect"`` (the paper's), ``"replicate"``, ``"zeros"`` (Composer's) and
``"circular"``. An axis too short to reflect (a 1-pixel map under a 3-tap filter) is padded
by replication instead, so tiny maps always work; circular padding wraps around as often as
it must.

Two implementations compute the same numbers (to float rounding), and the blur picks the
faster one for its input: weighted sums of shifted views (``fxblur.ops.separable``) for
float32/float64 tensors on CPU in eager mode, in NCHW (where, on CPUs without a fast
oneDNN kernel for it, a depthwise convolution after a padded copy costs several times the
memory traffic it needs; on the others the two are close) or, channels-last, where they
subsample; a depthwise convolution (``fxblur.ops.depthwise``) everywhere else: channels-last
at stride 1 (oneDNN's kernel makes one pass), CUDA (cuDNN), half precision, ``meta``
tensors, ``torch.compile`` (which fuses it), TorchScript and ``torch.jit.trace``, and every
circular blur: padding and a convolution compute every output alike, so a circular blur
commutes bitwise with circular shifts (the shifted views fold the border outputs apart,
which rounds them differently), and polyphase sampling sees exactly shifted maps. Both give
the same derivatives of every order (Hessians, gradient penalties, forward mode,
``torch.func``), and the same infinities and NaN for non-finite inputs. The input must be
floating point: a blur of an integer image is a float operation, so convert it first.

Example:
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> blur(x, stride=2).shape
    torch.Size([1, 1, 2, 2])
    >>> blur(torch.ones(2, 3, 5, 5), filter_size=5).eq(1).all()
    tensor(True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fxblur.ops.depthwise import depthwise_blur
from fxblur.ops.eager import runs_eagerly_on_cpu
from fxblur.ops.filters import binomial_kernel
from fxblur.ops.padding import check_padding_mode
from fxblur.ops.separable import separable_blur


def blur(
    x: torch.Tensor,
    stride: int | Sequence[int] = 1,
    filter_size: int | Sequence[int] = 3,
    padding_mode: str = "reflect",
) -> torch.Tensor:
    """Low-pass filter ``x`` with a binomial filter and keep every ``stride``-th sample.

    Args:
        x: input of shape (N, C, L), (N, C, H, W) or (N, C, D, H, W).
        stride: subsampling factor, one for all spatial axes or one per axis.
        filter_size: taps of the binomial filter (1 to 7), one for all axes or one per
            axis; 1 leaves an axis unfiltered.
        padding_mode: ``"reflect"``, ``"replicate"``, ``"zeros"`` or ``"circular"``.

    Example:
        >>> blur(torch.randn(8, 64, 56, 56), stride=2).shape
        torch.Size([8, 64, 28, 28])
        >>> blur(torch.randn(1, 3, 9, 9), stride=(2, 1), filter_size=(3, 1)).shape
        torch.Size([1, 3, 5, 9])
    """
    spatial = x.dim() - 2
    if spatial not in (1, 2, 3):
        raise ValueError(f"blur expects (N, C, *spatial) input with 1 to 3 spatial axes, got {x.dim()}-d")
    strides = per_axis(stride, spatial, "stride")
    sizes = per_axis(filter_size, spatial, "filter_size")
    check_padding_mode(padding_mode)
    kernel = binomial_kernel(sizes, torch.float64 if x.dtype == torch.float64 else torch.float32)
    return blur_with_kernel(x, kernel, strides, padding_mode)


def blur_with_kernel(x: torch.Tensor, kernel: torch.Tensor, stride: Sequence[int], padding_mode: str) -> torch.Tensor:
    """Filter ``x`` with the binomial ``kernel`` (shape: taps per spatial axis) at ``stride``.

    Picks the fastest implementation for ``x`` (see the module docstring). A blur is a
    floating-point operation: ``TypeError`` for any other dtype.

    Example:
        >>> blur_with_kernel(torch.ones(1, 1, 3, dtype=torch.uint8), binomial_kernel((3,)), [1], "reflect")
        Traceback (most recent call last):
        ...
        TypeError: blur needs a floating-point input, got torch.uint8: convert it first, e.g. with x.float()
    """
    if not x.is_floating_point():
        raise TypeError(f"blur needs a floating-point input, got {x.dtype}: convert it first, e.g. with x.float()")
    if _shifted_views_are_faster(x, stride, padding_mode):
        return separable_blur(x, kernel.shape, stride, padding_mode)
    return depthwise_blur(x, kernel, list(stride), padding_mode)


def _shifted_views_are_faster(x: torch.Tensor, stride: Sequence[int], padding_mode: str) -> bool:
    """Where the shifted views beat padding and a depthwise conv; never for circular padding, whose blur must
    compute every output alike (the views treat border outputs apart), so that it commutes bitwise with shifts."""
    return padding_mode != "circular" and runs_eagerly_on_cpu(x) and (x.is_contiguous() or max(stride) > 1)


def per_axis(value: int | Sequence[int], axes: int, name: str) -> tuple[int, ...]:
    """``value`` as one positive int per axis; ``ValueError`` when it cannot be."""
    values = (value,) * axes if isinstance(value, int) else tuple(value)
    if len(values) != axes or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a positive int or {axes} positive ints, got {value!r}")
    return values
