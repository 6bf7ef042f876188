"""Per-channel ops that subsampling commutes with: how far a blur may move past a conv.

Subsampling commutes with any op that treats every spatial position alike and on its own:
BatchNorm, activations, dropout, affine ops with a scalar or per-channel constant, and the
known modules fusing a batch or channel norm with an activation (timm's ``BatchNormAct2d``). The
paper puts its blur after such ops (Conv -> BatchNorm -> ReLU -> BlurPool), which module
surgery cannot find in general; in a graph it is a walk along single-user edges.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, 2), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> gm = fx.symbolic_trace(net)
    >>> conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    >>> [n.target for n in pointwise_chain(conv, gm)]
    ['1', '2']
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxblur._compat import BATCH_NORM_BASE
from fxblur.known_layers import norm_act

MODULES = (
    BATCH_NORM_BASE,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip

FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.elu, F.selu, F.celu, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip

METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "sub", "mul", "div", "add_", "mul_"}


def pointwise_chain(start: fx.Node, gm: fx.GraphModule, spatial_dims: int = 2) -> list[fx.Node]:
    """The per-channel ops that follow ``start`` without a branch, in order.

    The walk stops at the first node that has several users, is used by anything but a
    per-channel op, or feeds an op that also reads another spatially varying tensor.
    """
    chain: list[fx.Node] = []
    node = start
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not per_channel_op_on(user, node, gm, spatial_dims):
            break
        chain.append(user)
        node = user
    return chain


def per_channel_op_on(user: fx.Node, node: fx.Node, gm: fx.GraphModule, spatial_dims: int) -> bool:
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        per_channel = (
            isinstance(module, MODULES) and type(module).forward.__module__.startswith("torch.nn.")
        ) or norm_act(module) in ("batch", "channels")  # not a subclass's own forward; a known norm-act
        return per_channel and len(user.args) == 1 and not user.kwargs
    function = user.op == "call_function" and user.target in FUNCTIONS
    if function or (user.op == "call_method" and user.target in METHODS):
        others = [*user.args[1:], *user.kwargs.values()]
        return all(_constant_per_channel(value, gm, spatial_dims) for value in others)
    return False


def _constant_per_channel(value: object, gm: fx.GraphModule, spatial_dims: int) -> bool:
    """A Python value, or a model tensor that is constant over the spatial axes (a per-channel scale)."""
    if not isinstance(value, fx.Node):
        return not isinstance(value, (list, tuple)) or all(_constant_per_channel(v, gm, spatial_dims) for v in value)
    if value.op != "get_attr":
        return False
    owner, _, name = value.target.rpartition(".")
    tensor = getattr(gm.get_submodule(owner), name)
    return isinstance(tensor, torch.Tensor) and all(size == 1 for size in tensor.shape[-spatial_dims:])
