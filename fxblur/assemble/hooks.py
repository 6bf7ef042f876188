"""Hooks of modules the result no longer calls: ``HookWarning`` names them.

A module whose code went into its caller's graph (inlined), or every module traced through
with ``flatten=True``, is no longer called as a module, so the forward and backward hooks
registered on it no longer fire.

Example:
    >>> conv = nn.Conv2d(3, 8, 3)
    >>> has_call_hooks(conv)
    False
    >>> _ = conv.register_forward_hook(lambda module, args, output: None)
    >>> has_call_hooks(conv)
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

from fxblur.trace.calls import Call


class HookWarning(UserWarning):
    """A module with hooks is no longer called by the rewritten model, so its hooks no longer fire."""


def warn_about_hooks(calls: Iterable[Call]) -> None:
    """``HookWarning`` naming the modules with hooks among those whose calls the result no longer makes."""
    hooked = sorted({call.path for call in calls if call.parent is not None and has_call_hooks(call.module)})
    if hooked:
        warnings.warn(
            f"the hooks of {', '.join(hooked)} no longer fire: the result no longer calls these modules "
            "(fxblur.report(model) says why)",
            HookWarning,
            stacklevel=5,
        )


def has_call_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, pre-forward or backward hooks of its own."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, name, None) for name in names)
