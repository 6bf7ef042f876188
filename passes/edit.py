"""Editing a traced graph from a pass: add nodes and modules, move uses, keep the module calls right.

A pass rewrites the flat graph of a whole model, where dataflow across modules is visible;
afterwards the assembly (``fxblur.assemble``) puts every node back into the module call it
belongs to, so that the result keeps the model's module hierarchy. What that needs is kept
here, derived from the graph: each node belongs to one module call (``fxblur.trace.calls``),
and what a call receives and returns follows from which side of its boundary the nodes
that read a value lie. A pass edits through these functions and never touches call
records:

- ``insert_before(anchor, target, args)`` / ``insert_after(...)``: a call of ``target`` (a
  function, or the path of a submodule for a module call) next to ``anchor``, belonging to
  the module call of ``anchor``, or of ``where`` (a node, or several: the innermost call
  that holds them all, for a value several calls read);
- ``replace_uses(old, new, only=..., keep=...)``: the uses of ``old`` become uses of
  ``new``. A module call whose nodes now read ``new`` in place of ``old``, with ``new``
  computed outside it, receives ``new`` instead; a call that computes ``new`` and returned
  ``old`` to the readers that moved returns ``new``. Where a call would need both, it is
  left so, and the assembly inlines it into its caller, with the reason;
- ``add_submodule(gm, near, name, module)``: a module the graph calls (a blur), kept in the
  ``fxblur`` container of the module whose call ``near`` belongs to;
- ``mark_strided_as`` / ``strided_as``: an op a pass moved to stride 1 remembers its stride,
  for the passes after it.

Functions fxblur registers with ``torch.fx.wrap`` (its polyphase and padding ops) stay one
call when a GraphModule is re-traced from its code; ``insert_*`` marks them so.

Example:
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> conv = next(node for node in gm.graph.nodes if node.op == "call_module")
    >>> doubled = insert_after(conv, torch.mul, (conv, 2.0))
    >>> replace_uses(conv, doubled, keep=[doubled])
    >>> [n.name for n in gm.graph.nodes]
    ['input_1', '_0', 'mul', '_1', 'output']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxblur._compat import keep_opaque_when_retraced
from fxblur.trace.calls import CALL, Call, call_of, map_nodes, nodes_in

BLUR_CONTAINER = "fxblur"
_STRIDED_AS = "fxblur.strided_as"
_WRAPPED_MODULES = ("fxblur.ops.",)

Where = fx.Node | Sequence[fx.Node] | None


class Blurs(nn.ModuleDict):
    """The container, ``fxblur`` in a module, of the modules (blurs) a rewrite calls from its graph."""


def insert_before(anchor: fx.Node, target: Callable | str, args: tuple, kwargs: dict | None = None,
                  where: Where = None) -> fx.Node:  # fmt: skip
    """A call of ``target`` just before ``anchor``, in the module call of ``where`` (default: ``anchor``'s)."""
    with anchor.graph.inserting_before(anchor):
        return _created(anchor, target, args, kwargs, where)


def insert_after(anchor: fx.Node, target: Callable | str, args: tuple, kwargs: dict | None = None,
                 where: Where = None) -> fx.Node:  # fmt: skip
    """A call of ``target`` just after ``anchor``, in the module call of ``where`` (default: ``anchor``'s)."""
    with anchor.graph.inserting_after(anchor):
        return _created(anchor, target, args, kwargs, where)


def _created(anchor: fx.Node, target: Callable | str, args: tuple, kwargs: dict | None, where: Where) -> fx.Node:
    graph = anchor.graph
    if isinstance(target, str):
        node = graph.call_module(target, args, kwargs)
    else:
        node = graph.call_function(target, args, kwargs)
        if getattr(target, "__module__", "").startswith(_WRAPPED_MODULES):
            keep_opaque_when_retraced(node)
    call = _call_where(anchor if where is None else where)
    if call is not None:
        node.meta[CALL] = call
    return node


def _call_where(where: fx.Node | Sequence[fx.Node]) -> Call | None:
    """The module call a node placed by ``where`` belongs to: a node's, or the innermost holding several."""
    nodes = [where] if isinstance(where, fx.Node) else list(where)
    calls = [call_of(node) for node in nodes]
    if any(call is None for call in calls):
        return None
    lineages = [list(call.lineage()) for call in calls]
    return next((call for call in lineages[0] if all(any(c is call for c in other) for other in lineages[1:])), None)


def replace_uses(old: fx.Node, new: fx.Node, only: Iterable[fx.Node] | None = None,
                 keep: Iterable[fx.Node] = ()) -> None:  # fmt: skip
    """Make the uses of ``old`` by ``only`` (default: all its users), but not by ``keep``, uses of ``new``.

    Module calls receive and return ``new`` where the moved uses need it (see the module docstring).
    """
    chosen = set(old.users) if only is None else set(only) & set(old.users)
    moved = [user for user in old.users if user in chosen and user not in set(keep)]
    for user in moved:
        user.replace_input_with(old, new)
    root = _root_call(old, new)
    if root is None:
        return
    for call in root.walk():
        if call.parent is None:
            continue
        received = old in nodes_in((call.args, call.kwargs))
        returned = old in nodes_in(call.output)
        inside = [_within(user, call) for user in moved]
        still_inside = [_within(user, call) for user in old.users]
        if received and not _within(new, call) and any(inside) and not any(still_inside):
            call.args, call.kwargs = _swapped((call.args, call.kwargs), old, new)
        if returned and _within(new, call) and not all(inside) and all(still_inside):
            call.output = _swapped(call.output, old, new)


def _root_call(*nodes: fx.Node) -> Call | None:
    call = next((call_of(node) for node in nodes if call_of(node) is not None), None)
    return None if call is None else list(call.lineage())[-1]


def _within(node: fx.Node, call: Call) -> bool:
    """Whether ``node`` is computed inside ``call`` (the graph's output is outside every call but the root)."""
    if node.op == "output":
        return call.parent is None
    owner = call_of(node)
    return owner is not None and any(each is call for each in owner.lineage())


def _swapped(value: Any, old: fx.Node, new: fx.Node) -> Any:
    return map_nodes(value, lambda node: new if node is old else node)


def add_submodule(gm: fx.GraphModule, near: fx.Node, name: str, module: nn.Module,
                  frozen: frozenset[int] = frozenset()) -> str:  # fmt: skip
    """Keep ``module`` in the module whose call ``near`` belongs to, for the graph to call; its path in ``gm``.

    It goes into that module's ``fxblur`` container (the nearest module that may change,
    if that one may not: ``frozen`` holds the ids of modules that must not), named ``name``
    with dots turned into underscores; an equal module already there (same ``spec``) is
    reused, a different one gets a numbered name. The module moves to the device of
    ``gm``'s tensors.
    """
    call = call_of(near)
    lineage = [] if call is None else list(call.lineage())
    owner_path = next((c.path for c in lineage if id(c.module) not in frozen), "")
    owner = gm.get_submodule(owner_path)
    container = owner._modules.get(BLUR_CONTAINER)
    taken = hasattr(owner, BLUR_CONTAINER) if container is None else type(container) is not Blurs
    if taken:
        raise ValueError(
            f"the module {owner_path or '(root)'} ({type(owner).__name__}) has an attribute named "
            f"{BLUR_CONTAINER!r}, which fxblur needs for the blurs its graph calls: rename it"
        )
    if container is None:
        container = Blurs()
        owner.add_module(BLUR_CONTAINER, container)
    prefix = f"{owner_path}.{BLUR_CONTAINER}" if owner_path else BLUR_CONTAINER
    base = (name[len(owner_path) + 1 :] if owner_path and name.startswith(f"{owner_path}.") else name).replace(".", "_")
    for key in chain([base], (f"{base}_{i}" for i in range(1, len(container) + 2))):
        if key not in container:
            container[key] = module.to(_device_of(gm))
            return f"{prefix}.{key}"
        if getattr(container[key], "spec", None) == getattr(module, "spec", ()):
            return f"{prefix}.{key}"
    raise AssertionError("unreachable: a free name always exists")


def _device_of(gm: fx.GraphModule) -> torch.device:
    tensor = next(chain(gm.parameters(), gm.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def mark_strided_as(node: fx.Node, stride: tuple[int, ...], ceil_mode: bool) -> None:
    """Remember that the op ``node`` ran at ``stride`` (with ``ceil_mode``) before a pass moved it to stride 1."""
    node.meta[_STRIDED_AS] = (stride, ceil_mode)


def strided_as(node: fx.Node) -> tuple[tuple[int, ...], bool] | None:
    """``(stride, ceil_mode)`` of an op a pass moved to stride 1, else ``None``."""
    return node.meta.get(_STRIDED_AS)
