"""The ``forward`` signature the tracer traces: optional arguments fixed at their defaults, decorators seen through.

- Every ``forward`` parameter after the first that ``concrete_args`` does not name and whose
  default is ``None``, a bool, int, float or str is fixed to that default, and ``*args`` /
  ``**kwargs`` to nothing (``default_arguments``). torch.fx would make each a proxy, so
  ``if mask is not None:`` would trace the masked branch; fixed, the graph is the code the
  model runs when called with its input alone. Calling the result with another value
  raises an ``AssertionError`` that names the argument (passing the default, or leaving it
  out, is fine; ``name_fixed_placeholders``). ``concrete_args={"mask": torch.fx.PH}`` keeps
  a parameter an input.
- A forward wrapped by a decorator (``functools.wraps`` over ``wrapper(self, *args,
  **kwargs)``, as Hugging Face's ``can_return_tuple``) is traced through a stand-in with the
  wrapped signature that calls the decorated forward by keyword (``explicit_forward``).

Example:
    >>> def forward(self, x, mask=None, scale=1.0, weights=torch.ones(2), *args, size, **kwargs):
    ...     pass
    >>> default_arguments(forward, {"scale": 2.0})
    {'mask': None, '*args': (), '**kwargs': {}}
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from fxblur._compat import is_none_check

_CONSTANT_DEFAULTS = (type(None), bool, int, float, str)


def default_arguments(forward: Callable, concrete_args: dict[str, Any]) -> dict[str, Any]:
    """The ``forward`` arguments the tracer fixes: name (``"*args"``, ``"**kwargs"`` for those) -> value.

    Every parameter after the input (the first after ``self``) that ``concrete_args`` does
    not name and whose default is ``None``, a bool, int, float or str; ``*args`` and
    ``**kwargs`` become empty.
    """
    parameters = list(inspect.signature(forward).parameters.values())[2:]
    fixed: dict[str, Any] = {}
    for parameter in parameters:
        name = concrete_name(parameter)
        if name in concrete_args:
            continue
        if parameter.kind is parameter.VAR_POSITIONAL:
            fixed[name] = ()
        elif parameter.kind is parameter.VAR_KEYWORD:
            fixed[name] = {}
        elif type(parameter.default) in _CONSTANT_DEFAULTS:
            fixed[name] = parameter.default
    return fixed


def concrete_name(parameter: inspect.Parameter) -> str:
    """How torch.fx's ``concrete_args`` names a parameter: ``"*args"`` and ``"**kwargs"`` for the variadic ones."""
    stars = {parameter.VAR_POSITIONAL: "*", parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
    return stars + parameter.name


def explicit_forward(forward: Callable, concrete_args: dict[str, Any]) -> Callable:
    """``forward`` to trace: itself, or a stand-in with its named parameters only.

    torch.fx reads the signature of the innermost function (``inspect.unwrap``) but calls
    ``forward`` with that many positional arguments, which a decorator's
    ``wrapper(self, *args, **kwargs)`` misreads; and it makes ``*args`` and ``**kwargs``
    proxies, which code that unpacks them cannot use. The stand-in calls ``forward`` by
    keyword, with the values ``concrete_args`` gives ``*args`` and ``**kwargs`` (else none).

    Example:
        >>> def forward(self, x, *args, scale=1.0, **kwargs):
        ...     return x * scale
        >>> str(inspect.signature(explicit_forward(forward, {})))
        '(self, x, *, scale=1.0)'
    """
    parameters = list(inspect.signature(forward).parameters.values())
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if len(parameters) < 2 or parameters[1].kind in variadic:
        return forward
    if not hasattr(forward, "__wrapped__") and not any(p.kind in variadic for p in parameters):
        return forward
    named = [p for p in parameters if p.kind not in variadic]
    var_args = [p for p in parameters if p.kind is p.VAR_POSITIONAL]
    var_kwargs = [p for p in parameters if p.kind is p.VAR_KEYWORD]
    extra = tuple(concrete_args.get(concrete_name(var_args[0]), ())) if var_args else ()
    keywords = dict(concrete_args.get(concrete_name(var_kwargs[0]), {})) if var_kwargs else {}
    # self and positional-only parameters go by position; with values for *args, every positional one
    by_position = [
        p.name
        for p in named
        if p is named[0] or p.kind is p.POSITIONAL_ONLY or (extra and p.kind is p.POSITIONAL_OR_KEYWORD)
    ]
    by_keyword = [f"{p.name}={p.name}" for p in named if p.name not in by_position]
    call = ", ".join([*by_position, "*_fxblur_args", *by_keyword, "**_fxblur_kwargs"])
    signature = inspect.Signature([p.replace(default=p.empty, annotation=p.empty) for p in named])
    scope: dict[str, Any] = {"_fxblur_forward": forward, "_fxblur_args": extra, "_fxblur_kwargs": keywords}
    exec(f"def forward{signature}:\n    return _fxblur_forward({call})\n", scope)
    stand_in = scope["forward"]
    positional_defaults = [p.default for p in named if p.kind is not p.KEYWORD_ONLY and p.default is not p.empty]
    stand_in.__defaults__ = tuple(positional_defaults) or None
    stand_in.__kwdefaults__ = {
        p.name: p.default for p in named if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    }
    return stand_in


def name_fixed_placeholders(graph: fx.Graph, concrete_args: dict[str, Any], specialised: dict[str, Any]) -> None:
    """Give the placeholders of fixed arguments their parameter's name, and check their values in plain code.

    torch.fx names the placeholder of a fixed argument ``mask_1``, so that the result would
    not take ``mask=None`` by keyword; its check of a ``None`` calls a function that a
    GraphModule re-traced from its code (when unpickled) registers under a name that breaks
    every later trace in the process; and its messages do not say who fixed a default. A
    value made of several pieces (a dict with ``PH`` in it) keeps torch.fx's names.
    """
    taken = {node.target for node in graph.nodes if node.op == "placeholder"}
    for node in list(graph.nodes):
        if node.op != "placeholder" or not node.target.endswith("_1"):
            continue
        name = node.target[: -len("_1")]
        if name not in concrete_args or name in taken or isinstance(concrete_args[name], (tuple, list, dict)):
            continue
        node.target = name
        for check in [user for user in node.users if is_none_check(user)]:
            with graph.inserting_before(check):
                is_none = graph.call_function(operator.eq, (node, None))
                replacement = graph.call_function(torch._assert, (is_none, check.args[1]))
            is_none.meta, replacement.meta = dict(check.meta), dict(check.meta)
            check.replace_all_uses_with(replacement)
            graph.erase_node(check)
        if name in specialised:
            message = (
                f"{name} was fixed to its default, {specialised[name]!r}, when fxblur traced the model, but got "
                f"another value; to make it an input, transform with concrete_args={{{name!r}: torch.fx.PH}}"
            )
            compares = [user for user in node.users if user.target is operator.eq]
            for check in [user for compare in compares for user in compare.users if user.target is torch._assert]:
                check.args = (check.args[0], message)
