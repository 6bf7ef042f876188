"""The graph rewrites of fxblur, one ``torch.fx`` ``PassBase`` per kind of op, and what they share.

Each pass is a plain torch.fx pass (``PassBase.call(gm) -> PassResult``) that also runs on
its own over any traced ``GraphModule``. What they share: ``fxblur.passes.edit``, the
editing functions that keep the module calls right, and ``RewriteContext``, the module
replacements of one rewrite across the graphs of a model. ``docs/architecture.md`` shows
how to add one.
"""

from fxblur.passes.anti_aliasing import RecordAntiAliasing
from fxblur.passes.avg_pool import BlurAvgPools
from fxblur.passes.circular_padding import CircularPadding
from fxblur.passes.context import Realization, RewriteContext
from fxblur.passes.max_pool import BlurMaxPools
from fxblur.passes.polyphase import PolyphaseSampling
from fxblur.passes.strided_conv import BlurStridedConvs
from fxblur.passes.subsampling import BlurSubsampling
from fxblur.passes.window_pass import Plan, WindowOpPass

__all__ = [
    "BlurAvgPools",
    "BlurMaxPools",
    "BlurStridedConvs",
    "BlurSubsampling",
    "CircularPadding",
    "Plan",
    "PolyphaseSampling",
    "Realization",
    "RecordAntiAliasing",
    "RewriteContext",
    "WindowOpPass",
]
