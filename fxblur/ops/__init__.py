"""The ops a rewritten model runs: the blur (function and module), and the stride-1 max pool.

Example:
    >>> from fxblur.ops import Blur, blur
    >>> blur(torch.randn(1, 4, 9, 9), stride=2).shape
    torch.Size([1, 4, 5, 5])
"""

from fxblur.ops.blur import blur
from fxblur.ops.blur_module import Blur

__all__ = ["Blur", "blur"]
