"""Module calls in a traced graph: which call of which module each node was traced in.

torch.fx traces through every module that is not a leaf, so a flat graph no longer says
where one module's ``forward`` began and ended. ``BlurTracer`` records it: every call of a
traced-through module becomes a ``Call`` (the module, its path, the arguments it received
and the value it returned, as graph nodes), and every node carries the call it was created
in, ``node.meta[CALL]``. The passes decide on the flat graph, where dataflow across modules
is visible, place each node they add in a call (``place``) and move the uses of a value to
another through ``redirect``, which keeps the calls' records of what they received and
returned up to date; ``fxblur.rewrite.nesting`` then puts every piece back into the module
where it lives.

Every conv, pool and functional call also gets a *site* name (``node.meta[SITE]``) that
does not depend on the rest of the graph: a module call is named by its module's path, a
functional call by the path of the module whose ``forward`` made it and the function's
name (``"Mixed_6a.max_pool2d"``, ``"Mixed_6a.max_pool2d_1"`` for the second one there).
The train and eval graphs of a model name the same call alike.

Example:
    >>> from fxblur.rewrite.tracer import trace
    >>> block = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Flatten())
    >>> traced = trace(block)
    >>> [(child.path, [n.op for n in child.args]) for child in traced.root.children]
    [('0', ['placeholder'])]
    >>> [(node.name, call_of(node).path) for node in traced.graph.nodes]
    [('input_1', ''), ('_0_0', '0'), ('_0_1', '0'), ('_1', ''), ('output', '')]
    >>> [node.meta.get(SITE) for node in traced.graph.nodes]
    [None, '0.0', '0.1', '1', None]
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

CALL = "fxblur.call"
SITE = "fxblur.site"


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
    _sites: Counter = field(default_factory=Counter, repr=False)

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

    def name_site(self, node: fx.Node) -> None:
        """Give a module or function call made in this call its site name (see the module docstring)."""
        if node.op == "call_module":
            base = node.target
        elif node.op == "call_function":
            base = f"{self.path}.{_base_name(node)}" if self.path else _base_name(node)
        else:
            return
        count = self._sites[base]
        self._sites[base] += 1
        node.meta[SITE] = base if not count else f"{base}@{count}" if node.op == "call_module" else f"{base}_{count}"

    def __repr__(self) -> str:
        return f"Call({self.path or '(root)'}: {type(self.module).__name__})"


def _base_name(node: fx.Node) -> str:
    return re.sub(r"_\d+$", "", node.name)


def call_of(node: fx.Node) -> Call | None:
    """The call ``node`` was traced in, or placed in by a pass."""
    return node.meta.get(CALL)


def place(node: fx.Node, like: fx.Node) -> fx.Node:
    """Put a node a pass added in the call of ``like``, the node it was added next to."""
    call = call_of(like)
    if call is not None:
        node.meta[CALL] = call
    return node


def redirect(old: fx.Node, new: fx.Node, keep: fx.Node | None = None) -> None:
    """Make every use of ``old`` (but ``keep``'s) a use of ``new``, in the graph and in the calls' records.

    ``new`` stands where ``old`` was: in every call that received ``old`` or returned it.
    """
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not keep)
    call = call_of(old)
    if call is None:
        return
    root = list(call.lineage())[-1]
    for each in root.walk():
        each.args = map_nodes(each.args, lambda node: new if node is old else node)
        each.kwargs = map_nodes(each.kwargs, lambda node: new if node is old else node)
        each.output = map_nodes(each.output, lambda node: new if node is old else node)


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
