"""Outputs that are dict subclasses keep their class through the trace.

torch.fx turns any dict a forward returns into a plain dict. A dataclass one (Hugging
Face's ``ModelOutput``) is rebuilt from its fields, and an ``OrderedDict`` from its items,
by a call of its class in the graph, where the class can rebuild it (``rebuildable``).

Example:
    >>> import collections
    >>> rebuildable(collections.OrderedDict(a=1)), rebuildable(dict(a=1))
    (True, False)
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import torch.fx as fx

from fxblur._compat import IMMUTABLE_DICT, keep_opaque_when_retraced


def rebuildable(mapping: Any) -> bool:
    """Whether ``mapping`` is a dict subclass that a call of its class gives back.

    A dataclass (Hugging Face's ``ModelOutput``): if its keys are its fields that are not
    ``None``, in order, each holding the field's value. Any other: if its class takes its
    items as a dict does, and the instance has no attributes.
    """
    if not isinstance(mapping, dict) or type(mapping) in (dict, IMMUTABLE_DICT):
        return False
    if dataclasses.is_dataclass(mapping):
        fields = [f.name for f in dataclasses.fields(mapping) if f.init]
        present = [name for name in fields if getattr(mapping, name) is not None]
        return list(mapping) == present and all(mapping[name] is getattr(mapping, name) for name in present)
    plain = type(mapping).__init__ in (dict.__init__, collections.OrderedDict.__init__)
    return plain and not getattr(mapping, "__dict__", None)


def rebuild_node(mapping: dict, create_arg: Callable[[Any], Any], create_node: Callable[..., fx.Node]) -> fx.Node:
    """The node that rebuilds ``mapping`` (``rebuildable``) from its contents, with the tracer's own functions."""
    if dataclasses.is_dataclass(mapping):  # torch.fx would take it for a plain dict
        fields = {f.name: create_arg(getattr(mapping, f.name)) for f in dataclasses.fields(mapping) if f.init}
        node = create_node("call_function", type(mapping), (), fields)
    else:
        node = create_node("call_function", type(mapping), (create_arg(dict(mapping)),), {})
    # as for torch.fx.wrap: the code declares the call opaque, so that a GraphModule
    # re-traced from its code (when unpickled) keeps it, instead of a plain dict
    return keep_opaque_when_retraced(node)
