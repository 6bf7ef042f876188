"""Module calls in a traced graph: which call of which module each node was traced in.

torch.fx traces through every module that is not a leaf, so a flat graph no longer says
where one module's ``forward`` began and ended. ``BlurTracer`` records it: every call of a
traced-through module becomes a ``Call`` (the module, its path, the arguments it received
and the value it returned, as graph nodes), and every node carries the call it was created
in, ``node.meta[CALL]``. The passes decide on the flat graph, where dataflow across modules
is visible, and edit it through ``fxblur.passes.edit``, which keeps these records right
(a node a pass adds belongs to the call of the node it is added next to); the assembly
(``fxblur.assemble``) then puts every piece back into the module where it lives.

Every module and function call also gets a *site* name (``name_sites``), the same in the
train and eval graphs of a model: a module call is named by its module's path, a
functional call by the path of the module whose ``forward`` made it and the function's
name (``"Mixed_6a.max_pool2d"``). Where that forward calls the function on several lines,
they are numbered in source order (``"max_pool2d"``, ``"max_pool2d_1"``), over both
graphs, so that a call made in one mode only does not renumber the others; a line run
several times (a loop) numbers its calls ``"@1"``, ``"@2"``.

Example:
    >>> from fxblur.trace import trace
    >>> block = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Flatten())
    >>> traced = trace(block)
    >>> [(child.path, [n.op for n in child.args]) for child in traced.root.children]
    [('0', ['placeholder'])]
    >>> [(node.name, call_of(node).path) for node in traced.graph.nodes]
    [('input_1', ''), ('_0_0', '0'), ('_0_1', '0'), ('_1', ''), ('output', '')]
    >>> name_sites([traced.graph])
    >>> [node.meta.get(SITE) for node in traced.graph.nodes]
    [None, '0.0', '0.1', '1', None]
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

CALL = "fxblur.call"
SITE = "fxblur.site"
LINE = "fxblur.line"


@dataclass(eq=False)
class Call:
    """One call of a traced-through module, as the tracer saw it.

    Attributes:
        path: the module's path in the traced root (``""`` for the root itself).
        module: the module called.
        parent: the call during which this one happened (``None`` for the root).
        args, kwargs: the arguments it received, proxies replaced by their nodes.
        output: what it returned, proxies replaced by their nodes.
        children: the calls of traced-through modules it made, in order.
    """

    path: str
    module: nn.Module
    parent: Call | None = None
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    children: list[Call] = field(default_factory=list)

    def lineage(self) -> Iterator[Call]:
        """This call, its parent, and so on up to the root."""
        call: Call | None = self
        while call is not None:
            yield call
            call = call.parent

    def walk(self) -> Iterator[Call]:
        """This call and every call below it, parents before children."""
        yield self
        for child in self.children:
            yield from child.walk()

    def __repr__(self) -> str:
        return f"Call({self.path or '(root)'}: {type(self.module).__name__})"


def name_sites(graphs: Iterable[fx.Graph]) -> None:
    """Name every module and function call of ``graphs``, the graphs of one model (see the module docstring).

    A function call's source line is ``node.meta[LINE]``, recorded by the tracer.
    """
    graphs = list(dict.fromkeys(graphs))
    lines: dict[tuple[str, str], set] = defaultdict(set)
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "call_function" and CALL in node.meta:
                lines[(node.meta[CALL].path, _base_name(node))].add(node.meta.get(LINE))
    rank = {key: {line: i for i, line in enumerate(sorted(found, key=str))} for key, found in lines.items()}
    for graph in graphs:
        seen: Counter = Counter()
        for node in graph.nodes:
            call = node.meta.get(CALL)
            if call is None or node.op not in ("call_module", "call_function"):
                continue
            if node.op == "call_module":
                name, key = node.target, (id(call), node.target)
            else:
                base, line = _base_name(node), node.meta.get(LINE)
                index = rank[(call.path, base)][line]
                name = (f"{call.path}.{base}" if call.path else base) + (f"_{index}" if index else "")
                key = (id(call), base, line)
            node.meta[SITE] = f"{name}@{seen[key]}" if seen[key] else name
            seen[key] += 1


def _base_name(node: fx.Node) -> str:
    return re.sub(r"_\d+$", "", node.name)


def call_of(node: fx.Node) -> Call | None:
    """The call ``node`` was traced in, or placed in by a pass."""
    return node.meta.get(CALL)


def nodes_in(value: Any) -> list[fx.Node]:
    """Every node in ``value`` (tuples, lists, dicts), in order."""
    found: list[fx.Node] = []
    map_nodes(value, lambda node: found.append(node) or node)
    return found


def as_nodes(value: Any) -> Any:
    """``value`` with every ``Proxy`` in it replaced by its node (see ``map_nodes``)."""
    return map_nodes(value, lambda node: node, proxies=True)


def map_nodes(value: Any, fn: Any, proxies: bool = False) -> Any:
    """``value`` with ``fn`` applied to every node in it, in tuples (named ones too), lists and dicts.

    Containers keep their type. Anything else is left as it is, nodes hidden inside it
    included: a call that passes them so cannot be split from its caller.
    """
    if isinstance(value, fx.Node):
        return fn(value)
    if proxies and isinstance(value, fx.Proxy):
        return fn(value.node)
    if isinstance(value, tuple):
        items = [map_nodes(item, fn, proxies) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return type(value)(map_nodes(item, fn, proxies) for item in value)
    if isinstance(value, dict):
        return type(value)((key, map_nodes(item, fn, proxies)) for key, item in value.items())
    return value


def forget_calls(graph: fx.Graph) -> None:
    """Drop the call records from ``graph``'s nodes: a finished graph holds no tracer state."""
    for node in graph.nodes:
        node.meta.pop(CALL, None)
        node.meta.pop(LINE, None)
