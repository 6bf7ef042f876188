"""fxblur: anti-aliased CNNs (BlurPool, Zhang 2019) as a torch.fx graph rewrite.

Example:
    >>> import torchvision, fxblur
    >>> gm = fxblur.transform(torchvision.models.resnet50(), verbose=False)
    >>> [c.target for c in fxblur.changes(gm) if c.action != "skipped"][:3]
    ['maxpool', 'layer2.0.conv2', 'layer2.0.downsample.0']
"""

from importlib.metadata import PackageNotFoundError, version

from fxblur.assemble.graph_module import BakedAttributeWarning
from fxblur.assemble.hooks import HookWarning
from fxblur.draw import draw
from fxblur.evaluation.invariance import check_invariance
from fxblur.functional import apply_blurpool
from fxblur.known_layers import trust_forward
from fxblur.ops.blur import blur
from fxblur.ops.blur_module import Blur
from fxblur.record import Action, Change, RewriteRecord, changes, record_of
from fxblur.report import Report, report
from fxblur.trace import BlurTracer, UntraceableModelError
from fxblur.transform import NoEffectWarning, transform

try:
    __version__ = version("fxblur")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Action",
    "BakedAttributeWarning",
    "Blur",
    "BlurTracer",
    "Change",
    "HookWarning",
    "NoEffectWarning",
    "Report",
    "RewriteRecord",
    "UntraceableModelError",
    "__version__",
    "apply_blurpool",
    "blur",
    "changes",
    "check_invariance",
    "draw",
    "record_of",
    "report",
    "transform",
    "trust_forward",
]
