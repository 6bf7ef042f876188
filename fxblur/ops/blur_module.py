"""``Blur``: the module that a rewritten graph calls for every blur it inserts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fxblur._compat import RefillAfterApply
from fxblur.ops.blur import blur_with_kernel, per_axis
from fxblur.ops.depthwise import depthwise_blur
from fxblur.ops.filters import binomial_kernel
from fxblur.ops.padding import check_padding_mode


class Blur(RefillAfterApply):
    """Binomial low-pass filter with optional subsampling (BlurPool's anti-aliasing step).

    The filter is a non-persistent buffer: it moves with ``.to()``, follows ``.half()``,
    and never appears in ``state_dict()``, so checkpoints load with or without blurs.
    Whatever moves or converts it (``.to()``, ``.half()``, ``.to_empty()``) refills it, so a
    model built on the ``meta`` device and materialised with ``to_empty()`` blurs correctly
    (a checkpoint cannot restore the filter: it is not in one). Binomial weights are exact
    in every floating-point dtype.

    Args:
        filter_size: binomial taps per spatial axis (1 to 7); 1 leaves an axis unfiltered.
        stride: subsampling factor per spatial axis.
        padding_mode: ``"reflect"``, ``"replicate"``, ``"zeros"`` or ``"circular"``.
        dims: number of spatial axes (2 for images).

    Example:
        >>> blur = Blur(filter_size=3, stride=2)
        >>> blur(torch.randn(2, 16, 9, 9)).shape
        torch.Size([2, 16, 5, 5])
        >>> list(blur.state_dict())
        []
    """

    def __init__(
        self,
        filter_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding_mode: str = "reflect",
        dims: int = 2,
    ) -> None:
        super().__init__()
        self.filter_size = per_axis(filter_size, dims, "filter_size")
        self.stride = per_axis(stride, dims, "stride")
        check_padding_mode(padding_mode)
        self.padding_mode = padding_mode
        self.register_buffer("filter", binomial_kernel(self.filter_size, torch.float32), persistent=False)

    @property
    def spec(self) -> tuple:
        """Everything that defines what this blur computes; equal specs compute the same."""
        return self.filter_size, self.stride, self.padding_mode

    def reset_parameters(self) -> None:
        """Refill the filter with the binomial kernel, in the filter's dtype and on its device."""
        with torch.no_grad():
            self.filter.copy_(binomial_kernel(self.filter_size))

    def refill(self) -> None:
        """After ``.to()``, ``.half()``, ``.to_empty()``: the filter refilled (``RefillAfterApply``).

        Example:
            >>> with torch.device("meta"):
            ...     blur = Blur(filter_size=3)
            >>> blur.to_empty(device="cpu").filter[1]
            tensor([0.1250, 0.2500, 0.1250])
        """
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == len(self.stride) + 1
        if unbatched:
            x = x.unsqueeze(0)
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            y = depthwise_blur(x, self.filter, list(self.stride), self.padding_mode)
        else:
            y = blur_with_kernel(x, self.filter, self.stride, self.padding_mode)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return f"filter_size={self.filter_size}, stride={self.stride}, padding_mode={self.padding_mode!r}"
