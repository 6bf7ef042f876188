"""The GraphModule that ``transform`` returns: the rewritten graph over the whole module tree.

torch.fx's ``GraphModule(root, graph)`` keeps only the modules its graph calls. fxblur keeps
the model's whole tree (with the rewritten modules in place), so ``state_dict()`` has exactly
the original keys, parameters the forward does not use included. As in torch.fx, modules
the tracer went through (``layer1``, a ``Bottleneck``) become bare containers: their own
``forward`` no longer describes what the graph computes, so it must not be callable.

A model whose forward reads ``self.training`` (Inception's auxiliary head, stochastic depth
baked into a call) traces to a different graph in each mode. ``TrainEvalGraphModule``
holds both and runs the one that matches its mode, like the original does.

Copies keep what fxblur adds to a GraphModule: ``copy.deepcopy``, ``pickle`` and
``torch.save``/``torch.load`` give back the same class and class name, both graphs of a
``TrainEvalGraphModule``, and the decisions that ``fxblur.changes`` reads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

_TREE = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


class BlurGraphModule(fx.GraphModule):
    """The GraphModule ``fxblur.transform`` returns; it pickles and copies whole.

    torch.fx pickles a GraphModule as its generated code and re-traces that code on load,
    which loses ``meta`` (where the decisions live) and the class name, and knows of one
    graph only. Here each graph travels as a plain GraphModule over the same modules (so
    as code, the way torch.fx keeps graphs across versions), and the module comes back as
    it was. Loading a whole module with ``torch.load`` needs ``weights_only=False``.

    Example:
        >>> import pickle
        >>> gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
        >>> clone = pickle.loads(pickle.dumps(gm))
        >>> type(clone).__name__, fxblur.changes(clone) == fxblur.changes(gm)
        ('ResNet', True)
    """

    _graph_attributes: tuple[str, ...] = ("_graph",)

    def __reduce__(self) -> tuple[Callable[..., BlurGraphModule], tuple]:
        state = {name: value for name, value in self.__dict__.items() if not isinstance(value, fx.Graph)}
        # A GraphModule takes ownership of its graph: hand the carriers copies.
        carriers = tuple(fx.GraphModule(self, copy.deepcopy(self.__dict__[name])) for name in self._graph_attributes)
        return _unpickle, (_defining_class(self), type(self).__name__, state, carriers)

    def _deepcopy_init(self) -> Callable[[nn.Module, nn.Module, fx.Graph], None]:
        cls, class_name, names = _defining_class(self), type(self).__name__, self._graph_attributes

        def init(module: nn.Module, root: nn.Module, graph: fx.Graph) -> None:
            cls.__init__(module, root, *(root.__dict__[name] for name in names), class_name)

        return init


class TrainEvalGraphModule(BlurGraphModule):
    """A GraphModule with a train graph and an eval graph; ``train(mode)`` picks one.

    Example:
        >>> gm = fxblur.transform(torchvision.models.googlenet(init_weights=False), verbose=False)
        >>> x = torch.randn(2, 3, 64, 64)
        >>> type(gm.train()(x)).__name__, type(gm.eval()(x)).__name__
        ('GoogLeNetOutputs', 'Tensor')
    """

    _graph_attributes = ("train_graph", "eval_graph")

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


def assemble(root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph) -> BlurGraphModule:
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
    if train_graph is eval_graph:
        return _over_tree(BlurGraphModule, tree, (train_graph,), type(root).__name__)
    return _over_tree(TrainEvalGraphModule, tree, (train_graph, eval_graph), type(root).__name__)


def _over_tree(
    cls: type[BlurGraphModule], tree: nn.Module, graphs: tuple[fx.Graph, ...], class_name: str
) -> BlurGraphModule:
    """A ``cls`` running ``graphs`` that holds ``tree``'s modules and tensors, all of them.

    The GraphModule constructor keeps what the graph references, in reference order; the
    whole tree, in the model's order, makes ``state_dict()`` list the same keys.
    """
    gm = cls(tree, *graphs, class_name)
    for name in _TREE:
        gm.__dict__[name] = copy.copy(tree.__dict__[name])
    _keep_plain_attributes(tree, gm)
    return gm


def _keep_plain_attributes(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the public attributes ``source`` set in ``__init__`` that are not tensors or modules.

    Code that builds on a model reads them (``backbone.out_channels``, ``model.num_classes``);
    names the target's class defines (``graph``, ``code``, ``training``) stay the target's.
    """
    for name, value in source.__dict__.items():
        if not name.startswith("_") and name not in target.__dict__ and not hasattr(type(target), name):
            target.__dict__[name] = value


def _unpickle(
    cls: type[BlurGraphModule], class_name: str, state: dict[str, Any], carriers: tuple[fx.GraphModule, ...]
) -> BlurGraphModule:
    """The inverse of ``BlurGraphModule.__reduce__``: the graphs come from the carriers' code."""
    root = nn.Module()
    root.__dict__.update(state)
    gm = cls(root, *(carrier.graph for carrier in carriers), class_name)
    gm.__dict__.update(state)  # the whole tree, meta, hooks: all the constructor does not carry over
    return gm


def _defining_class(gm: fx.GraphModule) -> type[BlurGraphModule]:
    """``BlurGraphModule`` or ``TrainEvalGraphModule``: torch.fx gives each instance a subclass of its own."""
    return next(cls for cls in type(gm).__mro__ if "GraphModuleImpl" not in cls.__qualname__)


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
    _keep_plain_attributes(module, container)
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
