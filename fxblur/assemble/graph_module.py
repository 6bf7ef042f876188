"""The GraphModules a rewrite builds: over a module's whole tree, one graph per mode, copies that keep everything.

``graph_module_over`` makes a module that runs given graphs over an existing module's
tree: its children, parameters, buffers, hooks and plain attributes are that module's, so
``state_dict()`` has exactly the original keys (parameters the forward does not use
included), and hooks fire as before. torch.fx's own ``GraphModule(root, graph)`` keeps only
what the graph references, in reference order, and no hooks.

- The root of a rewritten model is a ``BlurGraphModule`` named like the model's class.
- A submodule that gets a forward of its own (``fxblur.assemble.nesting``) keeps its class
  too: it becomes an instance of a subclass of ``BlurGraphModule`` *and* of its original
  class (``Rewritten[Bottleneck]``), so a ``Sequential`` still iterates and indexes, and an
  ``isinstance`` check on a block (an FSDP or activation-checkpointing policy) still holds.
  Methods of the original class other than ``forward`` are the original's.
- A model whose forward reads ``self.training`` (Inception's auxiliary head, stochastic depth
  baked into a call) traces to a different graph in each mode: ``TrainEvalGraphModule``
  holds both and runs the one that matches its mode, like the original does.

``assemble`` builds the single flat graph of ``transform(flatten=True)``: modules the
tracer went through become bare containers there, since their own ``forward`` no longer
describes what the graph computes.

Copies keep what fxblur adds: ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load``
give back the same classes and class names, both graphs of a ``TrainEvalGraphModule``,
hooks, and the decisions that ``fxblur.changes`` reads.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxblur._compat import GRAPH_ATTRIBUTE
from fxblur.trace.calls import forget_calls

_TREE = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


class BlurGraphModule(fx.GraphModule):
    """The GraphModule ``fxblur.transform`` returns; it pickles and copies whole.

    torch.fx pickles a GraphModule as its generated code and re-traces that code on load,
    which loses ``meta`` (where the decisions live), hooks and the class name, and knows of
    one graph only. Here each graph travels as a plain GraphModule over the same modules (so
    as code, the way torch.fx keeps graphs across versions), and the module comes back as
    it was. Loading a whole module with ``torch.load`` needs ``weights_only=False``.

    Example:
        >>> import pickle
        >>> gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
        >>> clone = pickle.loads(pickle.dumps(gm))
        >>> type(clone).__name__, fxblur.changes(clone) == fxblur.changes(gm)
        ('ResNet', True)
    """

    _graph_attributes: tuple[str, ...] = (GRAPH_ATTRIBUTE,)

    def __setattr__(self, name: str, value: Any) -> None:
        baked = self.__dict__.get(_BAKED)
        if baked and name in baked and not _same_value(baked[name], value):
            warnings.warn(
                f"{type(self).__name__}.{name} was {baked[name]!r} when fxblur rewrote this module's forward, which "
                f"reads plain attributes as constants: setting it to {value!r} does not change what it computes. "
                "Set it on the original model and transform that again.",
                BakedAttributeWarning,
                stacklevel=2,
            )
        super().__setattr__(name, value)

    def __reduce__(self) -> tuple[Callable[..., BlurGraphModule], tuple]:
        state = {name: value for name, value in self.__dict__.items() if not isinstance(value, fx.Graph)}
        # A GraphModule takes ownership of its graph: hand the carriers copies.
        carriers = tuple(fx.GraphModule(self, copy.deepcopy(self.__dict__[name])) for name in self._graph_attributes)
        return _unpickle, (*_class_spec(self), state, carriers)

    def __deepcopy__(self, memo: dict[int, Any]) -> BlurGraphModule:
        kind, original, class_name = _class_spec(self)
        clone = _class_for(kind, original).__new__(_class_for(kind, original))
        memo[id(self)] = clone
        state = {name: value for name, value in self.__dict__.items() if not isinstance(value, fx.Graph)}
        graphs = [copy.deepcopy(self.__dict__[name], memo) for name in self._graph_attributes]
        _restore(clone, class_name, copy.deepcopy(state, memo), graphs)
        return clone

    def _current_graph(self) -> fx.Graph:
        return self.__dict__[self._graph_attributes[0]]


class BakedAttributeWarning(UserWarning):
    """A plain attribute of a module whose forward fxblur rewrote was set: the graph uses its old value."""


_BAKED = "_fxblur_baked"
_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))


def _same_value(old: Any, new: Any) -> bool:
    return type(old) is type(new) and old == new


def bake(gm: BlurGraphModule) -> None:
    """Remember ``gm``'s plain public attributes, which its generated forward may have read as constants.

    Not ``training``: a module whose graph depends on its mode has one graph per mode.
    """
    own = _graph_module_state() | {"training"}
    gm.__dict__[_BAKED] = {
        name: value
        for name, value in gm.__dict__.items()
        if not name.startswith("_") and name not in own and _plain(value)
    }


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

    def _current_graph(self) -> fx.Graph:
        return self.train_graph if self.training else self.eval_graph


class _ModuleInit:
    """Between ``GraphModule`` and a module's original class: runs ``nn.Module.__init__``, not the original's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)


@functools.cache
def _class_for(kind: type[BlurGraphModule], original: type[nn.Module] | None) -> type[BlurGraphModule]:
    """``kind`` itself, or the subclass of ``kind`` and ``original`` that a rewritten submodule is."""
    if original is None:
        return kind
    return type(f"Rewritten[{original.__name__}]", (kind, _ModuleInit, original), {"__module__": __name__})


def _class_spec(gm: BlurGraphModule) -> tuple[type[BlurGraphModule], type[nn.Module] | None, str]:
    """What a copy needs to rebuild ``gm``'s class: its kind, its original class (if it keeps one), its name."""
    mro = type(gm).__mro__
    kind = TrainEvalGraphModule if TrainEvalGraphModule in mro else BlurGraphModule
    original = mro[mro.index(_ModuleInit) + 1] if _ModuleInit in mro else None
    return kind, original, type(gm).__name__


def graph_module_over(module: nn.Module, graphs: dict[bool, fx.Graph], keep_class: bool) -> BlurGraphModule:
    """A module running ``graphs`` (one per mode, or one for both) over ``module``'s tree and state.

    Args:
        module: fxblur's copy of the module; the result takes its children, tensors, hooks
            and attributes.
        graphs: the graph for each mode (``True``: train); equal graphs make one.
        keep_class: make the result an instance of ``module``'s class too (for a submodule;
            the root is a ``BlurGraphModule`` named after its class).
    """
    for graph in graphs.values():
        forget_calls(graph)
    unique = list({graph.python_code("self").src: graph for graph in graphs.values()}.values())
    kind = BlurGraphModule if len(unique) == 1 else TrainEvalGraphModule
    original = type(module) if keep_class and not isinstance(module, fx.GraphModule) else None
    cls = _class_for(kind, original)
    name = type(module).__name__
    for graph in graphs.values():
        for node in graph.nodes:
            if node.op == "get_attr":
                register_tensor(module, node.target)
    gm = cls(module, unique[0], name) if kind is BlurGraphModule else cls(module, graphs[True], graphs[False], name)
    _take_state(gm, module)
    bake(gm)
    return gm


class WorkingGraphModule(fx.GraphModule):
    """The GraphModule the passes of ``transform`` rewrite: a graph over the model's own tree, never run.

    Its graph is carried into the result (``fxblur.assemble.nesting``), so its own code is
    never generated: ``recompile`` does nothing (PassManager calls it after every pass).
    """

    def recompile(self) -> None:
        return None


def working_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule for the passes: ``graph`` over ``root``'s own module tree (changes go to ``root``)."""
    for node in graph.nodes:
        if node.op == "get_attr":
            register_tensor(root, node.target)
    gm = WorkingGraphModule(root, graph)
    for name in _TREE:
        gm.__dict__[name] = root.__dict__[name]
    return gm


def _take_state(gm: BlurGraphModule, module: nn.Module) -> None:
    """Give ``gm`` everything of ``module``'s but what makes it a GraphModule: tree, tensors, hooks, attributes."""
    owned = _graph_module_state()
    for name, value in module.__dict__.items():
        if name in owned or (name not in _MODULE_STATE and hasattr(type(gm), name) and name not in gm.__dict__):
            continue
        gm.__dict__[name] = value.copy() if isinstance(value, (dict, set)) else value


_MODULE_STATE = frozenset(nn.Module().__dict__)


@functools.cache
def _graph_module_state() -> frozenset[str]:
    """The instance attributes a GraphModule has and a plain module does not (``_graph``, ``meta``, ...)."""
    return frozenset(fx.GraphModule(nn.Module(), fx.Graph()).__dict__) - _MODULE_STATE


def assemble(root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph) -> BlurGraphModule:
    """The flat result (``flatten=True``): a GraphModule over ``root``'s whole tree running the graph per mode.

    ``root`` is fxblur's own copy of the model and is rearranged in place; it must already
    hold every module the graphs call.
    """
    graphs = list(dict.fromkeys((train_graph, eval_graph)))
    called = {n.target for g in graphs for n in g.nodes if n.op == "call_module"}
    ancestors = {"", *(t.rsplit(".", i)[0] for t in called for i in range(1, t.count(".") + 1))}
    tree = _bare_traced_modules(root, "", called, ancestors)
    return graph_module_over(tree, {True: train_graph, False: eval_graph}, keep_class=False)


def _unpickle(
    kind: type[BlurGraphModule],
    original: type[nn.Module] | None,
    class_name: str,
    state: dict[str, Any],
    carriers: tuple[fx.GraphModule, ...],
) -> BlurGraphModule:
    """The inverse of ``BlurGraphModule.__reduce__``: the graphs come from the carriers' code."""
    cls = _class_for(kind, original)
    gm = cls.__new__(cls)
    _restore(gm, class_name, state, [carrier.graph for carrier in carriers])
    return gm


def _restore(gm: BlurGraphModule, class_name: str, state: dict[str, Any], graphs: list[fx.Graph]) -> None:
    """Fill a new, empty ``gm`` with ``state`` and ``graphs`` (in ``_graph_attributes`` order)."""
    gm.__dict__.update(state)
    for name, graph in zip(gm._graph_attributes, graphs, strict=True):
        gm.__dict__[name] = graph
    type(gm).__name__ = class_name
    gm.graph = gm._current_graph()  # takes ownership and compiles forward


def register_tensor(owner_root: nn.Module, target: str) -> None:
    """Make a tensor the graph reads a buffer of its owner, if the model never registered it.

    Tracer constants and plain tensor attributes become non-persistent buffers: they
    follow ``.to()`` but add no ``state_dict()`` key that the original lacks.
    """
    owner_path, _, name = target.rpartition(".")
    owner = owner_root.get_submodule(owner_path)
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
    if type(module).forward is nn.Module.forward or not path:
        return module
    container = nn.Module()
    container.training = module.training
    for name, value in module.__dict__.items():
        if name in _TREE or (not name.startswith("_") and name not in container.__dict__):
            container.__dict__[name] = value
    return container
