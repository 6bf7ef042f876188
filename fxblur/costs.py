"""What a node costs: multiply-adds and output bytes, from shapes recorded on the graph.

Shapes come from ``propagate_shapes``, which runs the graph on fake tensors (no real
compute, no memory): every node then carries its output in ``node.meta["val"]``.

Counted as MACs: convolutions, linear layers, matrix products, attention and blurs (a blur
counts its separable form: ``k`` MACs per output of each axis it filters). Elementwise ops,
norms and pools count as zero. A blurred op module (``fxblur.ops.blurred``) counts its op,
as it now runs, and its blur; ``blurred_op_extra`` tells what that adds to the op alone. A
module with layers inside that the graph calls whole (a leaf: ``leaf_modules``, timm's
untraceable blocks) counts the same ops as it runs on fake inputs (``FlopCounterMode``).

Example:
    >>> gm = fxblur.transform(torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, stride=2)), verbose=False)
    >>> propagate_shapes(gm, torch.empty(1, 16, 8, 8))
    >>> {node.name: node_macs(node, gm) for node in gm.graph.nodes if node.op == "call_module"}
    {'_0': 47616}
    >>> blurred_op_extra(next(n for n in gm.graph.nodes if n.op == "call_module"), gm)  # the blur before it
    (6144, 4096)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils.flop_counter import FlopCounterMode

from fxblur._compat import fake_tensor_mode, quiet_fake_tensor_logs
from fxblur.ops.blur_module import Blur
from fxblur.ops.blurred import BlurredOp


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Record every node's output as a fake tensor in ``node.meta["val"]``.

    ``example`` only lends its shape, dtype and device; nothing is computed. An input the
    model cannot take raises the op's own error (torch's logging of it is silenced).
    """
    mode = fake_tensor_mode()
    with quiet_fake_tensor_logs():
        FakeTensorProp(gm, mode).propagate(mode.from_tensor(example))


def output_of(node: fx.Node) -> torch.Tensor | None:
    """The node's (fake) output tensor; the first of a tuple (attention returns two)."""
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


def node_bytes(node: fx.Node) -> int:
    value = output_of(node)
    return 0 if value is None else value.numel() * value.element_size()


def node_macs(node: fx.Node, gm: fx.GraphModule) -> int:
    """Multiply-adds the node performs for one forward pass."""
    out = output_of(node)
    if out is None:
        return 0
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        count = next((count for cls, count in _MODULE_MACS.items() if isinstance(module, cls)), None)
        if count is None and next(module.children(), None) is not None:
            count = _called_whole
        return 0 if count is None else count(module, node, out)
    if node.op == "call_function" and node.target in _FUNCTION_MACS:
        return _FUNCTION_MACS[node.target](node, out)
    return 0


def blur_macs(input_shape: Sequence[int], filter_size: Sequence[int], stride: Sequence[int]) -> int:
    """MACs of a separable blur: one pass per filtered axis, each subsampling its axis."""
    shape = list(input_shape)
    first_spatial = len(shape) - len(filter_size)
    macs = 0
    for axis, (taps, step) in enumerate(zip(filter_size, stride, strict=True), start=first_spatial):
        shape[axis] = (shape[axis] - 1) // step + 1
        if taps > 1:
            macs += math.prod(shape) * taps
    return macs


def blurred_op_extra(node: fx.Node, gm: fx.GraphModule) -> tuple[int, int]:
    """(MACs, activation bytes) that a blurred op module's call adds to the op it stands for.

    Its blur counts in full; an op that now runs at stride 1 counts by how much it grew over
    the output it stands for (the blurred op's own output, which has the original size).
    """
    module, x, out = gm.get_submodule(node.target), _argument(node, 0, "input"), output_of(node)
    if x is None or out is None:
        return 0, 0
    op_output, blur_input, blur_output = _blurred_op_stages(module, x)
    per_output = _op_macs(module, op_output) / op_output.numel()
    extra_macs = blur_macs(blur_input.shape, module.fxblur.filter_size, module.fxblur.stride)
    extra_macs += round((op_output.numel() - out.numel()) * per_output)
    kept = blur_output if module.blur_input else op_output  # the map the op alone would not make
    return extra_macs, kept.numel() * kept.element_size()


def _blurred_op_stages(module: BlurredOp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(op output, blur input, blur output) of a blurred op on the fake tensor ``x``."""
    with x.fake_mode:
        if module.blur_input:
            blurred = module.fxblur(x)
            return module.run_op(blurred), x, blurred
        op_output = module.run_op(x)
        return op_output, op_output, module.fxblur(op_output)


def _blurred_op(module: BlurredOp, node: fx.Node, out: torch.Tensor) -> int:
    x = _argument(node, 0, "input")
    if x is None:
        return 0
    op_output, blur_input, _ = _blurred_op_stages(module, x)
    return _op_macs(module, op_output) + blur_macs(blur_input.shape, module.fxblur.filter_size, module.fxblur.stride)


def _op_macs(module: nn.Module, out: torch.Tensor) -> int:
    """MACs of a conv (pools: none) that produced ``out``."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return 0
    return out.numel() * module.in_channels * math.prod(module.kernel_size) // module.groups


def _argument(node: fx.Node, index: int, name: str) -> torch.Tensor | None:
    """The (fake) tensor passed as argument ``index`` or keyword ``name``."""
    value = node.args[index] if index < len(node.args) else node.kwargs.get(name)
    return output_of(value) if isinstance(value, fx.Node) else None


def _conv(module: nn.Module, node: fx.Node, out: torch.Tensor) -> int:
    if module.transposed:  # every input sample is spread over kernel x out_channels outputs
        x = _argument(node, 0, "input")
        per_output = math.prod(module.kernel_size) // module.groups
        return 0 if x is None else x.numel() * module.out_channels * per_output
    return _op_macs(module, out)


def _linear(module: nn.Module, node: fx.Node, out: torch.Tensor) -> int:
    return out.numel() * module.in_features


def _blur(module: Blur, node: fx.Node, out: torch.Tensor) -> int:
    x = _argument(node, 0, "input")
    return 0 if x is None else blur_macs(x.shape, module.filter_size, module.stride)


def _attention_module(module: nn.MultiheadAttention, node: fx.Node, out: torch.Tensor) -> int:
    query = _argument(node, 0, "query")
    key = _argument(node, 1, "key")
    if query is None or key is None or query.dim() != 3:
        return 0
    batch_axis = 0 if module.batch_first else 1
    batch, embed = query.shape[batch_axis], module.embed_dim
    targets, sources = query.shape[1 - batch_axis], key.shape[1 - batch_axis]
    projections = batch * (2 * targets + 2 * sources) * embed * embed  # q, out; k, v
    attention = 2 * batch * targets * sources * embed  # q @ k^T, weights @ v
    return projections + attention


def _functional_conv(node: fx.Node, out: torch.Tensor) -> int:
    weight = _argument(node, 1, "weight")
    return 0 if weight is None else out.numel() * math.prod(weight.shape[1:])


def _functional_linear(node: fx.Node, out: torch.Tensor) -> int:
    weight = _argument(node, 1, "weight")
    return 0 if weight is None else out.numel() * weight.shape[-1]


def _matmul(node: fx.Node, out: torch.Tensor) -> int:
    left = _argument(node, 0, "input")
    return 0 if left is None else out.numel() * left.shape[-1]


def _addmm(node: fx.Node, out: torch.Tensor) -> int:
    left = _argument(node, 1, "mat1")
    return 0 if left is None else out.numel() * left.shape[-1]


def _scaled_dot_product_attention(node: fx.Node, out: torch.Tensor) -> int:
    query, key = _argument(node, 0, "query"), _argument(node, 1, "key")
    if query is None or key is None:
        return 0
    sources = key.shape[-2]
    return query.numel() * sources + out.numel() * sources  # q @ k^T, weights @ v


def _called_whole(module: nn.Module, node: fx.Node, out: torch.Tensor) -> int:
    """A module with layers inside that the graph calls whole (a leaf): what it multiplies, run on fake inputs."""
    mode = getattr(out, "fake_mode", None)
    if mode is None:
        return 0

    def fake(value: Any) -> Any:
        return value.meta.get("val") if isinstance(value, fx.Node) else value

    args, kwargs = fx.node.map_aggregate(node.args, fake), fx.node.map_aggregate(node.kwargs, fake)
    with mode, FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops() // 2  # a multiply-add is two flops


_MODULE_MACS: dict[type, Callable[[nn.Module, fx.Node, torch.Tensor], int]] = {
    BlurredOp: _blurred_op,  # before the conv and pool classes it derives from
    nn.modules.conv._ConvNd: _conv,
    nn.Linear: _linear,
    Blur: _blur,
    nn.MultiheadAttention: _attention_module,
}

_FUNCTION_MACS: dict[Callable, Callable[[fx.Node, torch.Tensor], int]] = {
    F.conv1d: _functional_conv,
    F.conv2d: _functional_conv,
    F.conv3d: _functional_conv,
    F.linear: _functional_linear,
    torch.matmul: _matmul,
    operator.matmul: _matmul,
    torch.bmm: _matmul,
    torch.mm: _matmul,
    torch.addmm: _addmm,
    torch.baddbmm: _addmm,
    F.scaled_dot_product_attention: _scaled_dot_product_attention,
}
