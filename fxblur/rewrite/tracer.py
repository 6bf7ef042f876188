"""Symbolic tracing of a model into the graph that the blur passes rewrite.

``BlurTracer`` is torch.fx's ``Tracer`` with these changes:

- every conv, pool and ``Blur`` module is a leaf, including subclasses from other
  libraries (timm's ``Conv2dSame``, ``StdConv2d``): the passes then see the call and can
  decide on it, instead of tracing into code whose arithmetic they cannot rewrite; so is
  every layer that anti-aliases already (timm's ``BlurPool2d``, kornia's ``MaxBlurPool2D``:
  ``fxblur.rewrite.known_layers``), which is never blurred again;
- ``leaf_modules`` adds the user's own leaves, by class or by module path;
- where timm is loaded, the functions timm registers as not traceable stay calls, and a
  module that fails to trace falls back to being a leaf if timm registered its class so
  (``timm.layers._fx``): every model timm's own tracing handles traces whole;
- every call of a module it traces through is recorded (``fxblur.rewrite.calls``), so
  that the rewrite can be put back into the modules where it happens; hooks registered on
  those modules do not run while tracing (they run when the result calls the module);
- every ``forward`` parameter after the first that ``concrete_args`` does not name and
  whose default is ``None``, a bool, int, float or str is fixed to that default, and
  ``*args`` / ``**kwargs`` to nothing (``default_arguments``). torch.fx would make each a
  proxy, so ``if mask is not None:`` would trace the masked branch; fixed, the graph is
  the code the model runs when called with the input alone, and calling the result with
  another value raises an ``AssertionError`` that names the argument (passing the
  default, or leaving it out, is fine). ``concrete_args={"mask": torch.fx.PH}`` keeps a
  parameter an input;
- a forward wrapped by a decorator (``functools.wraps`` over ``wrapper(self, *args,
  **kwargs)``, as Hugging Face's ``can_return_tuple``) is traced through a stand-in with
  the wrapped signature that calls the decorated forward by keyword;
- an output that is a dict subclass keeps its class: a dataclass one (Hugging Face's
  ``ModelOutput``) is rebuilt from its fields, an ``OrderedDict`` from its items, where
  torch.fx would return a plain dict;
- a check that raises (``if x.shape[1] != self.channels: raise ValueError(...)``, as in
  Hugging Face's embeddings, or ``assert x.dim() == 4``) is traced as passing and stays in
  the graph as a ``torch._assert`` of its test: an input that fails it still fails, with
  an ``AssertionError`` naming the check where the module's forward is rewritten.

When tracing fails, ``trace`` raises ``UntraceableModelError`` naming the module and the
source line that failed. Tips for making a model traceable:

- data-dependent control flow (``if x.sum() > 0``) or calls into code that
  inspects tensors cannot be traced; pass the module that holds it in ``leaf_modules``
  (it is then called as a whole, and strided ops inside it are left alone);
- branches on a non-tensor argument are fixed at its default; to trace another value
  (``def forward(self, x, return_features=False)``), pass
  ``concrete_args={"return_features": True}``;
- ``torch.fx.wrap("fn")`` at module level makes a free function opaque to tracing.

Example:
    >>> traced = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2)))
    >>> [node.op for node in traced.graph.nodes]
    ['placeholder', 'call_module', 'output']
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import inspect
import linecache
import operator
import os
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict
from torch.fx.proxy import TraceError

from fxblur.changes import metadata
from fxblur.ops.blur_module import Blur
from fxblur.rewrite.calls import CALL, LINE, Call, as_nodes
from fxblur.rewrite.known_layers import anti_aliasing

ALWAYS_LEAVES = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, Blur)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FXBLUR_DIR = os.path.dirname(__file__) + os.sep
_CONSTANT_DEFAULTS = (type(None), bool, int, float, str)
_SPECIALISED_KEY = "fxblur.specialised"


class UntraceableModelError(TraceError):
    """torch.fx could not trace the model; the message says where and what to try."""


class BlurTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that keeps convs, pools, blurs and ``leaf_modules`` as calls.

    Args:
        leaf_modules: module classes, or module paths such as ``"backbone.stem"``, to call
            as a whole instead of tracing through.
        specialise_defaults: fix ``forward``'s constant defaults and ``*args`` / ``**kwargs``
            (``default_arguments``); after a trace, ``specialised`` holds what was fixed.
    """

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = (), specialise_defaults: bool = True) -> None:
        super().__init__(autowrap_functions=tuple(_timm_registrations()[1]))
        self.specialise_defaults = specialise_defaults
        self.specialised: dict[str, Any] = {}
        leaf_modules = tuple(leaf_modules)
        self.user_leaf_classes = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_classes = ALWAYS_LEAVES + self.user_leaf_classes
        self.leaf_paths = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.failed_module: tuple[str, type[nn.Module]] | None = None
        self.root_call: Call | None = None
        self._current: Call | None = None

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.root_call = self._current = Call("", root)
        concrete_args = dict(concrete_args or {})
        self.specialised = default_arguments(type(root).forward, concrete_args) if self.specialise_defaults else {}
        concrete_args.update(self.specialised)
        graph = super().trace(root, concrete_args or None)
        _name_fixed_placeholders(graph, concrete_args, self.specialised)
        self.root_call.args = tuple(node for node in graph.nodes if node.op == "placeholder")
        self.root_call.output = next(node for node in graph.nodes if node.op == "output").args[0]
        return graph

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Any = None, type_expr: Any = None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[CALL] = self._current
        if kind == "call_function":
            node.meta[LINE] = _calling_line()
        return node

    def create_args_for_root(
        self, root_fn: Callable, is_module: bool, concrete_args: dict[str, Any] | None = None
    ) -> tuple[Callable, list]:
        return super().create_args_for_root(_explicit_forward(root_fn, concrete_args or {}), is_module, concrete_args)

    def create_arg(self, a: Any) -> Any:
        if not isinstance(a, dict) or type(a) in (dict, immutable_dict) or not _rebuildable(a):
            return super().create_arg(a)
        if dataclasses.is_dataclass(a):  # torch.fx would take it for a plain dict
            fields = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a) if f.init}
            node = self.create_node("call_function", type(a), (), fields)
        else:
            node = self.create_node("call_function", type(a), (super().create_arg(dict(a)),), {})
        # as for torch.fx.wrap: the code declares the call opaque, so that a GraphModule
        # re-traced from its code (when unpickled) keeps it, instead of a plain dict
        node.meta["is_wrapped"] = True
        return node

    def to_bool(self, obj: fx.Proxy) -> bool:
        check = _check_passed_by(_model_frame())
        if check is None:
            return super().to_bool(obj)
        passing, where = check
        message = f"this input fails the check at {where}, which fxblur kept as an assertion when it traced the model"
        torch._assert(obj if passing else operator.eq(obj, False), message)
        return passing

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, self.leaf_classes)
            or module_qualified_name in self.leaf_paths
            or anti_aliasing(m) is not None
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
            if self.is_leaf_module(m, path):
                return super().call_module(m, forward, args, kwargs)
            call = Call(path, m, self._current, as_nodes(args), as_nodes(kwargs))
            self._current.children.append(call)
            self._current = call
            try:  # m.forward, not m(...): the module's hooks must not run on proxies
                output = super().call_module(m, lambda *a, **k: m.forward(*a, **k), args, kwargs)
            finally:
                self._current = call.parent
            call.output = as_nodes(output)
            return output
        except Exception:
            if self.failed_module is None:  # the innermost module fails first
                path = next((name for name, sub in self.root.named_modules() if sub is m), "?")
                self.failed_module = (path, type(m))
            raise


@dataclass(frozen=True)
class Traced:
    """A flat graph of a module, the tree of module calls it was traced through, and its leaf modules.

    ``leaves`` are the paths of the modules called whole for the user's ``leaf_modules`` or
    timm's registrations (not convs, pools or blurs): code fxblur does not see runs in them.
    ``specialised``: the ``forward`` arguments fixed to their defaults (``default_arguments``).
    """

    graph: fx.Graph
    root: Call
    leaves: tuple[str, ...] = ()
    specialised: dict[str, Any] = field(default_factory=dict)


def trace(
    root: nn.Module,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
    specialise_defaults: bool = True,
) -> Traced:
    """Trace ``root`` with ``BlurTracer``; ``UntraceableModelError`` if torch.fx cannot.

    ``specialise_defaults=False`` traces every ``forward`` parameter as torch.fx does: for
    a part of a model that untraced code calls (``transform(strict=False)``), with
    arguments fxblur does not see.

    Modules keep the attributes they had: a forward that stores on ``self`` while traced
    (torchvision's ``MultiScaleRoIAlign`` caches its scales) would otherwise keep proxies,
    which leak into the next trace's graph or break the module when called. The tensor
    constants the tracer adds to ``root`` for its graph stay.
    """
    leaf_modules = tuple(leaf_modules)
    while True:
        tracer = BlurTracer(leaf_modules, specialise_defaults)
        saved = [(module, dict(module.__dict__)) for module in root.modules()]
        try:
            graph = tracer.trace(root, concrete_args)
            return Traced(graph, tracer.root_call, _leaf_paths(root, tracer, graph), tracer.specialised)
        except Exception as error:
            fallback = _timm_leaf(root, tracer.failed_module)
            if fallback is None:
                raise UntraceableModelError(_explain(root, tracer.failed_module, error)) from error
            leaf_modules = (*leaf_modules, fallback)
        finally:
            for module, attributes in saved:
                added = module.__dict__.keys() - attributes.keys()
                for name in added:
                    if not isinstance(module.__dict__[name], torch.Tensor):
                        del module.__dict__[name]
                module.__dict__.update(attributes)


def default_arguments(forward: Callable, concrete_args: dict[str, Any]) -> dict[str, Any]:
    """The ``forward`` arguments ``BlurTracer`` fixes: name (``"*args"``, ``"**kwargs"`` for those) -> value.

    Every parameter after the input (the first after ``self``) that ``concrete_args`` does
    not name and whose default is ``None``, a bool, int, float or str; ``*args`` and
    ``**kwargs`` become empty.

    Example:
        >>> def forward(self, x, mask=None, scale=1.0, weights=torch.ones(2), *args, size, **kwargs):
        ...     pass
        >>> default_arguments(forward, {"scale": 2.0})
        {'mask': None, '*args': (), '**kwargs': {}}
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


def store_specialised(module: nn.Module, specialised: dict[str, Any]) -> None:
    """Keep on the rewritten ``module`` which ``forward`` arguments its trace fixed to their defaults."""
    metadata(module, create=True)[_SPECIALISED_KEY] = dict(specialised)


def specialised_of(module: nn.Module) -> dict[str, Any]:
    """The ``forward`` arguments fixed to their defaults when ``module`` was rewritten (empty if none)."""
    return dict(metadata(module).get(_SPECIALISED_KEY, {}))


def concrete_name(parameter: inspect.Parameter) -> str:
    """How torch.fx's ``concrete_args`` names a parameter: ``"*args"`` and ``"**kwargs"`` for the variadic ones."""
    stars = {parameter.VAR_POSITIONAL: "*", parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
    return stars + parameter.name


def _explicit_forward(forward: Callable, concrete_args: dict[str, Any]) -> Callable:
    """``forward`` to trace: itself, or a stand-in with its named parameters only.

    torch.fx reads the signature of the innermost function (``inspect.unwrap``) but calls
    ``forward`` with that many positional arguments, which a decorator's
    ``wrapper(self, *args, **kwargs)`` misreads; and it makes ``*args`` and ``**kwargs``
    proxies, which code that unpacks them cannot use. The stand-in calls ``forward`` by
    keyword, with the values ``concrete_args`` gives ``*args`` and ``**kwargs`` (else none).
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


def _rebuildable(mapping: dict) -> bool:
    """Whether a call of its class gives back a dict subclass.

    A dataclass (Hugging Face's ``ModelOutput``): if its keys are its fields that are not
    ``None``, in order, each holding the field's value. Any other: if its class takes
    its items as a dict does, and the instance has no attributes.
    """
    if dataclasses.is_dataclass(mapping):
        fields = [f.name for f in dataclasses.fields(mapping) if f.init]
        present = [name for name in fields if getattr(mapping, name) is not None]
        return list(mapping) == present and all(mapping[name] is getattr(mapping, name) for name in present)
    plain = type(mapping).__init__ in (dict.__init__, collections.OrderedDict.__init__)
    return plain and not getattr(mapping, "__dict__", None)


def _name_fixed_placeholders(graph: fx.Graph, concrete_args: dict[str, Any], specialised: dict[str, Any]) -> None:
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
        for check in [user for user in node.users if getattr(user.target, "__name__", "") == "_assert_is_none"]:
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


def _leaf_paths(root: nn.Module, tracer: BlurTracer, graph: fx.Graph) -> tuple[str, ...]:
    """The modules the graph calls whole for being user or timm leaves (not ops or blurs)."""
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    return tuple(
        path
        for path in called
        if path in tracer.leaf_paths or isinstance(root.get_submodule(path), tracer.user_leaf_classes)
    )


def _timm_registrations() -> tuple[tuple[type, ...], tuple]:
    """timm's torch.fx registrations (modules not to trace, functions to keep as calls), if timm is loaded."""
    fx_support = sys.modules.get("timm.layers._fx")
    if fx_support is None:
        return (), ()
    return tuple(fx_support.get_notrace_modules()), tuple(fx_support.get_notrace_functions())


def _timm_leaf(root: nn.Module, failed: tuple[str, type] | None) -> type | None:
    """The class timm registered as not traceable that encloses the module that failed, if any."""
    modules = _timm_registrations()[0]
    if failed is None or not modules or failed[0] == "?":
        return None
    path = failed[0]
    while True:
        module = root.get_submodule(path)
        if isinstance(module, modules):
            return type(module)
        if not path:
            return None
        path = path.rpartition(".")[0]


def _calling_line() -> tuple[str, int] | None:
    """``(file, line)`` of the innermost frame outside torch and fxblur: the model code that made a call."""
    frame = _model_frame()
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


def _model_frame() -> FrameType | None:
    """The innermost frame outside torch and fxblur: the model code running."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith((_TORCH_DIR, _FXBLUR_DIR)):
        frame = frame.f_back
    return frame


def _check_passed_by(frame: FrameType | None) -> tuple[bool, str] | None:
    """If ``frame`` is deciding the test of ``if ...: raise`` or ``assert ...``: the value that passes it, and where.

    The value is the one every operand of the test must take for the check to pass
    (``if a != b or not c: raise`` passes with ``a != b`` false and ``c`` true); ``None``
    where operands need different values, or the line is no such check.
    """
    if frame is None:
        return None
    try:
        lines, first = inspect.getsourcelines(frame.f_code)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return None
    line = frame.f_lineno - first + 1
    checks = [
        (node.test, isinstance(node, ast.Assert))
        for node in ast.walk(tree)
        if (isinstance(node, ast.Assert) or (isinstance(node, ast.If) and [type(s) for s in node.body] == [ast.Raise]))
        and node.test.lineno <= line <= node.test.end_lineno
    ]
    if not checks:
        return None
    test, passing = min(checks, key=lambda check: check[0].end_lineno - check[0].lineno)
    values = _operand_values(test, passing)
    if len(values) != 1:
        return None
    source = linecache.getline(frame.f_code.co_filename, test.lineno + first - 1).strip()
    return values.pop(), f"{frame.f_code.co_filename}:{test.lineno + first - 1} (`{source}`)"


def _operand_values(test: ast.expr, value: bool) -> set[bool]:
    """The values the operands of ``test`` (what ``bool()`` is called on) take when ``test`` is ``value``."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return _operand_values(test.operand, not value)
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or if not value else ast.And):
        return {found for operand in test.values for found in _operand_values(operand, value)}
    if isinstance(test, ast.BoolOp) or (isinstance(test, ast.Compare) and len(test.ops) > 1):
        return {True, False}  # either operand may decide it, or a chained comparison
    return {value}


def _explain(root: nn.Module, failed_module: tuple[str, type] | None, error: Exception) -> str:
    model = type(root).__name__
    where = ""
    if failed_module is not None:
        path, cls = failed_module
        where = f" in module `{path or '(root)'}` ({cls.__name__})"
    line = _user_line(error)
    if line:
        where += f" at {line}"
    if failed_module is not None and failed_module[0]:
        hint = (
            f"call the failing module as a whole with transform(model, leaf_modules=[{failed_module[1].__name__}]) "
            "(strided ops inside it are then left alone), or fix the non-tensor inputs that drive its control "
            "flow with concrete_args={...}."
        )
    else:
        hint = (
            f"{model}.forward itself cannot be traced: fix the non-tensor inputs that drive its control flow "
            "with concrete_args={...}, or transform its traceable parts (such as its backbone) one by one."
        )
    return f"fxblur could not trace {model}{where}: {type(error).__name__}: {error}\nHint: {hint}"


def _user_line(error: Exception) -> str | None:
    """``file:line (`source`)`` of the innermost frame outside torch and fxblur."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith((_TORCH_DIR, _FXBLUR_DIR)) and frame.filename != "<string>"
    ]
    if not frames:
        return None
    frame = frames[-1]
    source = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    return f"{frame.filename}:{frame.lineno} (`{source}`)"
