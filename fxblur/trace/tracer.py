"""Symbolic tracing of a model into the flat graph the passes rewrite: ``BlurTracer`` and ``trace``.

``BlurTracer`` is torch.fx's ``Tracer`` with these changes, each in a module of its own:

- which modules are called whole (``fxblur.trace.leaves``): convs, pools, blurs,
  anti-aliasing layers, the user's ``leaf_modules``, and timm's registrations;
- every call of a module it traces through is recorded (``fxblur.trace.calls``), so that
  the rewrite can be put back into the modules where it happens; hooks registered on those
  modules do not run while tracing (they run when the result calls the module);
- ``forward``'s optional arguments are fixed at their defaults and decorated forwards
  are traced through their signature (``fxblur.trace.signature``);
- an output that is a dict subclass keeps its class (``fxblur.trace.outputs``);
- an input check that raises is traced as passing and kept as an assertion
  (``fxblur.trace.checks``);
- fxblur's own ops (``blur``, the polyphase ops) called in a model's code stay calls.

When tracing fails, ``trace`` raises ``UntraceableModelError`` naming the module and the
source line that failed (``fxblur.trace.errors``). Tips for making a model traceable:

- data-dependent control flow (``if x.sum() > 0``) or calls into code that
  inspects tensors cannot be traced; pass the module that holds it in ``leaf_modules``
  (it is then called as a whole, and strided ops inside it are left alone);
- branches on a non-tensor argument are fixed at its default; to trace another value
  (``def forward(self, x, return_features=False)``), pass
  ``concrete_args={"return_features": True}``;
- ``torch.fx.wrap("fn")`` at module level makes a free function opaque to tracing;
- a model whose own forward loops over images or proposals (a detector) can be rewritten
  in its traceable parts: ``transform(model, strict=False)``.

Example:
    >>> traced = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2)))
    >>> [node.op for node in traced.graph.nodes]
    ['placeholder', 'call_module', 'output']
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxblur._compat import RootFunctionTracer
from fxblur.trace.calls import CALL, LINE, Call, as_nodes
from fxblur.trace.checks import check_in, membership_compared
from fxblur.trace.errors import explain
from fxblur.trace.frames import calling_line, model_frame
from fxblur.trace.leaves import FXBLUR_OPS, LeafPolicy, timm_functions, timm_leaf_enclosing
from fxblur.trace.outputs import rebuild_node, rebuildable
from fxblur.trace.signature import default_arguments, explicit_forward, name_fixed_placeholders


class BlurTracer(RootFunctionTracer):
    """A ``torch.fx.Tracer`` that keeps convs, pools, blurs and ``leaf_modules`` as calls.

    Args:
        leaf_modules: module classes, or module paths such as ``"backbone.stem"``, to call
            as a whole instead of tracing through.
        specialise_defaults: fix ``forward``'s constant defaults and ``*args`` / ``**kwargs``
            (``fxblur.trace.signature.default_arguments``); after a trace, ``specialised``
            holds what was fixed.
    """

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = (), specialise_defaults: bool = True) -> None:
        super().__init__(autowrap_functions=(*FXBLUR_OPS, *timm_functions()))
        self.leaves = LeafPolicy(leaf_modules)
        self.specialise_defaults = specialise_defaults
        self.specialised: dict[str, Any] = {}
        self.failed_module: tuple[str, type[nn.Module]] | None = None
        self.root_call: Call | None = None
        self._current: Call | None = None
        self._memberships: set[tuple] = set()

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.root_call = self._current = Call("", root)
        concrete_args = dict(concrete_args or {})
        self.specialised = default_arguments(type(root).forward, concrete_args) if self.specialise_defaults else {}
        concrete_args.update(self.specialised)
        graph = super().trace(root, concrete_args or None)
        name_fixed_placeholders(graph, concrete_args, self.specialised)
        self.root_call.args = tuple(node for node in graph.nodes if node.op == "placeholder")
        self.root_call.output = next(node for node in graph.nodes if node.op == "output").args[0]
        return graph

    def root_function(self, fn: Callable, concrete_args: dict[str, Any]) -> Callable:
        return explicit_forward(fn, concrete_args)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Any = None, type_expr: Any = None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[CALL] = self._current
        if kind == "call_function":
            node.meta[LINE] = calling_line()
        return node

    def create_arg(self, a: Any) -> Any:
        if rebuildable(a):
            return rebuild_node(a, self.create_arg, self.create_node)
        return super().create_arg(a)

    def to_bool(self, obj: fx.Proxy) -> bool:
        frame = model_frame()
        check = check_in(frame)
        if check is None:
            return super().to_bool(obj)
        message = (
            f"this input fails the check at {check.where}, which fxblur kept as an assertion when it traced the model"
        )
        tested, constant = _compared(obj.node)
        membership = membership_compared(check, constant) if tested is not None else None
        if membership is not None:
            key = (check.where, tested)
            if key not in self._memberships:  # the membership itself is the assertion, once
                self._memberships.add(key)
                value = fx.Proxy(tested, self)
                passes = self.create_proxy("call_function", operator.contains, (membership.elements, value), {})
                if not membership.holds:
                    passes = self.create_proxy("call_function", operator.not_, (passes,), {})
                torch._assert(passes, message)
            self.graph.erase_node(obj.node)
            return membership.holds
        if check.value is None:
            return super().to_bool(obj)
        torch._assert(obj if check.value else operator.eq(obj, False), message)
        return check.value

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.leaves.is_leaf(m, module_qualified_name) or super().is_leaf_module(m, module_qualified_name)

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
                path = next((name for name, sub in self.root.named_modules() if sub is m), None)
                self.failed_module = None if path is None else (path, type(m))
            raise


def _compared(node: fx.Node) -> tuple[fx.Node | None, Any]:
    """For ``value == constant`` (an element of a membership test, compared in turn): the value and the constant."""
    if node.op != "call_function" or node.target is not operator.eq or len(node.args) != 2:
        return None, None
    left, right = node.args
    if isinstance(left, fx.Node) and not isinstance(right, fx.Node):
        return left, right
    if isinstance(right, fx.Node) and not isinstance(left, fx.Node):
        return right, left
    return None, None


@dataclass(frozen=True)
class Traced:
    """A flat graph of a module, the tree of module calls it was traced through, and its leaf modules.

    ``leaves`` are the paths of the modules called whole for the user's ``leaf_modules`` or
    timm's registrations (not convs, pools or blurs): code fxblur does not see runs in them.
    ``specialised``: the ``forward`` arguments fixed to their defaults.
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
        swaps = _stand_in_buffers(root)
        try:
            graph = tracer.trace(root, concrete_args)
            written = next((swap.path for swap in swaps if swap.copy._version), None)
            if written is None:
                return Traced(graph, tracer.root_call, tracer.leaves.called_whole(root, graph), tracer.specialised)
        except Exception as error:
            path, cls = tracer.failed_module or (None, None)
            fallback = timm_leaf_enclosing(root, path)
            if fallback is None:
                raise explain(root, path, cls, error) from error
            leaf_modules = (*leaf_modules, fallback)
            continue
        finally:
            for module, attributes in saved:
                added = module.__dict__.keys() - attributes.keys()
                for name in added:
                    if not isinstance(module.__dict__[name], torch.Tensor):
                        del module.__dict__[name]
                module.__dict__.update(attributes)
            for swap in swaps:
                swap.module._buffers[swap.name] = swap.original
        if not written:  # the model's own forward writes a buffer: no trace can record that
            why = RuntimeError("its forward writes one of its buffers in place, which a trace cannot record")
            raise explain(root, "", type(root), why)
        leaf_modules = (*leaf_modules, written)  # call the module whole: its code then runs as it is


@dataclass(frozen=True)
class _Swap:
    path: str
    module: nn.Module
    name: str
    original: torch.Tensor
    copy: torch.Tensor


def _stand_in_buffers(root: nn.Module) -> list[_Swap]:
    """Give every module copies of its buffers for the trace: a forward that writes one in place while traced
    (a batch counter) must not touch the model's own tensor, and the copies' versions say who did."""
    swaps = []
    for path, module in root.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                swaps.append(_Swap(path, module, name, buffer, buffer.detach().clone()))
    for swap in swaps:
        swap.module._buffers[swap.name] = swap.copy
    return swaps
