"""When fxblur's plain-PyTorch fast paths may run: eager CPU code on float32/float64 tensors.

The fast paths (``fxblur.ops.separable``, ``fxblur.ops.max_pool``) are sequences of elementwise ops
on views, wrapped in ``torch.autograd.Function``. They pay off where PyTorch's own kernels
are slow, on CPU; where a compiler sees the op (``torch.compile``, TorchScript,
``torch.jit.trace``, export), the op itself is easier for it to optimise and translate.

Example:
    >>> runs_eagerly_on_cpu(torch.ones(2, 2)), runs_eagerly_on_cpu(torch.ones(2, 2, dtype=torch.half))
    (True, False)
"""

from __future__ import annotations

import torch


def runs_eagerly_on_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a float32/float64 CPU tensor outside any compiler or tracer."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )
