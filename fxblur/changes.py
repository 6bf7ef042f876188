"""The decisions a rewrite made, one record per strided conv or pool it considered.

Passes record each decision as they make it (``record``); ``changes`` hands them back as
data, and the change report renders them without re-deriving anything.

Example:
    >>> import torchvision
    >>> gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
    >>> first = changes(gm)[0]
    >>> first.target, first.op, first.action, first.reason
    ('conv1', 'conv2d', 'skipped', 'in_channels 3 < min_channels 16')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

_META_KEY = "fxblur.changes"
_FLAT_KEY = "fxblur.flat"
_OBSTACLES_KEY = "fxblur.obstacles"
_ATTRIBUTE = "_fxblur_meta"


@dataclass(frozen=True)
class Change:
    """What happened to one strided conv or pool.

    Attributes:
        target: module path for a module call (``"layer2.0.conv2"``), node name for a
            functional call (``"max_pool2d_1"``).
        op: ``"conv2d"``, ``"max_pool2d"``, ...
        action: ``"blur_before"``, ``"subsample_before"``, ``"blur_after"``,
            ``"blur_past_nonlinearity"`` (see ``fxblur.passes.window_pass``) or ``"skipped"``.
        reason: why it was skipped; empty otherwise.
        kernel_size, stride: the op's geometry as it was before the rewrite.
        in_channels, out_channels: for convs whose weight is known, else ``None``.
        blur: path of the ``Blur`` module the rewrite inserted, if any.
        blurred_module: the op's module was replaced by a blurred version of itself that
            carries the blur (``fxblur.ops.blurred``): no graph around it changed.
        note: for an op blurred in another way than the options asked, why.
        phase_group: with polyphase sampling, the group of ops that share the op's phase,
            named by its first op's target (``fxblur.rewrite.phase_groups``).
        node: the op's node in the rewritten graph.
        input_node: the node that fed the op before the rewrite.
        output_node: the node whose output now stands for the op's original output.
        added_nodes: nodes the rewrite inserted (the blur, padding).
        enlarged_nodes: nodes that now compute at full resolution (an op run at stride 1,
            and the BatchNorm and activations past which the blur moved).

    Node names refer to the graph of the mode the model was in when it was transformed.
    """

    target: str
    op: str
    action: str
    reason: str
    kernel_size: tuple[int, ...] | None
    stride: tuple[int, ...]
    in_channels: int | None
    out_channels: int | None
    blur: str | None
    node: str
    input_node: str
    output_node: str
    added_nodes: tuple[str, ...] = ()
    enlarged_nodes: tuple[str, ...] = ()
    blurred_module: bool = False
    note: str = ""
    phase_group: str | None = None


def record(gm: fx.GraphModule, change: Change) -> None:
    """Append ``change`` to the decisions stored on ``gm``."""
    gm.meta.setdefault(_META_KEY, []).append(change)


def recorded(module: nn.Module) -> list[Change]:
    """The decisions stored on ``module`` (empty if none were recorded)."""
    return list(metadata(module).get(_META_KEY, []))


def store(module: nn.Module, changes: list[Change]) -> None:
    """Replace the decisions stored on ``module``: a GraphModule, or a model rewritten in parts."""
    metadata(module, create=True)[_META_KEY] = list(changes)


def store_flat_graphs(module: nn.Module, graphs: dict[bool, fx.Graph]) -> None:
    """Keep the flat rewritten graph of each mode, which the decisions' node names refer to.

    Each is kept as a GraphModule over ``module``'s modules (so it copies and pickles as
    code, like any GraphModule); the change report runs it on fake tensors.
    """
    carriers = {id(graph): fx.GraphModule(module, graph) for graph in graphs.values()}
    metadata(module, create=True)[_FLAT_KEY] = {mode: carriers[id(graph)] for mode, graph in graphs.items()}


def flat_graph_module(module: nn.Module) -> fx.GraphModule | None:
    """The flat rewritten graph of ``module``'s current mode, over its modules; ``None`` if there is none."""
    graphs = metadata(module).get(_FLAT_KEY)
    return None if graphs is None else graphs[module.training]


def store_obstacles(module: nn.Module, obstacles: dict[str, str]) -> None:
    """Keep what stops the rewritten model from being exactly shift-equivariant: target -> why."""
    metadata(module, create=True)[_OBSTACLES_KEY] = dict(obstacles)


def obstacles_of(module: nn.Module) -> dict[str, str] | None:
    """What stops exact equivariance (``None`` unless the rewrite asked for polyphase or circular padding)."""
    found = metadata(module).get(_OBSTACLES_KEY)
    return None if found is None else dict(found)


def changes(gm: nn.Module) -> list[Change]:
    """The decisions ``fxblur.transform`` made for ``gm``, in graph order.

    ``gm`` is what ``transform`` returned: a GraphModule, or, from ``strict=False`` on a
    model torch.fx cannot trace whole, the model with its traceable parts rewritten. The
    decisions of each part come in module order, their ``target`` and ``blur`` as full
    paths in the model (``"backbone.body.layer2.0.conv2"``); their node names are those
    of the part's own graph.

    Raises:
        ValueError: ``gm`` was not returned by ``fxblur.transform``.
    """
    if not isinstance(gm, nn.Module) or _META_KEY not in metadata(gm):
        raise ValueError(
            f"{type(gm).__name__} was not returned by fxblur.transform; "
            "call fxblur.transform(model) and pass its result"
        )
    return recorded(gm)


def metadata(module: nn.Module, create: bool = False) -> dict[str, Any]:
    """Where fxblur keeps what it recorded about ``module``.

    A GraphModule's ``meta``; for a model rewritten in parts (an ``nn.Module`` of the user's
    class), a plain attribute, which copies and pickles with the model and stays out of
    ``state_dict()``. Without ``create``, a module fxblur never touched reads as empty.
    """
    if isinstance(module, fx.GraphModule):
        return module.meta
    if create:
        return module.__dict__.setdefault(_ATTRIBUTE, {})
    return module.__dict__.get(_ATTRIBUTE, {})
