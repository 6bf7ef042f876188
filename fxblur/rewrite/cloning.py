"""Copies of a module tree that share its tensors: how ``transform`` leaves the original alone.

``share_tensors`` copies every module object of a tree but none of its parameters or
buffers. The copy can be re-wired, switched between train and eval, and given new
submodules without the original noticing, while an optimizer built on the original's
parameters keeps training the copy (Composer's reason for its ``optimizers=`` argument).

Example:
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> twin = share_tensors(model)
    >>> twin[0] is model[0], twin[0].weight is model[0].weight
    (False, True)
    >>> _ = twin.eval(); model[1].training
    True
"""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn


def share_tensors(module: nn.Module) -> nn.Module:
    """A copy of ``module`` and all its submodules that holds the same tensors."""
    return _clone(module, {})


def _clone(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:  # a submodule used at several places stays one module
        return memo[id(module)]
    graph_module = isinstance(module, fx.GraphModule)
    # A GraphModule's forward lives on a class of its own: give the clone a new one.
    clone = type(module).__new__(type(module)) if graph_module else object.__new__(type(module))
    memo[id(module)] = clone
    # Containers (parameter, buffer and hook tables) are copied one level deep, so that
    # registering or replacing on the clone leaves the original's tables as they are.
    clone.__dict__ = {
        name: value.copy() if isinstance(value, (dict, set)) else value for name, value in module.__dict__.items()
    }
    clone._modules = {name: None if child is None else _clone(child, memo) for name, child in module._modules.items()}
    if graph_module:
        # Graphs know the module that owns them and are edited in place: copy them too.
        graphs = {id(g): copy.deepcopy(g) for g in module.__dict__.values() if isinstance(g, fx.Graph)}
        for name, value in module.__dict__.items():
            if isinstance(value, fx.Graph):
                clone.__dict__[name] = graphs[id(value)]
        clone.graph = clone._graph  # takes ownership and compiles the clone's own forward
    return clone
