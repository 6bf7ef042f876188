"""The GraphModule that ``transform`` returns: the rewritten graph over the whole module tree.

torch.fx's ``GraphModule(root, graph)`` keeps only the modules its graph calls. fxblur keeps
the model's whole tree (with the rewritten modules in place), so ``state_dict()`` has exactly
the original keys, parameters the forward does not use included. As in torch.fx, modules
the tracer went through (``layer1``, a ``Bottleneck``) become bare containers: their own
``forward`` no longer describes what the graph computes, so it must not be callable.

A model whose forward reads ``self.training`` (Inception's auxiliary head, stochastic depth
baked into a call) traces to a different graph in each mode. ``TrainEvalGraphModule``
holds both and runs the one that matches its mode, like the original does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn


class TrainEvalGraphModule(fx.GraphModule):
    """A GraphModule with a train graph and an eval graph; ``train(mode)`` picks one.

    Example:
        >>> gm = fxblur.transform(torchvision.models.googlenet(init_weights=False), verbose=False)
        >>> x = torch.randn(2, 3, 64, 64)
        >>> type(gm.train()(x)).__name__, type(gm.eval()(x)).__name__
        ('GoogLeNetOutputs', 'Tensor')
    """

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph, class_name: str = "GraphModule"):
        super().__init__(root, train_graph if root.training else eval_graph, class_name)
        self.train_graph = train_graph
        self.eval_graph = eval_graph

    def train(self, mode: bool = True) -> TrainEvalGraphModule:
        super().train(mode)
        graph = self.train_graph if mode else self.eval_graph
        if self.graph is not graph:
            self.graph = graph  # recompiles forward
        return self

    def _deepcopy_init(self) -> Any:
        def init(module: TrainEvalGraphModule, root: nn.Module, graph: fx.Graph) -> None:
            TrainEvalGraphModule.__init__(module, root, root.train_graph, root.eval_graph, type(self).__name__)

        return init


def assemble(root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule over ``root``'s whole module tree that runs the given graph per mode.

    ``root`` is fxblur's own copy of the model and is rearranged in place; it must already
    hold every module the graphs call.
    """
    graphs = list(dict.fromkeys((train_graph, eval_graph)))
    called = {n.target for g in graphs for n in g.nodes if n.op == "call_module"}
    ancestors = {"", *(t.rsplit(".", i)[0] for t in called for i in range(1, t.count(".") + 1))}
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "get_attr":
                _register_tensor(root, node.target)
    tree = _bare_traced_modules(root, "", called, ancestors)
    class_name = type(root).__name__
    if train_graph is eval_graph:
        gm = fx.GraphModule(tree, train_graph, class_name)
    else:
        gm = TrainEvalGraphModule(tree, train_graph, eval_graph, class_name)
    # The GraphModule holds what its graph referenced, in reference order; give it the
    # whole tree instead, in the model's order, so that state_dict() lists the same keys.
    gm._modules = dict(tree._modules)
    gm._parameters = dict(tree._parameters)
    gm._buffers = dict(tree._buffers)
    gm._non_persistent_buffers_set = set(tree._non_persistent_buffers_set)
    return gm


def _register_tensor(root: nn.Module, target: str) -> None:
    """Make a tensor the graph reads a buffer of its owner, if the model never registered it.

    Tracer constants and plain tensor attributes become non-persistent buffers: they
    follow ``.to()`` but add no ``state_dict()`` key that the original lacks.
    """
    owner_path, _, name = target.rpartition(".")
    owner = root.get_submodule(owner_path)
    value = getattr(owner, name)
    if isinstance(value, torch.Tensor) and name not in owner._parameters and name not in owner._buffers:
        owner.__dict__.pop(name, None)
        owner.register_buffer(name, value, persistent=False)


def _bare_traced_modules(module: nn.Module, path: str, called: set[str], ancestors: set[str]) -> nn.Module:
    """Replace every module the tracer went through by a bare container of the same tensors.

    Such a module's own ``forward`` no longer describes what the graph computes (its
    strided convs may now run at stride 1), so it must not stay callable. Modules the
    graph calls, subtrees it never reaches, and containers without a ``forward``
    (``ModuleList``, ``ModuleDict``) are kept as they are.
    """
    if path in called or path not in ancestors:
        return module
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _bare_traced_modules(child, f"{path}.{name}" if path else name, called, ancestors)
    if type(module).forward is nn.Module.forward:
        return module
    container = nn.Module()
    container.training = module.training
    container._parameters = module._parameters
    container._buffers = module._buffers
    container._non_persistent_buffers_set = module._non_persistent_buffers_set
    container._modules = module._modules
    return container


def install_called_modules(root: nn.Module, gm: fx.GraphModule) -> None:
    """Put into ``root``'s tree every module that ``gm``'s graph calls and ``root`` lacks."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        owner_path, _, name = node.target.rpartition(".")
        owner = _get_or_add_container(root, owner_path, gm)
        if owner._modules.get(name) is not module:
            owner.add_module(name, module)


def _get_or_add_container(root: nn.Module, path: str, gm: fx.GraphModule) -> nn.Module:
    owner = root
    walked: list[str] = []
    for name in path.split(".") if path else ():
        walked.append(name)
        if owner._modules.get(name) is None:
            owner.add_module(name, gm.get_submodule(".".join(walked)))
        owner = owner._modules[name]
    return owner
