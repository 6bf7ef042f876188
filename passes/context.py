"""What the passes of one rewrite share across the graphs of a model: module replacements, made once, installed once.

A model whose forward reads ``self.training`` has a graph per mode, and both call the same
modules. A pass must therefore decide on a module over every call of it in every graph
(``realization``), and change it only once every graph has been rewritten
(``replace``/``configure`` now, ``install`` then): a graph rewritten later must still see
the modules as they were.

Example:
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2)))
    >>> context = RewriteContext([gm])
    >>> context.configure(gm.get_submodule("0"), padding_mode="circular")
    >>> gm.get_submodule("0").padding_mode
    'zeros'
    >>> context.install(gm); gm.get_submodule("0").padding_mode
    'circular'
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx
from torch import nn


class Realization(enum.Enum):
    """How an op module takes part in a rewrite, decided over all its calls."""

    MODULE = "module"  # replaced by a blurred version of itself that carries the blur
    STRIDE_ONE = "stride_one"  # replaced by a stride-1 copy; the blurs are nodes in the graph
    UNTOUCHED = "untouched"  # left as it is; blurs before it are nodes in the graph


class RewriteContext:
    """What the passes of one rewrite share across the graphs of a model (one per mode).

    Args:
        graph_modules: every graph of the model, each over the model's own module tree.
        frozen: ids of modules that code outside the graphs may call; they never change.
        scope: the path of the rewritten module in the model the user passed, when that is
            a submodule (``transform(strict=False)``): ``exclude`` patterns match full paths.
    """

    def __init__(self, graph_modules: Iterable[fx.GraphModule], frozen: frozenset[int] = frozenset(), scope: str = ""):
        self.frozen = frozen
        self.scope = scope
        self.calls: dict[int, list[tuple[fx.GraphModule, fx.Node]]] = {}
        for gm in graph_modules:
            for node in gm.graph.nodes:
                if node.op == "call_module":
                    self.calls.setdefault(id(gm.get_submodule(node.target)), []).append((gm, node))
        self._realizations: dict[int, Realization] = {}
        self._replacements: dict[str, nn.Module] = {}
        self._made: dict[int, nn.Module] = {}
        self._settings: dict[int, tuple[nn.Module, dict[str, Any]]] = {}

    def realization(self, module: nn.Module, decide: Callable[[list[tuple[fx.GraphModule, fx.Node]]], Realization]):
        """How ``module`` takes part, decided once by ``decide`` over every call of it in every graph."""
        key = id(module)
        if key not in self._realizations:
            self._realizations[key] = Realization.UNTOUCHED if key in self.frozen else decide(self.calls[key])
        return self._realizations[key]

    def replace(self, target: str, module: nn.Module, make: Callable[[], nn.Module]) -> nn.Module:
        """Replace ``module`` at ``target`` (on ``install``) by what ``make`` builds.

        Every call of the same module gets the same replacement, built now, on the first call:
        it copies the module as it is before any ``configure``.
        """
        if id(module) not in self._made:
            self._made[id(module)] = make()
        self._replacements[target] = self._made[id(module)]
        return self._made[id(module)]

    def configure(self, module: nn.Module, **settings: Any) -> None:
        """Set attributes of ``module`` (on ``install``)."""
        self._settings.setdefault(id(module), (module, {}))[1].update(settings)

    def install(self, root: nn.Module) -> None:
        """Put the replacements into ``root`` and apply the settings: once every graph has seen the modules."""
        for target, module in self._replacements.items():
            owner, _, name = target.rpartition(".")
            root.get_submodule(owner)._modules[name] = module
        for module, settings in self._settings.values():
            for name, value in settings.items():
                setattr(module, name, value)
        self._replacements.clear()
        self._settings.clear()
