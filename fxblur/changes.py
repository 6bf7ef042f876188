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

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

ACTIONS = ("blur_before", "subsample_before", "blur_after", "blur_past_nonlinearity", "skipped")

_META_KEY = "fxblur.changes"


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

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def record(gm: fx.GraphModule, change: Change) -> None:
    """Append ``change`` to the decisions stored on ``gm``."""
    gm.meta.setdefault(_META_KEY, []).append(change)


def recorded(gm: fx.GraphModule) -> list[Change]:
    """The decisions stored on ``gm`` (empty if none were recorded)."""
    return list(getattr(gm, "meta", {}).get(_META_KEY, []))


def store(gm: fx.GraphModule, changes: list[Change]) -> None:
    """Replace the decisions stored on ``gm``."""
    gm.meta[_META_KEY] = list(changes)


def changes(gm: fx.GraphModule) -> list[Change]:
    """The decisions ``fxblur.transform`` made for ``gm``, in graph order.

    Raises:
        ValueError: ``gm`` was not returned by ``fxblur.transform``.
    """
    if not isinstance(gm, fx.GraphModule) or _META_KEY not in gm.meta:
        raise ValueError(
            f"{type(gm).__name__} was not returned by fxblur.transform; "
            "call fxblur.transform(model) and pass its result"
        )
    return recorded(gm)
