"""Which modules the tracer calls whole instead of tracing into: the leaf policy.

- every conv, pool, ``Blur`` and ``CircularPad`` module, subclasses from other libraries included (timm's
  ``Conv2dSame``, ``StdConv2d``): the passes then see the call and can decide on it,
  instead of tracing into code whose arithmetic they cannot rewrite;
- every layer that anti-aliases already (timm's ``BlurPool2d``, kornia's ``MaxBlurPool2D``:
  ``fxblur.known_layers``), which is never blurred again, and every known norm with an
  activation (timm's ``BatchNormAct2d``), whose forward updates buffers as it runs;
- the user's ``leaf_modules``, by class or by module path;
- torch.fx's own leaves (the rest of ``torch.nn``);
- a module whose forward writes one of its buffers in place while traced (the trace would
  run that on the model's own tensor, and not record it): ``trace`` finds it and calls it whole;
- where timm is loaded, a module that fails to trace falls back to being a leaf if timm
  registered its class as not traceable (``fxblur._compat.timm_fx_registrations``).

Example:
    >>> policy = LeafPolicy(["backbone.stem", nn.LSTM])
    >>> policy.is_leaf(nn.Conv2d(3, 8, 3), "features.0"), policy.is_leaf(nn.Sequential(), "backbone.stem")
    (True, True)
    >>> policy.is_user_leaf(nn.LSTM(4, 4), "rnn"), policy.is_leaf(nn.Sequential(), "head")
    (True, False)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from fxblur._compat import AVG_POOL_BASE, CONV_BASE, LP_POOL_BASE, MAX_POOL_BASE, timm_fx_registrations
from fxblur.known_layers import anti_aliasing, norm_act
from fxblur.ops.blur import blur
from fxblur.ops.blur_module import Blur
from fxblur.ops.circular import CircularPad
from fxblur.ops.polyphase import phase_of, roll_to_phase, select_phase

ALWAYS_LEAVES = (CONV_BASE, MAX_POOL_BASE, AVG_POOL_BASE, LP_POOL_BASE, Blur, CircularPad)
FXBLUR_OPS = (blur, phase_of, roll_to_phase, select_phase)  # functions the tracer keeps as calls


class LeafPolicy:
    """The modules to call whole: ops, anti-aliasing layers, the user's ``leaf_modules`` (classes or paths)."""

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = ()) -> None:
        leaf_modules = tuple(leaf_modules)
        self.user_classes = tuple(m for m in leaf_modules if isinstance(m, type))
        self.paths = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.classes = ALWAYS_LEAVES + self.user_classes

    def is_leaf(self, module: nn.Module, path: str) -> bool:
        """Whether the tracer calls ``module`` (at ``path``) whole, besides torch.fx's own leaves."""
        return (
            isinstance(module, self.classes)
            or path in self.paths
            or anti_aliasing(module) is not None
            or norm_act(module) is not None
        )

    def is_user_leaf(self, module: nn.Module, path: str) -> bool:
        """Whether ``module`` is a leaf because the user (or timm's registrations) asked: code fxblur does not see."""
        return path in self.paths or isinstance(module, self.user_classes)

    def called_whole(self, root: nn.Module, graph: fx.Graph) -> tuple[str, ...]:
        """The paths of the modules ``graph`` calls whole for being user or timm leaves (not ops or blurs)."""
        called = {node.target for node in graph.nodes if node.op == "call_module"}
        return tuple(path for path in called if self.is_user_leaf(root.get_submodule(path), path))


def timm_functions() -> tuple:
    """The functions timm registers as not traceable (none if timm is not loaded): the tracer keeps them calls."""
    return timm_fx_registrations()[1]


def timm_leaf_enclosing(root: nn.Module, path: str | None) -> type | None:
    """The class timm registered as not traceable that encloses the module at ``path`` (which failed), if any."""
    modules = timm_fx_registrations()[0]
    if path is None or not modules:
        return None
    while True:
        module = root.get_submodule(path)
        if isinstance(module, modules):
            return type(module)
        if not path:
            return None
        path = path.rpartition(".")[0]
