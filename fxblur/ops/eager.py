"""What fxblur's plain-PyTorch fast paths share: when they run, and how they differentiate.

The fast paths (``fxblur.ops.separable``, ``fxblur.ops.max_pool``) are sequences of elementwise ops
on views, wrapped in ``torch.autograd.Function``. They pay off where PyTorch's own kernels
are slow, on CPU; where a compiler sees the op (``torch.compile``, TorchScript,
``torch.jit.trace``, export), the op itself is easier for it to optimise and translate.
Tensor subclasses (the fake tensors of shape propagation, ``DTensor``) dispatch their own
ops, and take PyTorch's kernels too.

Both fast paths differentiate through one rule. The blur is linear in its input, and the
max pool is linear in the tangent or gradient it passes on (it routes each to the element
its window picked); so every derivative they need, of any order, is a linear map ``v ↦ op(v)``
or its transpose. ``apply_linear`` runs such a map as an autograd ``Function`` whose backward is
the transpose and whose forward-mode derivative is the map itself, both run through
``apply_linear`` again: double backward, forward mode and ``torch.func`` (``grad``, ``vmap``,
``jacrev``, ``jacfwd``, ``hessian``) then get exact derivatives to every order. (Not the
legacy batching of ``torch.autograd.functional.jacobian(vectorize=True)`` and
``is_grads_batched``, which cannot run ops with ``out=``: use ``torch.func`` there.)

Example:
    >>> runs_eagerly_on_cpu(torch.ones(2, 2)), runs_eagerly_on_cpu(torch.ones(2, 2, dtype=torch.half))
    (True, False)
    >>> class Reverse:  # reverses the last axis: its own transpose
    ...     transpose = property(lambda self: self)
    ...     def __call__(self, v):
    ...         return v.flip(-1)
    >>> v = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    >>> torch.autograd.grad(apply_linear(Reverse(), v), v, torch.tensor([1.0, 0.0, 0.0]))
    (tensor([0., 0., 1.]),)
"""

from __future__ import annotations

from functools import cache
from typing import Any, Protocol

import torch

from fxblur._compat import functorch_transforms_active


def runs_eagerly_on_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a plain float32/float64 CPU tensor outside any compiler or tracer."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and type(x) is torch.Tensor
    )


class LinearMap(Protocol):
    """A map linear in ``v``; ``constants`` are tensors it reads but is constant in (derivative zero)."""

    def __call__(self, v: torch.Tensor, *constants: torch.Tensor) -> torch.Tensor: ...

    @property
    def transpose(self) -> LinearMap:
        """The adjoint map, reading the same ``constants``."""
        ...


def apply_linear(op: LinearMap, v: torch.Tensor, *constants: torch.Tensor) -> torch.Tensor:
    """``op(v, *constants)``, differentiable to every order in ``v`` (see the module docstring).

    ``op`` must act on the trailing axes only: under ``torch.func.vmap`` it is called once,
    with the vmapped axis leading every tensor.
    """
    return apply(_Linear, op, v, *constants)


def apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``function.apply(*args)`` for a ``Function`` in the ``setup_context`` form that ``torch.func`` needs.

    Outside ``torch.func`` transforms it runs the same ``Function`` in the combined form
    (``forward(ctx, ...)``): ``Function.apply`` binds the arguments of the other form with
    ``inspect.signature`` on every call, which costs about 0.1 ms once a pass over a large
    tensor has flushed the caches, a few percent of a blur.
    """
    if functorch_transforms_active():  # what Function.apply itself asks
        return function.apply(*args)
    return _combined_form(function).apply(*args)


@cache
def _combined_form(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    def forward(ctx: Any, *args: Any) -> Any:
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return output

    methods = {"forward": forward, "backward": function.backward, "jvp": function.jvp}
    return type(function.__name__, (torch.autograd.Function,), {k: staticmethod(m) for k, m in methods.items()})


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(op: LinearMap, v: torch.Tensor, *constants: torch.Tensor) -> torch.Tensor:
        return op(v, *constants)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        op, _, *constants = inputs
        ctx.op = op
        ctx.save_for_backward(*constants)
        ctx.save_for_forward(*constants)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        constants = ctx.saved_tensors
        grad_v = apply_linear(ctx.op.transpose, grad, *constants) if ctx.needs_input_grad[1] else None
        return None, grad_v, *(None for _ in constants)

    @staticmethod
    def jvp(ctx: Any, _: None, tangent: torch.Tensor | None, *__: torch.Tensor | None) -> torch.Tensor | None:
        return None if tangent is None else apply_linear(ctx.op, tangent, *ctx.saved_tensors)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, op: LinearMap, *tensors: torch.Tensor) -> tuple[torch.Tensor, int]:
        return apply_linear(op, *_batch_first(info.batch_size, in_dims[1:], tensors)), 0


def _batch_first(size: int, in_dims: tuple, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """For a ``vmap`` rule: each tensor with its vmapped axis first, or expanded to one (as a view).

    Example:
        >>> [t.shape for t in _batch_first(5, (1, None), (torch.ones(2, 5), torch.ones(3)))]
        [torch.Size([5, 2]), torch.Size([5, 3])]
    """
    pairs = zip(tensors, in_dims, strict=True)
    return [t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0) for t, dim in pairs]
