"""Symbolic tracing of a model into the graph that the blur passes rewrite.

``BlurTracer`` is torch.fx's ``Tracer`` with three changes:

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
  those modules do not run while tracing (they run when the result calls the module).

When tracing fails, ``trace`` raises ``UntraceableModelError`` naming the module and the
source line that failed. Tips for making a model traceable:

- data-dependent control flow (``if x.sum() > 0``) or calls into code that
  inspects tensors cannot be traced; pass the module that holds it in ``leaf_modules``
  (it is then called as a whole, and strided ops inside it are left alone);
- branches on a non-tensor argument (``def forward(self, x, return_features=False)``)
  can be fixed with ``concrete_args={"return_features": False}``;
- ``torch.fx.wrap("fn")`` at module level makes a free function opaque to tracing.

Example:
    >>> traced = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2)))
    >>> [node.op for node in traced.graph.nodes]
    ['placeholder', 'call_module', 'output']
"""

from __future__ import annotations

import linecache
import os
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.proxy import TraceError

from fxblur.ops.blur_module import Blur
from fxblur.rewrite.calls import CALL, LINE, Call, as_nodes
from fxblur.rewrite.known_layers import anti_aliasing

ALWAYS_LEAVES = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, Blur)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FXBLUR_DIR = os.path.dirname(__file__) + os.sep


class UntraceableModelError(TraceError):
    """torch.fx could not trace the model; the message says where and what to try."""


class BlurTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that keeps convs, pools, blurs and ``leaf_modules`` as calls.

    Args:
        leaf_modules: module classes, or module paths such as ``"backbone.stem"``, to call
            as a whole instead of tracing through.
    """

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = ()) -> None:
        super().__init__(autowrap_functions=tuple(_timm_registrations()[1]))
        leaf_modules = tuple(leaf_modules)
        self.user_leaf_classes = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_classes = ALWAYS_LEAVES + self.user_leaf_classes
        self.leaf_paths = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.failed_module: tuple[str, type[nn.Module]] | None = None
        self.root_call: Call | None = None
        self._current: Call | None = None

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.root_call = self._current = Call("", root)
        graph = super().trace(root, concrete_args)
        self.root_call.args = tuple(node for node in graph.nodes if node.op == "placeholder")
        self.root_call.output = next(node for node in graph.nodes if node.op == "output").args[0]
        return graph

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Any = None, type_expr: Any = None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[CALL] = self._current
        if kind == "call_function":
            node.meta[LINE] = _calling_line()
        return node

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
    """

    graph: fx.Graph
    root: Call
    leaves: tuple[str, ...] = ()


def trace(
    root: nn.Module,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Traced:
    """Trace ``root`` with ``BlurTracer``; ``UntraceableModelError`` if torch.fx cannot.

    Modules keep the attributes they had: a forward that stores on ``self`` while traced
    (torchvision's ``MultiScaleRoIAlign`` caches its scales) would otherwise keep proxies,
    which leak into the next trace's graph or break the module when called. The tensor
    constants the tracer adds to ``root`` for its graph stay.
    """
    leaf_modules = tuple(leaf_modules)
    while True:
        tracer = BlurTracer(leaf_modules)
        saved = [(module, dict(module.__dict__)) for module in root.modules()]
        try:
            graph = tracer.trace(root, concrete_args)
            return Traced(graph, tracer.root_call, _leaf_paths(root, tracer, graph))
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
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith((_TORCH_DIR, _FXBLUR_DIR)):
        frame = frame.f_back
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


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
