"""Rewrite a model in parts when torch.fx cannot trace it whole: ``transform(strict=False)``.

Detection models are the usual case: their forward loops over images, targets and
proposals, which no symbolic trace can follow, while the backbone that does the
downsampling is plain tensor code. ``rewrite_parts`` walks the module tree from the top.
The code of a module that cannot be traced keeps running as it is, so first it is read
(``fxblur.assemble.callers``) to see how it uses each child:

- a child it only calls as a whole is tried whole; the first traceable module on each
  path is a *part*, rewritten as ``transform`` rewrites any model (its modules stay
  modules; a part whose own code needs no change keeps its class), with the modules that
  untraced code also reaches left as they are;
- a child it reaches into (``self.enc.conv(x)``, ``self.body.layer2(...)``) is not a
  part, since its own forward is skipped; the walk goes on inside it, with those uses;
- a child it uses in a way that cannot be told from the source is left whole, with the
  reason.

A module that cannot be traced is searched one level down the same way, and one without
children is recorded as untraced, with the reason, and left as it was. The model's own
forward and the forwards of untraceable containers run unchanged: strided functional
calls written directly in them cannot be reached.

The walk happens on fxblur's copy of the model: the original's containers are never
touched, and a part that turns out to have nothing to blur stays exactly as it was.
Paths in ``leaf_modules`` and ``exclude`` patterns are full paths in the model, as in the
report.

Example:
    >>> class Gated(nn.Module):  # the data-dependent branch defeats torch.fx
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.features = nn.Sequential(nn.Conv2d(16, 16, 3), nn.MaxPool2d(2))
    ...     def forward(self, x):
    ...         y = self.features(x)
    ...         return y if y.sum() > 0 else -y
    >>> model = fxblur.transform(Gated(), strict=False, verbose=False)
    >>> type(model).__name__, type(model.features).__name__, type(model.features[1]).__name__
    ('Gated', 'Sequential', 'BlurredMaxPool2d')
    >>> [change.target for change in fxblur.changes(model)], fxblur.report(model).parts.rewritten
    (['features.1'], ('features',))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from fxblur.analysis.window_ops import MODULES
from fxblur.assemble.callers import Use, uses
from fxblur.record import Change, changes
from fxblur.trace import BlurTracer, UntraceableModelError

Leaves = tuple[type[nn.Module] | str, ...]
Rewrite = Callable[[nn.Module, str, Leaves, frozenset[int]], nn.Module]


@dataclass(frozen=True)
class Untraced:
    """A module left as it was: torch.fx could not trace it, or its caller reaches into it."""

    path: str
    module: str
    reason: str


@dataclass(frozen=True)
class Parts:
    """Where a model was rewritten in parts.

    Attributes:
        rewritten: paths of the parts in which something was blurred, in module order.
        untraced: the modules that run as before, with the reason.
    """

    rewritten: tuple[str, ...]
    untraced: tuple[Untraced, ...]


def rewrite_parts(
    model: nn.Module, error: UntraceableModelError, rewrite: Rewrite, leaf_modules: Leaves
) -> tuple[list[Change], Parts]:
    """Rewrite the largest traceable submodules of ``model`` that every caller calls whole, in place.

    Args:
        model: fxblur's own copy of the user's model (its containers are re-wired).
        error: why ``model`` itself could not be traced.
        rewrite: rewrites one submodule, given its path in ``model``, the ``leaf_modules``
            re-rooted at it and the ids of modules untraced code also uses; raises
            ``UntraceableModelError`` if it cannot trace it.
        leaf_modules: module classes and full module paths to leave alone.

    Returns:
        The decisions of every part, their paths full paths in ``model``, and where the
        parts are (``Parts``).
    """
    walk = _Walk(rewrite, leaf_modules)
    walk.descend(model, "", uses(model, ["forward"]), error.summary)
    return walk.changes, Parts(tuple(walk.rewritten), tuple(walk.untraced))


class _Walk:
    """One top-down search for parts; a module met at several paths is decided once."""

    def __init__(self, rewrite: Rewrite, leaf_modules: Leaves) -> None:
        self.rewrite = rewrite
        self.leaf_modules = leaf_modules
        self.leaf_classes = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
        self.changes: list[Change] = []
        self.rewritten: list[str] = []
        self.untraced: list[Untraced] = []
        self.decided: dict[int, nn.Module] = {}
        self.reached: set[int] = set()  # modules untraced code uses other than by calling them whole

    def visit(self, module: nn.Module, path: str) -> nn.Module:
        """What goes at ``path``, a module untraced code calls whole: its rewrite, or the module itself."""
        if id(module) not in self.decided:
            self.decided[id(module)] = self._decide(module, path)
        return self.decided[id(module)]

    def _decide(self, module: nn.Module, path: str) -> nn.Module:
        if isinstance(module, self.leaf_classes) or path in self.leaf_modules or _plain_torch_module(module):
            return module
        # an op module on its own is rewritten inside a holder, so that it can carry its blur
        holder = nn.Sequential(module) if isinstance(module, tuple(MODULES)) else None
        leaves = re_rooted(self.leaf_modules, path)
        try:
            rewritten = self.rewrite(holder or module, path, leaves, frozenset(self.reached))
        except UntraceableModelError as error:
            self.descend(module, path, uses(module, ["forward"]), error.summary)
            return module
        part = rewritten if holder is None else rewritten._modules["0"]
        decisions = [in_model(change, path, holder is not None) for change in changes(rewritten)]
        self.changes.extend(decisions)
        if any(change.action != "skipped" for change in decisions):
            self.rewritten.append(path)
        return part

    def descend(self, module: nn.Module, path: str, found: dict[str, Use], reason: str) -> None:
        """Go through the children of ``module``, whose own code runs as it is, by how that code uses them."""
        children = [(name, child) for name, child in module._modules.items() if child is not None]
        if not children:
            self.untraced.append(Untraced(path, type(module).__name__, reason))
        for name, child in children:
            child_path = f"{path}.{name}" if path else name
            use = found.get(name)
            if use is None:  # this code never calls it: blurs there would not run
                if _has_strided_ops(child):
                    self.untraced.append(Untraced(child_path, type(child).__name__, f"{reason}; not called there"))
            elif use.opaque:
                self._leave(child, child_path, use.opaque)
            elif use.reached_into:
                self._leave(child, child_path, None)
                why = f"its caller reaches into it ({_reached(use)}): its own forward is not what runs"
                self.untraced.append(Untraced(child_path, type(child).__name__, why))
                if child._modules:
                    self.descend(child, child_path, _inner_uses(child, use), why)
            else:
                module._modules[name] = self.visit(child, child_path)

    def _leave(self, module: nn.Module, path: str, reason: str | None) -> None:
        """Record that untraced code reaches ``module`` (and, with a reason, that its subtree stays as it is)."""
        self.reached.update(id(sub) for sub in (module.modules() if reason else [module]))
        if reason:
            self.untraced.append(Untraced(path, type(module).__name__, reason))


def _inner_uses(module: nn.Module, use: Use) -> dict[str, Use]:
    """How code reaches the children of ``module``: through the uses above, and through its own methods it calls."""
    methods = use.methods | ({"forward"} if use.called else set())
    found = uses(module, methods) if methods else {}
    for name, inner in use.reached.items():
        found.setdefault(name, Use()).merge(inner)
    if use.children_called:
        for name in module._modules:
            found.setdefault(name, Use()).merge(Use(called=True))
    return found


def _reached(use: Use) -> str:
    """What code uses of a module it reaches into: its children, its methods, or each child in turn."""
    used = [*sorted(use.reached), *(f"{method}()" for method in sorted(use.methods))]
    return ", ".join(used) if used else "each of its children"


def re_rooted(leaf_modules: Iterable[type[nn.Module] | str], path: str) -> Leaves:
    """``leaf_modules`` for the submodule at ``path``: classes, and the paths under it made relative."""
    prefix = f"{path}."
    return tuple(
        leaf[len(prefix) :] if isinstance(leaf, str) else leaf
        for leaf in leaf_modules
        if not isinstance(leaf, str) or leaf.startswith(prefix)
    )


def in_model(change: Change, path: str, held: bool = False) -> Change:
    """``change`` with its module paths made full paths in the model (``held``: the part is the op itself)."""
    if held:  # paths inside the holder start with its one child, "0"
        return dataclasses.replace(change, target=path, blur=None if change.blur is None else path + change.blur[1:])
    blur = None if change.blur is None else f"{path}.{change.blur}"
    return dataclasses.replace(change, target=f"{path}.{change.target}", blur=blur)


def _plain_torch_module(module: nn.Module) -> bool:
    """A torch.nn module that is not a conv or pool (a norm, an activation): nothing in it to blur."""
    return BlurTracer().is_leaf_module(module, "") and not isinstance(module, tuple(MODULES))


def _has_strided_ops(module: nn.Module) -> bool:
    return any(isinstance(sub, tuple(MODULES)) and any(s > 1 for s in _strides(sub.stride)) for sub in module.modules())


def _strides(stride: int | tuple[int, ...] | None) -> tuple[int, ...]:
    return (stride,) if isinstance(stride, int) else tuple(stride or ())
