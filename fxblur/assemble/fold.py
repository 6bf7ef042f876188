"""Sequentials keep their code: nodes a pass put between the layers of an ``nn.Sequential`` go into those layers.

A Sequential runs its children one after the other, and users run them one by one too
(perceptual losses), index and slice them. Where a rewrite puts nodes between two of its
layers (a polyphase phase chosen before a pool, a pool's circular padding, a blur past the
activation that ends a conv-norm-activation block), the Sequential would need a forward of
its own, and its layers would no longer compute what it does. Instead, each such chain of
nodes is folded into the layer next to it: into the layer it feeds, run before that
layer's own forward, or else into the layer it reads, run after it.

- A layer the trace went through (a block) takes the chain into its own forward, which the
  assembly then rewrites as any other.
- A layer called whole (a conv, a pool, an activation) becomes an instance of
  ``Folded[MaxPool2d]``, a subclass of its class that runs the chain before or after its
  own forward: its parameters, buffers and hooks stay its own, and the chain (a small
  GraphModule holding the chain's blurs, non-persistent buffers) is its child ``fxblur``.
  Only a layer called once per mode, with the same chain in both modes, is folded.

A chain that reads more than one value, or that more than one layer reads (a phase two
layers share), stays in the Sequential, which then gets a forward of its own.

Example:
    >>> import torchvision
    >>> gm = fxblur.transform(torchvision.models.vgg11(), polyphase=True, verbose=False)
    >>> len(gm.features), type(gm.features).__name__, type(gm.features[2]).__name__
    (21, 'Sequential', 'Folded[MaxPool2d]')
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from fxblur.ops.folded import FoldedLayer, folded_class
from fxblur.passes.edit import BLUR_CONTAINER, Blurs
from fxblur.trace.calls import Call, call_of, map_nodes, nodes_in
from fxblur.trace.cloning import share_tensors


def fold_into_layers(
    graphs: Iterable[fx.Graph], roots: Iterable[Call], root: nn.Module, frozen: frozenset[int]
) -> dict[str, str]:
    """Fold the chains between the layers of every Sequential the graphs call into those layers, in place.

    ``graphs`` and ``roots``: each mode's flat graph and call tree (one of each for a model
    whose modes trace alike); ``root``: fxblur's copy of the model holding every module they
    call. Folded layers replace their modules in ``root``; the chains leave the graphs.

    Returns:
        Where each module a folded chain calls (a blur) is now: old path -> new path.
    """
    moved: dict[str, str] = {}
    pairs = list({id(graph): (graph, call_root) for graph, call_root in zip(graphs, roots, strict=True)}.values())
    plans: dict[str, list[tuple[fx.Graph, list[fx.Node], str, fx.Node, fx.Node]]] = {}
    for graph, call_root in pairs:
        own_nodes: dict[int, list[fx.Node]] = {}
        for node in graph.nodes:
            own_nodes.setdefault(id(call_of(node)), []).append(node)
        for call in call_root.walk():
            if _is_plain_sequential(call.module) and id(call.module) not in frozen and call.parent is not None:
                for chain, side, source, end in _chains(own_nodes.get(id(call), []), call):
                    plans.setdefault(_layer_path(graph, call, chain, side, source, end), []).append(
                        (graph, chain, side, source, end)
                    )
    counts = _calls_per_module(graph for graph, _ in pairs)
    for path, found in plans.items():
        if path is None or counts.get(path, 0) != len(pairs) or len(found) != len(pairs):
            continue  # a layer called elsewhere too, or folded differently in the two modes
        modules = [_chain_module(root, chain, source, end) for _, chain, _, source, end in found]
        if len({module.code for module in modules}) != 1 or len({side for _, _, side, _, _ in found}) != 1:
            continue
        side = found[0][2]
        layer = root.get_submodule(path)
        if isinstance(layer, FoldedLayer) and side in layer._modules[BLUR_CONTAINER]:
            continue  # one chain on each side at most
        _replace(root, path, _folded(layer, side, modules[0]))
        renamed = modules[0].meta["fxblur.moved"]
        moved.update({old: f"{path}.{BLUR_CONTAINER}.{side}.{new}" for old, new in renamed.items()})
        for graph, chain, _, source, end in found:
            _remove_chain(graph, chain, source, end)
        for _, call_root in pairs:
            for call in call_root.walk():  # a call that returned the chain's end returns its source again
                call.args, call.kwargs, call.output = map_nodes(
                    (call.args, call.kwargs, call.output), lambda n, end=end, source=source: source if n is end else n
                )
    _drop_uncalled_blurs(root, [graph for graph, _ in pairs])
    return moved


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _chains(own_nodes: list[fx.Node], call: Call) -> list[tuple[list[fx.Node], str, fx.Node, fx.Node]]:
    """The chains of nodes in ``call``'s own code that are not its layers: (nodes, side, source, end).

    ``own_nodes`` are the nodes traced in ``call``, in graph order. ``side`` is ``"before"``
    when the chain's end feeds exactly one layer call (it is folded into that layer) and
    ``"after"`` when only its source is a layer call; ``source`` is the one value the chain
    reads, ``end`` the one node outside it reads.
    """
    prefix = f"{call.path}."
    layers = {node for node in own_nodes if node.op == "call_module"
              and node.target.startswith(prefix) and "." not in node.target[len(prefix):]}  # fmt: skip
    inserted = [node for node in own_nodes if node not in layers]
    found, seen = [], set()
    for first in inserted:
        if first in seen:
            continue
        chain = _component(first, set(inserted))
        seen |= set(chain)
        read = [arg for node in chain for arg in nodes_in((node.args, node.kwargs))
                if arg not in chain and arg.op != "get_attr"]  # fmt: skip
        outside = [(node, user) for node in chain for user in node.users if user not in chain]
        ends = {node for node, _ in outside}
        if len(set(read)) != 1 or len(ends) != 1:
            continue
        (source,), (end,), readers = set(read), ends, {user for _, user in outside}
        (reader,) = readers if len(readers) == 1 else (None,)
        if reader in layers and reader.args[:1] == (end,) and len(nodes_in((reader.args, reader.kwargs))) == 1:
            found.append((chain, "before", source, end))
        elif source in layers and all(user in chain for user in source.users):
            found.append((chain, "after", source, end))
    return found


def _component(first: fx.Node, candidates: set[fx.Node]) -> list[fx.Node]:
    """The nodes of ``candidates`` connected to ``first`` through arguments and uses, in graph order."""
    found, frontier = {first}, [first]
    while frontier:
        node = frontier.pop()
        for other in [*nodes_in((node.args, node.kwargs)), *node.users]:
            if other in candidates and other not in found:
                found.add(other)
                frontier.append(other)
    order = {node: i for i, node in enumerate(first.graph.nodes)}
    return sorted(found, key=order.__getitem__)


def _layer_path(graph: fx.Graph, call: Call, chain: list[fx.Node], side: str, source: fx.Node, end: fx.Node) -> str:
    layer = next(iter(end.users)) if side == "before" else source
    return layer.target


def _calls_per_module(graphs: Iterable[fx.Graph]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for graph in graphs:
        for node in graph.nodes:
            if node.op == "call_module":
                counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _chain_module(root: nn.Module, chain: list[fx.Node], source: fx.Node, end: fx.Node) -> fx.GraphModule:
    """The chain as a GraphModule of one input whose modules (blurs) are its own, named ``blur``, ``blur_1``...

    Its ``meta["fxblur.moved"]`` says which module went where: old path -> name.
    """
    small = fx.Graph()
    env = {source: small.placeholder("x")}
    holder, moved = nn.Module(), {}
    for node in chain:
        copy = small.node_copy(node, lambda value: env[value] if value in env else _constant(small, value))
        if node.op == "call_module":
            name = moved.setdefault(node.target, "blur" if not moved else f"blur_{len(moved)}")
            holder.add_module(name, root.get_submodule(node.target))
            copy.target = name
        env[node] = copy
    small.output(env[end])
    for node in small.nodes:  # tensors the chain reads: the model's, under their paths
        if node.op == "get_attr":
            owner, _, attribute = node.target.rpartition(".")
            holder.register_buffer(node.target.replace(".", "_"), getattr(root.get_submodule(owner), attribute),
                                   persistent=False)  # fmt: skip
            node.target = node.target.replace(".", "_")
    module = fx.GraphModule(holder, small)
    module.meta["fxblur.moved"] = moved
    return module


def _constant(graph: fx.Graph, value: fx.Node) -> fx.Node:
    if value.op != "get_attr":
        raise AssertionError(f"a folded chain reads {value.name}")
    return graph.get_attr(value.target)


def _folded(layer: nn.Module, side: str, chain: fx.GraphModule) -> nn.Module:
    folded = layer if isinstance(layer, FoldedLayer) else share_tensors(layer)
    if not isinstance(folded, FoldedLayer):
        folded.__class__ = folded_class(type(layer))
        folded.add_module(BLUR_CONTAINER, nn.ModuleDict())
    folded._modules[BLUR_CONTAINER][side] = chain
    return folded


def _remove_chain(graph: fx.Graph, chain: list[fx.Node], source: fx.Node, end: fx.Node) -> None:
    """The graph without ``chain``: the layer it fed reads its source again, or its reader reads the layer."""
    for user in list(end.users):
        user.args, user.kwargs = map_nodes((user.args, user.kwargs), lambda n: source if n is end else n)
    for node in reversed(chain):
        graph.erase_node(node)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    root.get_submodule(owner)._modules[name] = module


def _drop_uncalled_blurs(root: nn.Module, graphs: list[fx.Graph]) -> None:
    """The blurs no graph calls any more (they went into folded chains) leave their containers; empty ones go."""
    called = {node.target for graph in graphs for node in graph.nodes if node.op == "call_module"}
    for path, module in list(root.named_modules()):
        container = module._modules.get(BLUR_CONTAINER)
        if not isinstance(container, Blurs):
            continue
        prefix = f"{path}.{BLUR_CONTAINER}." if path else f"{BLUR_CONTAINER}."
        for key in [key for key in container if f"{prefix}{key}" not in called]:
            del container[key]
        if not len(container):
            del module._modules[BLUR_CONTAINER]
