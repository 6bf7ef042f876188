"""The graph rewrites of fxblur, one ``torch.fx`` ``PassBase`` per kind of op."""

from fxblur.passes.anti_aliasing import RecordAntiAliasing
from fxblur.passes.avg_pool import BlurAvgPools
from fxblur.passes.circular_padding import CircularPadding
from fxblur.passes.max_pool import BlurMaxPools
from fxblur.passes.polyphase import PolyphaseSampling
from fxblur.passes.strided_conv import BlurStridedConvs
from fxblur.passes.window_pass import WindowOpPass

__all__ = [
    "BlurAvgPools",
    "BlurMaxPools",
    "BlurStridedConvs",
    "CircularPadding",
    "PolyphaseSampling",
    "RecordAntiAliasing",
    "WindowOpPass",
]
