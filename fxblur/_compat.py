"""Every private PyTorch or timm internal fxblur relies on, each behind one named function.

Nothing else in fxblur reaches past the public API of torch or timm; when an upgrade breaks
one of these, it breaks here, and ``tests/test_compat_internals.py`` (one test per entry,
pinning the behaviour fxblur needs) says which. Checked on torch 2.4.1 (the oldest
``pyproject.toml`` accepts, ``tools/minimum_versions.sh``) to 2.14.1, and timm 1.0.

What each entry wraps:

- ``keep_opaque_when_retraced``: ``node.meta["is_wrapped"]``. torch.fx's code generator
  writes ``torch.fx.wrap("fn")`` for such a node, so a GraphModule re-traced from its code
  (as torch.fx does when it unpickles one) keeps the call a call.
- ``RootFunctionTracer``: ``Tracer.create_args_for_root``, the hook that turns the traced
  function's signature into placeholders.
- ``is_none_check``: torch.fx's ``_assert_is_none``, the check it emits for an argument
  traced as ``None``.
- ``GRAPH_ATTRIBUTE``, ``new_graph_module_of_class``: a GraphModule keeps its graph in
  ``_graph``, and every instance gets a class of its own (``GraphModuleImpl``).
- ``RefillAfterApply``: ``nn.Module._apply``, what ``.to()``, ``.half()`` and
  ``.to_empty()`` go through.
- ``rebind_wrapped_hook``, ``retarget_handle``: ``torch.nn.modules.module._WrappedHook`` and
  the state of ``RemovableHandle``, which a copy of a module must point at its own tables.
- ``functorch_transforms_active``: ``torch._C._are_functorch_transforms_active``.
- ``run_passes``: ``PassManager`` wraps what a pass raises in a bare ``Exception``; this
  re-raises the pass's own error.
- ``quiet_fake_tensor_logs``, ``fake_tensor_mode``: the fake-tensor module and its logger.
- ``compiled_module_class``: ``torch._dynamo.eval_frame.OptimizedModule``.
- ``CONV_BASE``, ``MAX_POOL_BASE``, ``AVG_POOL_BASE``, ``LP_POOL_BASE``, ``BATCH_NORM_BASE``:
  torch.nn's private base classes of convs, pools and batch norms (subclasses from other libraries share them).
- ``WITH_INDICES_BUILTINS``: the ``torch._C._nn`` builtins behind ``F.max_pool2d/3d`` with indices.
- ``IMMUTABLE_DICT``, ``IMMUTABLE_LIST``: the containers torch.fx puts node arguments in.
- ``timm_fx_registrations``: ``timm.layers._fx``, the modules and functions timm marks as
  not traceable.

Example:
    >>> graph = fx.Graph()
    >>> x = graph.placeholder("x")
    >>> keep_opaque_when_retraced(graph.call_function(torch.relu, (x,))).meta
    {'is_wrapped': True}
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.nn.modules.module import _WrappedHook
from torch.utils.hooks import RemovableHandle

CONV_BASE = nn.modules.conv._ConvNd
MAX_POOL_BASE = nn.modules.pooling._MaxPoolNd
AVG_POOL_BASE = nn.modules.pooling._AvgPoolNd
LP_POOL_BASE = nn.modules.pooling._LPPoolNd
BATCH_NORM_BASE = nn.modules.batchnorm._BatchNorm
WITH_INDICES_BUILTINS = (
    torch.max_pool1d_with_indices,
    torch._C._nn.max_pool2d_with_indices,
    torch._C._nn.max_pool3d_with_indices,
)
IMMUTABLE_DICT, IMMUTABLE_LIST = immutable_dict, immutable_list
GRAPH_ATTRIBUTE = "_graph"


def keep_opaque_when_retraced(node: fx.Node) -> fx.Node:
    """Mark a call of a ``torch.fx.wrap``-ed function so that re-tracing the generated code keeps it one call."""
    node.meta["is_wrapped"] = True
    return node


class RootFunctionTracer(fx.Tracer):
    """A ``Tracer`` whose subclasses may swap the traced function (``root_function``) before its signature is read."""

    def root_function(self, fn: Callable, concrete_args: dict[str, Any]) -> Callable:
        return fn

    def create_args_for_root(
        self, root_fn: Callable, is_module: bool, concrete_args: dict[str, Any] | None = None
    ) -> tuple[Callable, list]:
        fn = self.root_function(root_fn, concrete_args or {})
        return super().create_args_for_root(fn, is_module, concrete_args)


def is_none_check(node: fx.Node) -> bool:
    """Whether ``node`` is torch.fx's check that an argument traced as ``None`` is ``None`` (message: ``args[1]``)."""
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none"


def new_graph_module_of_class(cls: type[fx.GraphModule]) -> fx.GraphModule:
    """An empty instance of ``cls``, with the class of its own that every GraphModule gets (for its ``forward``)."""
    return cls.__new__(cls)


class RefillAfterApply(nn.Module):
    """A module whose ``refill`` runs after everything that moves or converts its tensors.

    ``.to()``, ``.half()``, ``.cuda()`` and ``.to_empty()`` all go through ``nn.Module._apply``.
    """

    def refill(self) -> None:
        raise NotImplementedError

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RefillAfterApply:
        super()._apply(fn, recurse)
        self.refill()
        return self


def rebind_wrapped_hook(hook: Any, rebind: Callable[[Any], Any], module: nn.Module, clone: nn.Module) -> Any:
    """``hook`` for ``clone``: a ``_WrappedHook`` (a hook registered ``with_module``) gets its function
    rebound by ``rebind`` and, if it points at ``module``, points at ``clone``; any other hook is
    returned as it is."""
    if not isinstance(hook, _WrappedHook):
        return hook
    wrapped = copy.copy(hook)
    wrapped.hook = rebind(hook.hook)
    if getattr(hook, "with_module", False) and hook.module() is module:
        wrapped.module = weakref.ref(clone)
    return wrapped


def retarget_handle(handle: RemovableHandle, tables: dict[int, dict]) -> RemovableHandle:
    """``handle`` for the copies of the hook tables it refers to (``tables``: id of an original table -> its copy).

    A handle that refers to none of them is returned as it is.
    """
    state = handle.__getstate__()
    table, hook_id, extra = state[0], state[1], state[2] if len(state) > 2 else ()
    copies = [tables.get(id(table)), *(tables.get(id(each)) for each in extra or ())]
    if copies[0] is None:
        return handle
    retargeted = RemovableHandle.__new__(RemovableHandle)
    retargeted.__setstate__((copies[0], hook_id, tuple(c for c in copies[1:] if c is not None)))
    return retargeted


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``) is running: what ``Function.apply`` asks."""
    return torch._C._are_functorch_transforms_active()


def run_passes(passes: list, graph_module: fx.GraphModule) -> None:
    """Run ``passes`` through torch.fx's ``PassManager``; an error a pass raises comes out as itself.

    ``PassManager`` re-raises it as a bare ``Exception("An error occurred when running ...")``.
    """
    from torch.fx.passes.infra.pass_manager import PassManager

    try:
        PassManager(passes)(graph_module)
    except Exception as error:
        raise (error.__cause__ or error) from None


@contextlib.contextmanager
def quiet_fake_tensor_logs() -> Iterator[None]:
    """Silence the fake-tensor module's logging of an op that fails (its error is raised all the same)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def fake_tensor_mode() -> Any:
    """A ``FakeTensorMode`` that also takes real tensors (the graph's parameters) as inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def compiled_module_class() -> type:
    """The wrapper class ``torch.compile(module)`` returns."""
    return torch._dynamo.eval_frame.OptimizedModule


def timm_fx_registrations() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's torch.fx registrations (module classes not to trace, functions to keep as calls), if timm is loaded.

    fxblur never imports timm: where the model did, its registrations are honoured.
    """
    fx_support = sys.modules.get("timm.layers._fx")
    if fx_support is None:
        return (), ()
    return tuple(fx_support.get_notrace_modules()), tuple(fx_support.get_notrace_functions())
