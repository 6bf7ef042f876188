"""Record the anti-aliasing layers a model has already: they subsample, and fxblur leaves them as they are.

timm's ``BlurPool2d``, antialiased-cnns' ``BlurPool``, kornia's ``BlurPool2D`` and
``MaxBlurPool2D`` and Composer's blur layers (``fxblur.known_layers``) are called
whole by the tracer, never blurred again. This pass records each call of one that
subsamples, skipped with what it is, so that the report says what the model has; an op
such a layer feeds at stride 1 is skipped by the blur passes as already blurred.

Example:
    >>> from torch.fx.passes.infra.pass_manager import PassManager
    >>> from fxblur.record import logged
    >>> from fxblur.trace import trace
    >>> class BlurPool2d(torch.nn.Module):  # stands in for timm's class, matched by its name
    ...     stride = 2
    ...     def forward(self, x):
    ...         return x[..., ::2, ::2]
    >>> BlurPool2d.__module__ = "timm.layers.blur_pool"
    >>> model = torch.nn.Sequential(BlurPool2d())
    >>> gm = fx.GraphModule(model, trace(model).graph)
    >>> _ = PassManager([RecordAntiAliasing()])(gm)
    >>> [(c.target, c.reason) for c in logged(gm, "decisions")]
    [('0', 'already anti-aliased: timm BlurPool2d')]
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxblur.known_layers import anti_aliasing
from fxblur.record import Action, Change, log_decision


class RecordAntiAliasing(PassBase):
    """Record every call of a known anti-aliasing layer that subsamples (see the module docstring)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        for node in graph_module.graph.nodes:
            if node.op != "call_module":
                continue
            layer = graph_module.get_submodule(node.target)
            label = anti_aliasing(layer)
            stride = _per_axis(getattr(layer, "stride", 1))
            if label is not None and any(s > 1 for s in stride):
                log_decision(graph_module, _record(node, label, stride))
        return PassResult(graph_module, False)


def _record(node: fx.Node, label: str, stride: tuple[int, ...]) -> Change:
    source = node.args[0] if node.args else node
    return Change(
        target=node.target,
        op=label.split()[-1],
        action=Action.SKIPPED,
        reason=f"already anti-aliased: {label}",
        kernel_size=None,
        stride=stride,
        in_channels=None,
        out_channels=None,
        blur=None,
        node=node.name,
        input_node=source.name if isinstance(source, fx.Node) else node.name,
        output_node=node.name,
    )


def _per_axis(stride: int | tuple[int, ...] | list[int] | None) -> tuple[int, ...]:
    if isinstance(stride, (tuple, list)):
        return tuple(stride)
    return (stride or 1,) * 2
