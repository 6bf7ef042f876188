"""Put a rewritten flat graph back into the module hierarchy it was traced from.

The passes rewrite one flat graph per mode, where dataflow across modules is visible;
``nest`` carries the result back into the modules the tracer went through, so that every
module the original's forward called as a module is still called as a module, at the same
path (FSDP's per-block sharding, activation checkpointing, hooks and regional compilation
all hang on those calls). Each recorded module call (``fxblur.rewrite.calls``) ends up in
one of three states:

- *original*: nothing in it changed; the module keeps its class and code. Modules it calls
  that did change carry their own rewrite, and so do blurred op modules (most placements
  change nothing but the op module: ``fxblur.ops.blurred``).
- *rewritten*: nodes of its own call changed (a blur node, a functional op moved to
  stride 1); the module gets a forward of its own, the graph of its call, in which the
  modules it calls are still called as modules. It becomes an instance of a subclass of
  both its original class and ``GraphModule`` (a ``Sequential`` stays iterable, an
  ``isinstance`` check on a block still holds). A module called several times must get
  the same graph from every call (one per mode).
- *inlined*: its nodes go into its caller's graph, and the module is no longer called;
  its children are called from there instead. This happens only where a rewrite cannot be
  split along the module's boundary: a value it would need that it does not receive as an
  argument, an output it would need to return and cannot, a module that code outside the
  graph may also call (``frozen``), or calls of one module that would need different code.

The root of the trace always gets its own graph (it is the ``GraphModule`` ``transform``
returns), unless the caller asks to keep it when nothing in it changed (a part of a model
rewritten in parts).

Example:
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(16, 16, 3, padding=1)
    ...     def forward(self, x):
    ...         return F.max_pool2d(self.conv(x), 2)
    >>> model = nn.Sequential(Block(), nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)))
    >>> gm = fxblur.transform(model, verbose=False)
    >>> type(gm.get_submodule("1.1")).__name__, type(gm.get_submodule("1")).__name__  # the pool carries its blur
    ('BlurredMaxPool2d', 'Sequential')
    >>> block = gm.get_submodule("0")  # a functional pool in its own forward: it gets a graph of its own
    >>> isinstance(block, Block), isinstance(block, fx.GraphModule), block.code.count("fxblur.max_pool2d")
    (True, True, 1)
"""

from __future__ import annotations

import collections
import inspect
import operator
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from fxblur.changes import metadata
from fxblur.rewrite.calls import Call, call_of

_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


class HookWarning(UserWarning):
    """A module with hooks is no longer called by the rewritten model, so its hooks no longer fire."""


@dataclass(frozen=True)
class Inlined:
    """A module whose code was moved into its caller's graph, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Nesting:
    """Where the rewrite went: the modules that got a forward of their own, those inlined."""

    rewritten: tuple[str, ...]
    inlined: tuple[Inlined, ...]


@dataclass
class ModeGraph:
    """One mode's flat graph after the passes, its call tree, and the calls whose own code changed."""

    graph: fx.Graph
    root: Call
    changed: set[Call]


class _NotSplittable(Exception):
    def __init__(self, call: Call, reason: str) -> None:
        super().__init__(reason)
        self.call = call
        self.reason = reason


_NESTING_KEY = "fxblur.nesting"


def store_nesting(module: nn.Module, nesting: Nesting) -> None:
    metadata(module, create=True)[_NESTING_KEY] = nesting


def nesting_of(module: nn.Module) -> Nesting | None:
    """Where the rewrite of ``module`` went (``None`` for a flat result, or a module fxblur did not return)."""
    return metadata(module).get(_NESTING_KEY)


@dataclass(frozen=True)
class Snapshot:
    """What each node computes, and what each call received, before a rewrite (see ``changed_calls``)."""

    nodes: dict[fx.Node, tuple]
    arguments: dict[Call, list[fx.Node]]


def snapshot(graph: fx.Graph) -> Snapshot:
    calls = {call_of(node) for node in graph.nodes} - {None}
    return Snapshot({node: _state(node, {}) for node in graph.nodes}, {call: _arguments(call) for call in calls})


def changed_calls(graph: fx.Graph, before: Snapshot) -> set[Call]:
    """The calls in which a node was added, changed or removed since ``before``.

    A call that now receives another value in place of one it received (a rewrite moved the
    uses of that value to a new one outside the call) computes the same code from it: its
    nodes that read the argument are not changed by that.
    """
    renamed = {
        call: {now: then for now, then in zip(_arguments(call), old, strict=True) if now is not then}
        for call, old in before.arguments.items()
    }
    changed = {
        call_of(node) for node in graph.nodes if before.nodes.get(node) != _state(node, renamed.get(call_of(node), {}))
    }
    changed |= {call_of(node) for node in before.nodes.keys() - set(graph.nodes)}
    changed.discard(None)
    return changed


def _state(node: fx.Node, renamed: dict[fx.Node, fx.Node]) -> tuple:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: renamed.get(arg, arg))
    return node.op, node.target, args, kwargs


def _arguments(call: Call) -> list[fx.Node]:
    return [leaf for leaf, _ in _leaves((call.args, call.kwargs))]


def nest(
    root: nn.Module,
    modes: dict[bool, ModeGraph],
    frozen: frozenset[int],
    make_module: Callable[[nn.Module, dict[bool, fx.Graph], bool], nn.Module],
    keep_unchanged_root: bool = False,
) -> tuple[nn.Module, Nesting]:
    """Give every module call of ``modes`` its final state and build the modules that need one.

    Args:
        root: fxblur's copy of the model, holding every module the graphs call (blurred ops
            and blur containers included); re-wired in place.
        modes: the flat graph of each mode (the same object twice for a model whose graph
            does not depend on its mode).
        frozen: ids of modules that must not change (code outside the graphs may call them).
        make_module: builds the module that runs a graph per mode over a module's tree, an
            instance of the module's class too unless it is the root
            (``fxblur.rewrite.graph_module.graph_module_over``).
        keep_unchanged_root: leave the root as it is when nothing in its own call changed.

    Returns:
        The new root (the rewritten root, or ``root``), and where the rewrite went.
    """
    graphs = list({id(mode.graph): mode for mode in modes.values()}.values())
    inline: dict[Call, str] = {}
    while True:
        try:
            built = _build_all(graphs, inline, frozen, keep_unchanged_root)
            break
        except _NotSplittable as failure:
            if failure.call.parent is None:
                raise AssertionError(f"the root call cannot be inlined: {failure.reason}") from failure
            inline[failure.call] = failure.reason
    by_module: dict[int, dict[bool, fx.Graph]] = {}
    calls: dict[int, Call] = {}
    for call, graph in built.items():
        for training, mode in modes.items():
            if mode.root is _root_of(call):
                by_module.setdefault(id(call.module), {})[training] = graph
        calls.setdefault(id(call.module), call)
    root_key = id(root)
    depth_first = sorted((key for key in by_module if key != root_key), key=lambda key: -calls[key].path.count("."))
    for key in depth_first:  # children before parents: a parent's copy takes its rewritten children
        module = calls[key].module
        _replace_everywhere(root, module, make_module(module, by_module[key], True))
    result = make_module(root, by_module[root_key], False) if root_key in by_module else root
    inlined = _inlined_calls(graphs, inline, built)
    warn_about_hooks([call for call, _ in inlined])
    rewritten = tuple(sorted(calls[key].path for key in depth_first))
    return result, Nesting(rewritten, tuple(Inlined(call.path, reason) for call, reason in inlined))


def _root_of(call: Call) -> Call:
    return list(call.lineage())[-1]


def _build_all(
    graphs: list[ModeGraph], inline: dict[Call, str], frozen: frozenset[int], keep_unchanged_root: bool
) -> dict[Call, fx.Graph]:
    """The graph of every call that gets one, given the calls inlined so far; raises on the first that cannot."""
    owners = {call: owner for mode in graphs for call, owner in _owners(mode.root, inline).items()}
    changed = {owners[call] for mode in graphs for call in mode.changed}
    own = [call for call, owner in owners.items() if owner is call]
    emitted = [call for call in own if call in changed or (call.parent is None and not keep_unchanged_root)]
    # A module runs one graph per mode: every call of a module that gets a graph is built.
    modules = {id(call.module) for call in emitted if call.parent is not None}
    emitted += [call for call in own if call.parent is not None and id(call.module) in modules and call not in emitted]
    for call in emitted:
        if call.parent is not None and id(call.module) in frozen:
            raise _NotSplittable(call, "code outside the traced graph also calls it")
    mode_of = {call: mode for mode in graphs for call in mode.root.walk()}
    built = {call: _RegionBuilder(call, mode_of[call].graph, owners).build() for call in emitted}
    _check_one_graph_per_module(built, mode_of, changed)
    return built


def _owners(root: Call, inline: dict[Call, str]) -> dict[Call, Call]:
    """For each call, the call whose graph holds its nodes: itself, or for an inlined call its caller's."""
    owner: dict[Call, Call] = {}
    for call in root.walk():  # parents first
        owner[call] = owner[call.parent] if call in inline and call.parent is not None else call
    return owner


def _check_one_graph_per_module(
    emitted: dict[Call, fx.Graph], mode_of: dict[Call, ModeGraph], changed: set[Call]
) -> None:
    """A module runs one graph per mode: every call of it in that mode must have the same code."""
    code: dict[tuple[int, int], tuple[Call, str]] = {}
    for call, graph in emitted.items():
        if call.parent is None:
            continue
        key = (id(call.module), id(mode_of[call].graph))
        src = graph.python_code("self").src
        if key in code and code[key][1] != src:
            first = code[key][0]
            culprit = first if first in changed and call not in changed else call
            raise _NotSplittable(culprit, f"its calls would need different code ({first.path}, {call.path})")
        code.setdefault(key, (call, src))


class _RegionBuilder:
    """Builds the graph of one call: its own nodes and those of the calls inlined into it."""

    def __init__(self, call: Call, flat: fx.Graph, owners: dict[Call, Call]) -> None:
        self.call = call
        self.flat = flat
        self.owners = owners
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
        nodeless = _nodeless_calls(_root_of(call), self.flat)
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
                raise _NotSplittable(lost, "it makes no node of its own, and where it runs was lost")
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
        prefix = self.call.path.replace(".", "_") + "_"
        if self.call.path and node.name.startswith(prefix) and node.op != "placeholder":
            copy.name = self.graph._graph_namespace.create_name(node.name[len(prefix) :], copy)
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
            raise _NotSplittable(holder, f"its caller reads {value.name}, which it does not return")
        raise _NotSplittable(culprit, f"it reads {value.name}, which it does not receive as an argument")

    def _attribute(self, node: fx.Node) -> fx.Node:
        target = _relative_attribute(self.call, node.target, _root_of(self.call).module)
        if target not in self.attributes:
            self.attributes[target] = self.graph.get_attr(target)
        return self.attributes[target]

    def _emit_structure(self, value: Any, culprit: Call) -> Any:
        """``value`` (nodes in tuples, lists, dicts) as arguments of this graph's nodes."""
        if isinstance(value, fx.Node):
            return self._lookup(value, culprit)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return self.graph.call_function(type(value), tuple(self._emit_structure(v, culprit) for v in value))
        if type(value) in (tuple, list, immutable_list):
            return type(value)(self._emit_structure(v, culprit) for v in value)
        if type(value) in (dict, immutable_dict):
            return {key: self._emit_structure(v, culprit) for key, v in value.items()}
        if type(value) is collections.OrderedDict:
            pairs = [(key, self._emit_structure(v, culprit)) for key, v in value.items()]
            return self.graph.call_function(collections.OrderedDict, (pairs,))
        if isinstance(value, (*_CONSTANTS, slice)) or value is Ellipsis:
            return value
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        raise _NotSplittable(culprit, f"it passes or returns a {type(value).__name__}, which a graph cannot carry")

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
            target = next(
                f"_fxblur_constant{i}" for i in range(len(held) + 1) if not hasattr(module, f"_fxblur_constant{i}")
            )
            module.register_buffer(target, value, persistent=False)
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
                    raise _NotSplittable(self.call, f"{node.name} is read outside it but not returned")

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
    module = module if module is not None else _root_of(call).module.get_submodule(path)
    found = next((name for name, sub in call.module.named_modules(remove_duplicate=False) if sub is module), None)
    if not found:
        raise _NotSplittable(call, f"it calls {path}, which is not one of its submodules")
    return found


def _relative_attribute(call: Call, target: str, root: nn.Module) -> str:
    if not call.path:
        return target
    if target.startswith(f"{call.path}."):
        return target[len(call.path) + 1 :]
    owner, _, name = target.rpartition(".")
    value = getattr(root.get_submodule(owner), name)
    tensors = [
        *call.module.named_parameters(remove_duplicate=False),
        *call.module.named_buffers(remove_duplicate=False),
    ]
    found = next((path for path, tensor in tensors if tensor is value), None)
    if found is not None:
        return found
    if not owner and name.startswith("_tensor_constant"):  # made by the tracer for this call's code: give it one
        local = f"_fxblur{name}"
        call.module.register_buffer(local, value, persistent=False)
        return local
    raise _NotSplittable(call, f"it reads {target}, which does not belong to it")


def _replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` sits in ``root``'s tree (a shared module may sit at several paths)."""
    for module in root.modules():
        for name, child in module._modules.items():
            if child is old:
                module._modules[name] = new


def _inlined_calls(graphs: list[ModeGraph], inline: dict[Call, str], built: dict[Call, fx.Graph]) -> list:
    """The inlined calls whose nodes went into a graph (so their module is no longer called), with why."""
    found: dict[str, tuple[Call, str]] = {}
    for mode in graphs:
        owner = _owners(mode.root, inline)
        for call in mode.root.walk():
            if call in inline and owner[call] in built:
                found.setdefault(call.path, (call, inline[call]))
    return [found[path] for path in sorted(found)]


def warn_about_hooks(calls: Iterable[Call]) -> None:
    """``HookWarning`` naming the modules with hooks among those whose calls the result no longer makes."""
    hooked = sorted({call.path for call in calls if call.parent is not None and _has_call_hooks(call.module)})
    if hooked:
        warnings.warn(
            f"the hooks of {', '.join(hooked)} no longer fire: the result no longer calls these modules "
            "(fxblur.report(model) says why)",
            HookWarning,
            stacklevel=5,
        )


def _has_call_hooks(module: nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, name, None) for name in names)
