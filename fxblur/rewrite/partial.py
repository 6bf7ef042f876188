"""Rewrite a model in parts when torch.fx cannot trace it whole: ``transform(strict=False)``.

Detection models are the usual case: their forward loops over images, targets and
proposals, which no symbolic trace can follow, while the backbone that does the
downsampling is plain tensor code. ``rewrite_parts`` walks the module tree from the top
and tries each submodule whole; the first traceable module on each path is a *part*. A
part in which something was blurred is replaced by its rewrite (a GraphModule); a
module that cannot be traced is searched one level down, and one without children is
recorded as untraced, with the reason, and left as it was. The model's own forward and
the forwards of untraceable containers run unchanged: strided functional calls written
directly in them cannot be reached.

The walk happens on fxblur's copy of the model: the original's containers are never
touched, and each part is rewritten from a copy of its own, so a part that turns out
to have nothing to blur stays exactly as it was. Paths in ``leaf_modules`` and
``exclude`` patterns are full paths in the model, as in the report.

Example:
    >>> class Gated(nn.Module):  # the data-dependent branch defeats torch.fx
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.features = nn.Sequential(nn.Conv2d(16, 16, 3), nn.MaxPool2d(2))
    ...     def forward(self, x):
    ...         y = self.features(x)
    ...         return y if y.sum() > 0 else -y
    >>> model = fxblur.transform(Gated(), strict=False, verbose=False)
    >>> type(model).__name__, isinstance(model.features, fx.GraphModule)
    ('Gated', True)
    >>> [change.target for change in fxblur.changes(model)], parts_of(model).rewritten
    (['features.1'], ('features',))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from fxblur.changes import Change, changes, metadata, store
from fxblur.rewrite.cloning import share_tensors
from fxblur.rewrite.tracer import UntraceableModelError

_PARTS_KEY = "fxblur.parts"

Leaves = tuple[type[nn.Module] | str, ...]
Rewrite = Callable[[nn.Module, str, Leaves], fx.GraphModule]


@dataclass(frozen=True)
class Untraced:
    """A module torch.fx could not trace, with no children to try instead; it runs as before."""

    path: str
    module: str
    reason: str


@dataclass(frozen=True)
class Parts:
    """Where a model was rewritten in parts.

    Attributes:
        rewritten: paths of the submodules now replaced by their rewrite, in module order.
        untraced: the modules that could not be traced and were left as they were.
    """

    rewritten: tuple[str, ...]
    untraced: tuple[Untraced, ...]


def rewrite_parts(model: nn.Module, error: UntraceableModelError, rewrite: Rewrite, leaf_modules: Leaves) -> nn.Module:
    """Replace the largest traceable submodules of ``model`` by their rewrite, in place.

    Args:
        model: fxblur's own copy of the user's model (its containers are re-wired).
        error: why ``model`` itself could not be traced.
        rewrite: rewrites one submodule whole, given its path in ``model`` and the
            ``leaf_modules`` re-rooted at it; raises ``UntraceableModelError`` if it cannot.
        leaf_modules: module classes and full module paths to leave alone.

    Returns:
        ``model``, with the decisions of every part (``fxblur.changes``) and a ``Parts``
        record (``parts_of``) stored on it.
    """
    walk = _Walk(rewrite, leaf_modules)
    walk.descend(model, "", error)
    store(model, walk.changes)
    metadata(model, create=True)[_PARTS_KEY] = Parts(tuple(walk.rewritten), tuple(walk.untraced))
    return model


def parts_of(model: nn.Module) -> Parts | None:
    """The ``Parts`` record of a model rewritten in parts, or ``None`` for any other module."""
    return metadata(model).get(_PARTS_KEY)


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

    def visit(self, module: nn.Module, path: str) -> nn.Module:
        """What goes at ``path``: the module's rewrite, or the module itself."""
        if id(module) not in self.decided:
            self.decided[id(module)] = self._decide(module, path)
        return self.decided[id(module)]

    def _decide(self, module: nn.Module, path: str) -> nn.Module:
        if isinstance(module, self.leaf_classes) or path in self.leaf_modules:
            return module
        try:
            part = self.rewrite(share_tensors(module), path, _re_rooted(self.leaf_modules, path))
        except UntraceableModelError as error:
            self.descend(module, path, error)
            return module
        decisions = [_in_model(change, path) for change in changes(part)]
        self.changes.extend(decisions)
        if not any(change.action != "skipped" for change in decisions):
            return module
        self.rewritten.append(path)
        return part

    def descend(self, module: nn.Module, path: str, error: UntraceableModelError) -> None:
        """Try the children of an untraceable ``module`` instead; record it if it has none."""
        children = [(name, child) for name, child in module._modules.items() if child is not None]
        if not children:
            self.untraced.append(Untraced(path, type(module).__name__, str(error).split("\nHint:")[0]))
        for name, child in children:
            module._modules[name] = self.visit(child, f"{path}.{name}" if path else name)


def _re_rooted(leaf_modules: Iterable[type[nn.Module] | str], path: str) -> Leaves:
    """``leaf_modules`` for the submodule at ``path``: classes, and the paths under it made relative."""
    prefix = f"{path}."
    return tuple(
        leaf[len(prefix) :] if isinstance(leaf, str) else leaf
        for leaf in leaf_modules
        if not isinstance(leaf, str) or leaf.startswith(prefix)
    )


def _in_model(change: Change, path: str) -> Change:
    """``change`` with its module paths made full paths in the model."""
    blur = None if change.blur is None else f"{path}.{change.blur}"
    return dataclasses.replace(change, target=f"{path}.{change.target}", blur=blur)
