"""The graph of one module call: its own nodes, those of the calls inlined into it, and calls of the rest.

A *region* is a module call that gets a graph of its own in the result, together with the
calls inlined into it. ``build_region`` copies the region's nodes out of the flat graph,
turns what the call received into placeholders and what it returned into the output,
and calls every child that is a region of its own (or an untouched module) as a module.
Where that is impossible it raises ``NotSplittable`` naming the call to inline and why:

- a node reads a value the call does not receive as an argument, or a child's value the
  child does not return;
- a value made in the call is read outside it but not returned;
- it calls a module that is not one of its submodules, or reads a tensor that does not
  belong to it;
- it passes or returns something a graph cannot carry;
- a module that makes no node of its own (an ``nn.Identity``) runs where the split loses it.

Tensors the graph reads that the module does not hold under a name (a tracer constant, a
tensor the trace saw as a value) become non-persistent buffers of the module; ``Buffers``
allocates their names and registers them only when the result is emitted, so a region that
is abandoned (its call inlined after all) leaves no trace on any module.

Example:
    >>> from fxblur.trace import trace
    >>> block = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Flatten())
    >>> traced = trace(block)
    >>> inner = traced.root.children[0]
    >>> owners = {call: call for call in traced.root.walk()}
    >>> graph = build_region(inner, traced.graph, owners, Buffers())
    >>> [node.op for node in graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import collections
import inspect
import itertools
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxblur._compat import IMMUTABLE_DICT, IMMUTABLE_LIST
from fxblur.trace.calls import Call, call_of

_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


class NotSplittable(Exception):
    """The region of ``call`` cannot be split from its caller's: ``call`` must be inlined, for ``reason``."""

    def __init__(self, call: Call, reason: str) -> None:
        super().__init__(reason)
        self.call = call
        self.reason = reason


class Buffers:
    """Non-persistent buffers the regions need on their modules: names allocated now, registered on ``register``.

    A tensor gets one name per module, the same for every region that reads it there.
    """

    def __init__(self) -> None:
        self._names: dict[tuple[int, int], str] = {}
        self._pending: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}

    def name(self, module: nn.Module, tensor: torch.Tensor, wanted: str | None = None) -> str:
        """The name under which ``module`` will hold ``tensor``: ``wanted`` if free, else ``_fxblur_constant<i>``."""
        key = (id(module), id(tensor))
        if key not in self._names:
            taken = self._pending.setdefault(id(module), (module, {}))[1]
            numbered = (f"_fxblur_constant{i}" for i in itertools.count())
            candidates = itertools.chain([wanted] if wanted else [], numbered)
            name = next(n for n in candidates if n not in taken and getattr(module, n, tensor) is tensor)
            taken[name] = tensor
            self._names[key] = name
        return self._names[key]

    def register(self, used: Iterable[tuple[nn.Module, str]]) -> None:
        """Register the pending buffers that the emitted graphs read: ``(module, name)`` pairs."""
        for module, name in used:
            pending = self._pending.get(id(module), (None, {}))[1]
            if name in pending and name not in module._buffers:
                module.register_buffer(name, pending[name], persistent=False)


def build_region(call: Call, flat: fx.Graph, owners: dict[Call, Call], buffers: Buffers) -> fx.Graph:
    """The graph of ``call``'s region (see the module docstring); ``NotSplittable`` where there is none."""
    return _RegionBuilder(call, flat, owners, buffers).build()


def root_of(call: Call) -> Call:
    return list(call.lineage())[-1]


def buffers_read(graph: fx.Graph, module: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(owner, name)`` of every tensor attribute ``graph``, running over ``module``, reads."""
    found = []
    for node in graph.nodes:
        if node.op == "get_attr":
            owner_path, _, name = node.target.rpartition(".")
            found.append((module.get_submodule(owner_path), name))
    return found


class _RegionBuilder:
    def __init__(self, call: Call, flat: fx.Graph, owners: dict[Call, Call], buffers: Buffers) -> None:
        self.call = call
        self.flat = flat
        self.owners = owners
        self.buffers = buffers
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.inputs: dict[fx.Node, tuple[fx.Node, tuple]] = {}
        self.callee_calls: dict[Call, fx.Node] = {}
        self.callee_outputs: dict[fx.Node, tuple[Call, tuple]] = {}  # by the latest call that returned it
        self.read: dict[tuple[Call, fx.Node], fx.Node] = {}
        self.attributes: dict[str, fx.Node] = {}

    def build(self) -> fx.Graph:
        call = self.call
        if call.parent is not None:
            self._placeholders()
        nodeless = _nodeless_calls(root_of(call), self.flat)
        for node in self.flat.nodes:
            owner = self.owners[call_of(node)]
            if owner is call:
                self._copy(node)
            else:
                self._call_within(owner)
            for each in nodeless.pop(node, ()):
                self._call_within(self.owners[each])
        for lost in (each for calls in nodeless.values() for each in calls):
            if self._callee_holding(self.owners[lost]) not in (None, *self.callee_calls):
                raise NotSplittable(lost, "it makes no node of its own, and where it runs was lost")
        if call.parent is not None:
            self.graph.output(self._emit_structure(call.output, call))
        self._check_nothing_escapes()
        return self.graph

    def _call_within(self, owner: Call) -> None:
        """Call the module this graph calls within which ``owner`` ran, if any, unless done already."""
        callee = self._callee_holding(owner)
        if callee is not None and callee not in self.callee_calls:
            self._call_callee(callee)

    # -- inputs -----------------------------------------------------------------------
    def _placeholders(self) -> None:
        names = _parameter_names(self.call.module, len(self.call.args))
        for name, value in [*zip(names, self.call.args, strict=True), *self.call.kwargs.items()]:
            placeholder = self.graph.placeholder(name)
            for node, path in _leaves(value):
                self.inputs.setdefault(node, (placeholder, path))

    def _callee_holding(self, owner: Call) -> Call | None:
        """The call this graph makes (not inlined) within which ``owner`` happened, if any."""
        for each in owner.lineage():
            if each.parent is not None and self.owners[each.parent] is self.call and self.owners[each] is each:
                return each
        return None

    def _call_callee(self, callee: Call) -> None:
        target = _relative_module(self.call, callee.path, callee.module)
        args = self._emit_structure(callee.args, callee)
        kwargs = self._emit_structure(callee.kwargs, callee)
        node = self.graph.call_module(target, tuple(args), dict(kwargs))
        self.callee_calls[callee] = node
        returned: dict[fx.Node, tuple] = {}
        for leaf, path in _leaves(callee.output):
            returned.setdefault(leaf, path)
        for leaf, path in returned.items():  # read from the latest call that returned it (an Identity's input)
            self.callee_outputs[leaf] = (callee, path)

    # -- nodes --------------------------------------------------------------------------
    def _copy(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            return  # made where it is used: one attribute may serve several calls
        if node.op == "output":
            if self.call.parent is None:
                self.graph.output(self._emit_structure(node.args[0], self.call))
            return
        copy = self.graph.node_copy(node, lambda value: self._lookup(value, self.call))
        if node.op == "call_module":
            copy.target = _relative_module(self.call, node.target, None)
        self.env[node] = copy

    def _lookup(self, value: fx.Node, culprit: Call) -> fx.Node:
        if value in self.callee_outputs:
            callee, path = self.callee_outputs[value]
            if (callee, value) not in self.read:
                self.read[(callee, value)] = _getitems(self.graph, self.callee_calls[callee], path)
            return self.read[(callee, value)]
        if value in self.env:
            return self.env[value]
        if value.op == "get_attr":
            return self._attribute(value)
        if value in self.inputs:
            placeholder, path = self.inputs[value]
            self.env[value] = _getitems(self.graph, placeholder, path)
            return self.env[value]
        holder = self._callee_holding(self.owners[call_of(value)])
        if holder is not None:
            raise NotSplittable(holder, f"its caller reads {value.name}, which it does not return")
        raise NotSplittable(culprit, f"it reads {value.name}, which it does not receive as an argument")

    def _attribute(self, node: fx.Node) -> fx.Node:
        target = self._relative_attribute(node.target)
        if target not in self.attributes:
            self.attributes[target] = self.graph.get_attr(target)
        return self.attributes[target]

    def _relative_attribute(self, target: str) -> str:
        call = self.call
        if not call.path:
            return target
        if target.startswith(f"{call.path}."):
            return target[len(call.path) + 1 :]
        owner, _, name = target.rpartition(".")
        value = getattr(root_of(call).module.get_submodule(owner), name)
        tensors = [
            *call.module.named_parameters(remove_duplicate=False),
            *call.module.named_buffers(remove_duplicate=False),
        ]
        found = next((path for path, tensor in tensors if tensor is value), None)
        if found is not None:
            return found
        if not owner and name.startswith("_tensor_constant"):  # made by the tracer for this call's code: give it one
            return self.buffers.name(call.module, value, f"_fxblur{name}")
        raise NotSplittable(call, f"it reads {target}, which does not belong to it")

    def _emit_structure(self, value: Any, culprit: Call) -> Any:
        """``value`` (nodes in tuples, lists, dicts) as arguments of this graph's nodes."""
        if isinstance(value, fx.Node):
            return self._lookup(value, culprit)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return self.graph.call_function(type(value), tuple(self._emit_structure(v, culprit) for v in value))
        if type(value) in (tuple, list, IMMUTABLE_LIST):
            return type(value)(self._emit_structure(v, culprit) for v in value)
        if type(value) in (dict, IMMUTABLE_DICT):
            return {key: self._emit_structure(v, culprit) for key, v in value.items()}
        if type(value) is collections.OrderedDict:
            pairs = [(key, self._emit_structure(v, culprit)) for key, v in value.items()]
            return self.graph.call_function(collections.OrderedDict, (pairs,))
        if isinstance(value, (*_CONSTANTS, slice)) or value is Ellipsis:
            return value
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        raise NotSplittable(culprit, f"it passes or returns a {type(value).__name__}, which a graph cannot carry")

    def _tensor(self, value: torch.Tensor) -> fx.Node:
        """A tensor the trace saw as a value (a position embedding computed from plain attributes), read as
        the attribute of this graph's module that holds it, or as a constant buffer it gets for it."""
        module = self.call.module
        held = [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
            *((name, attribute) for name, attribute in vars(module).items() if isinstance(attribute, torch.Tensor)),
        ]
        target = next((name for name, tensor in held if tensor is value), None)
        if target is None:
            target = self.buffers.name(module, value)
        if target not in self.attributes:
            self.attributes[target] = self.graph.get_attr(target)
        return self.attributes[target]

    def _check_nothing_escapes(self) -> None:
        """A value made here and read outside must be one this call returns."""
        if self.call.parent is None:
            return
        returned = {leaf for leaf, _ in _leaves(self.call.output)}
        for node in self.env:
            if node in returned or self.owners[call_of(node)] is not self.call:
                continue
            for user in node.users:
                if not self._within(call_of(user)):
                    raise NotSplittable(self.call, f"{node.name} is read outside it but not returned")

    def _within(self, call: Call | None) -> bool:
        return call is not None and any(each is self.call for each in call.lineage())


def _nodeless_calls(root: Call, flat: fx.Graph) -> dict[fx.Node, list[Call]]:
    """The calls that made no node (a module that only indexes a list, an ``nn.Identity``), by where they ran.

    A call ran after the last node it received and after the calls its caller made before
    it; its module is called right after that node, so that the values it returns are read
    from it, as in the original.
    """
    index = {node: i for i, node in enumerate(flat.nodes)}
    last: dict[Call, int] = {}
    for node, i in index.items():
        for call in call_of(node).lineage() if call_of(node) is not None else ():
            last[call] = i
    ran_after: dict[Call, int] = {}
    for call in root.walk():  # parents first, siblings in the order they ran
        if call in last or call.parent is None:
            continue
        siblings = call.parent.children[: call.parent.children.index(call)]
        received = [index[node] for node, _ in _leaves((call.args, call.kwargs)) if node in index]
        ran_after[call] = max([*received, *(last.get(s, ran_after.get(s, -1)) for s in siblings)], default=-1)
    nodes = list(index)
    found: dict[fx.Node, list[Call]] = {}
    for call, i in ran_after.items():
        found.setdefault(nodes[max(i, 0)], []).append(call)
    return found


def _parameter_names(module: nn.Module, count: int) -> list[str]:
    """Names for the first ``count`` positional arguments of ``module.forward``."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [positional[i] if i < len(positional) else f"arg_{i}" for i in range(count)]


def _leaves(value: Any, path: tuple = ()) -> Iterable[tuple[fx.Node, tuple]]:
    """Every node in ``value`` with the indices that reach it."""
    if isinstance(value, fx.Node):
        yield value, path
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))


def _getitems(graph: fx.Graph, node: fx.Node, path: tuple) -> fx.Node:
    for index in path:
        node = graph.call_function(operator.getitem, (node, index))
    return node


def _relative_module(call: Call, path: str, module: nn.Module | None) -> str:
    """``path`` (from the traced root) as seen from ``call``'s module."""
    if not call.path:
        return path
    if path.startswith(f"{call.path}."):
        return path[len(call.path) + 1 :]
    module = module if module is not None else root_of(call).module.get_submodule(path)
    found = next((name for name, sub in call.module.named_modules(remove_duplicate=False) if sub is module), None)
    if not found:
        raise NotSplittable(call, f"it calls {path}, which is not one of its submodules")
    return found
