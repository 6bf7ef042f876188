"""Copies of a module tree that share its tensors: how ``transform`` leaves the original alone.

``share_tensors`` copies every module object of a tree but none of its parameters or
buffers. The copy can be re-wired, switched between train and eval, and given new
submodules without the original noticing, while an optimizer built on the original's
parameters keeps training the copy (Composer's reason for its ``optimizers=`` argument).

Methods of a module stored on the module itself (hooks it registered with its own methods,
as lazy modules do; a ``forward`` chosen in ``__init__``, as some timm models do) act on the
copy, and the handles it keeps to its hooks point at the copy's tables. The
not yet materialised parameters of a lazy module (``nn.LazyLinear``) cannot be shared:
the copy gets its own, so that its first forward pass leaves the original lazy.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> twin = share_tensors(model)
    >>> twin[0] is model[0], twin[0].weight is model[0].weight
    (False, True)
    >>> _ = twin.eval(); model[1].training
    True
    >>> lazy = torch.nn.LazyLinear(2)
    >>> _ = share_tensors(lazy)(torch.ones(1, 3)); lazy.has_uninitialized_params()
    True
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from typing import Any

import torch.fx as fx
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter
from torch.utils.hooks import RemovableHandle

from fxblur._compat import GRAPH_ATTRIBUTE, new_graph_module_of_class, rebind_wrapped_hook, retarget_handle


def share_tensors(module: nn.Module) -> nn.Module:
    """A copy of ``module`` and all its submodules that holds the same tensors."""
    return _clone(module, {})


def _clone(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:  # a submodule used at several places stays one module
        return memo[id(module)]
    graph_module = isinstance(module, fx.GraphModule)
    # A GraphModule's forward lives on a class of its own: give the clone a new one.
    clone = new_graph_module_of_class(type(module)) if graph_module else object.__new__(type(module))
    memo[id(module)] = clone
    # Containers (parameter, buffer and hook tables) are copied one level deep, so that
    # registering or replacing on the clone leaves the original's tables as they are. The
    # state is set directly: a wrapper's own __setattr__ may forward to what it wraps.
    state = {name: value.copy() if isinstance(value, (dict, set)) else value for name, value in module.__dict__.items()}
    object.__setattr__(clone, "__dict__", state)
    state["_modules"] = {
        name: None if child is None else _clone(child, memo) for name, child in module._modules.items()
    }
    _own_hooks_and_lazy_tensors(module, clone)
    if graph_module:
        # Graphs know the module that owns them and are edited in place: copy them too.
        graphs = {id(g): copy.deepcopy(g) for g in module.__dict__.values() if isinstance(g, fx.Graph)}
        for name, value in module.__dict__.items():
            if isinstance(value, fx.Graph):
                clone.__dict__[name] = graphs[id(value)]
        clone.graph = clone.__dict__[GRAPH_ATTRIBUTE]  # takes ownership and compiles the clone's own forward
    return clone


def _own_hooks_and_lazy_tensors(module: nn.Module, clone: nn.Module) -> None:
    """Rebind ``module``'s hooks on itself to ``clone``, and give ``clone`` its own unmaterialised tensors."""
    hook_tables = [name for name, value in clone.__dict__.items() if name.endswith("hooks") and isinstance(value, dict)]
    tables = {id(module.__dict__[name]): clone.__dict__[name] for name in hook_tables}
    for name, value in clone.__dict__.items():
        if name in hook_tables:
            for key, hook in value.items():
                value[key] = _rebound(hook, module, clone)
        elif isinstance(value, RemovableHandle):
            clone.__dict__[name] = retarget_handle(value, tables)
        else:  # a method stored on the instance (timm picks its forward so)
            clone.__dict__[name] = _rebound(value, module, clone)
    for table, fresh in (("_parameters", _fresh_parameter), ("_buffers", _fresh_buffer)):
        for name, tensor in clone.__dict__[table].items():
            if isinstance(tensor, (UninitializedParameter, UninitializedBuffer)):
                clone.__dict__[table][name] = fresh(tensor)


def _rebound(hook: Any, module: nn.Module, clone: nn.Module) -> Any:
    if inspect.ismethod(hook) and hook.__self__ is module:
        return types.MethodType(hook.__func__, clone)
    return rebind_wrapped_hook(hook, functools.partial(_rebound, module=module, clone=clone), module, clone)


def _fresh_parameter(tensor: UninitializedParameter) -> UninitializedParameter:
    return UninitializedParameter(requires_grad=tensor.requires_grad, device=tensor.device, dtype=tensor.dtype)


def _fresh_buffer(tensor: UninitializedBuffer) -> UninitializedBuffer:
    return UninitializedBuffer(requires_grad=tensor.requires_grad, device=tensor.device, dtype=tensor.dtype)
