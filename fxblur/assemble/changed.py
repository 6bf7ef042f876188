"""Which module calls the passes changed: what the assembly must give a forward of its own.

``snapshot`` records, before the passes run, what every node of a graph computes and what
every module call receives; ``changed_calls`` compares the graph after them against it.

Example:
    >>> from fxblur.trace import trace
    >>> traced = trace(nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Flatten()))
    >>> before = snapshot(traced.graph)
    >>> relu = [node for node in traced.graph.nodes if node.op == "call_module"][1]
    >>> relu.target = "1"  # as if a pass had changed it
    >>> sorted(call.path for call in changed_calls(traced.graph, before))
    ['0']
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fxblur.trace.calls import Call, call_of, nodes_in


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
    return nodes_in((call.args, call.kwargs))
