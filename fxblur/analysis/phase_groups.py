"""Phase groups: the downsampling ops that must subsample at one polyphase phase.

Adaptive polyphase sampling picks, per sample, the phase at which each strided op
subsamples. Ops whose results are combined must pick the same one, or their outputs are
misaligned and invariance is lost: a ResNet block's strided conv and its strided 1x1
shortcut (added), the strided branches of an Inception or ShuffleNet reduction block
(concatenated). Two ops are in one group when

- their inputs derive from one tensor through stride-1 ops that treat every position
  alike (convs and pools of stride 1, norms, norms with an activation, activations,
  per-channel affine ops, and the pieces of a split along channels): they read the same
  signal, shifted alike; or
- their outputs, through such ops, meet at a node that combines tensors (an add, a
  ``cat``, a product of two maps), on any of the branches they fan out to.

A group's *source* is the latest tensor every member's input derives from that way (the
block's input, in a ResNet); the cheap form of polyphase sampling computes the group's
phase there, once. A group whose members meet but share no source, or subsample by
different strides, cannot be made consistent in that form: ``PhaseGroup.problem`` says why
(a ``GroupProblem``).

Example:
    >>> gm = fx.symbolic_trace(torchvision.models.resnet18())
    >>> ops = [op for node in gm.graph.nodes if (op := read_window_op(node, gm)) and op.downsamples]
    >>> [[op.target for op in group.members] for group in phase_groups(ops, gm)][1:3]  # the stem conv is one
    [['maxpool'], ['layer2.0.conv1', 'layer2.0.downsample.0']]
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from fxblur._compat import BATCH_NORM_BASE
from fxblur.analysis.pointwise import MODULES as POINTWISE_MODULES
from fxblur.analysis.pointwise import per_channel_op_on
from fxblur.analysis.window_ops import WindowOp, read_window_op
from fxblur.known_layers import norm_act
from fxblur.ops.blur_module import Blur

_NORMS = (BATCH_NORM_BASE, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class GroupProblem(str, enum.Enum):
    """Why a group's ops cannot share one phase chosen at a common source."""

    DIFFERENT_STRIDES = "its ops subsample by different strides"
    NO_COMMON_SOURCE = "its outputs meet, but its inputs derive from no common tensor"

    def __str__(self) -> str:
        return self.value


@dataclass
class PhaseGroup:
    """Downsampling ops that subsample at one phase (see the module docstring).

    Attributes:
        name: the target of its first member, which names it in reports.
        members: its ops, in graph order.
        source: the tensor all members' inputs derive from through stride-1 ops, if any.
        problem: why the group cannot share one phase computed at a source (``None`` if it can).
    """

    name: str
    members: list[WindowOp]
    source: fx.Node | None = None
    problem: GroupProblem | None = None


def phase_groups(ops: list[WindowOp], gm: fx.GraphModule) -> list[PhaseGroup]:
    """Group ``ops`` (the downsampling ops of ``gm`` that will subsample by polyphase sampling)."""
    parent = list(range(len(ops)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    back = [_back_path(op.input, gm) for op in ops]
    reached: dict[fx.Node, int] = {}
    meets: dict[fx.Node, int] = {}
    for i, op in enumerate(ops):
        for node in back[i]:  # same signal in
            if node in reached:
                parent[find(i)] = find(reached[node])
            reached.setdefault(node, i)
        for combining in _combining_users(op.node, gm):  # outputs that meet
            if combining in meets:
                parent[find(i)] = find(meets[combining])
            meets.setdefault(combining, i)
    groups: dict[int, list[int]] = {}
    for i in range(len(ops)):
        groups.setdefault(find(i), []).append(i)
    return [_group([ops[i] for i in members], [back[i] for i in members]) for members in groups.values()]


def _group(members: list[WindowOp], paths: list[list[fx.Node]]) -> PhaseGroup:
    group = PhaseGroup(members[0].target, members)
    common = set(paths[0]).intersection(*paths[1:])
    group.source = next((node for node in paths[0] if node in common), None)  # the first on the way back
    if len({op.stride for op in members}) > 1:
        group.problem = GroupProblem.DIFFERENT_STRIDES
    elif group.source is None:
        group.problem = GroupProblem.NO_COMMON_SOURCE
    return group


def _back_path(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """``node`` and the tensors it derives from through single-input, stride-1, position-blind ops."""
    path = [node]
    while (previous := _equivariant_input(path[-1], gm)) is not None:
        path.append(previous)
    return path


def _combining_users(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """The first nodes after ``node``, along every branch of stride-1 ops, that read it with other maps."""
    found, frontier, seen = [], [node], {node}
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if _equivariant_input(user, gm) is current:
                frontier.append(user)
            elif _reads_several_maps(user):
                found.append(user)
    return found


def _equivariant_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The one map ``node`` computes from, if it is a stride-1 op that treats every position alike."""
    if node.op not in ("call_module", "call_function", "call_method") or not node.args:
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node):
        return None
    op = read_window_op(node, gm)
    if op is not None:
        return None if op.downsamples else source
    if node.op == "call_function" and node.target is operator.getitem:
        return _split_source(node)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        stride_one_blur = isinstance(module, Blur) and all(s == 1 for s in module.stride)
        per_channel = isinstance(module, (*_NORMS, *POINTWISE_MODULES)) or norm_act(module) is not None
        if stride_one_blur or (per_channel and len(node.args) == 1):
            return source
        return None
    return source if per_channel_op_on(node, source, gm, spatial_dims=2) else None


def _split_source(node: fx.Node) -> fx.Node | None:
    """For a piece of a channel split (``split``/``chunk`` along dim 1, then an index), or a slice of channels
    (``x[:, a:b]``): the map it is taken from, whose positions it keeps."""
    source, index = node.args
    if not isinstance(source, fx.Node):
        return None
    if isinstance(index, int) and _splits_channels(source):
        return source.args[0] if isinstance(source.args[0], fx.Node) else None
    entries = index if isinstance(index, tuple) else (index,)
    channel_slice = len(entries) == 2 and entries[0] == slice(None) and isinstance(entries[1], slice)
    return source if channel_slice and (entries[1].step in (None, 1)) else None


def _splits_channels(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name not in ("split", "chunk", "tensor_split"):
        return False
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    return dim == 1


def _reads_several_maps(node: fx.Node) -> bool:
    read: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), read.append)
    return len({arg for arg in read if arg.op != "get_attr"}) > 1
