"""fxblur: anti-aliased CNNs (BlurPool, Zhang 2019) as a torch.fx graph rewrite.

Example:
    >>> import torchvision, fxblur
    >>> gm = fxblur.transform(torchvision.models.resnet50(), verbose=False)
    >>> [c.target for c in fxblur.changes(gm) if c.action != "skipped"][:3]
    ['maxpool', 'layer2.0.conv2', 'layer2.0.downsample.0']
"""

from fxblur.changes import Change, changes
from fxblur.ops.blur import blur
from fxblur.ops.blur_module import Blur
from fxblur.report import Report, report
from fxblur.rewrite.known_layers import trust_forward
from fxblur.rewrite.nesting import HookWarning
from fxblur.rewrite.tracer import BlurTracer, UntraceableModelError
from fxblur.transform import NoEffectWarning, transform

__all__ = [
    "Blur",
    "BlurTracer",
    "Change",
    "HookWarning",
    "NoEffectWarning",
    "Report",
    "UntraceableModelError",
    "blur",
    "changes",
    "report",
    "transform",
    "trust_forward",
]
