"""What keeps a polyphase or circularly padded rewrite from exact shift invariance, besides padding.

Ops that subsample at a fixed phase (skipped, excluded, or blurred without polyphase
sampling), groups whose ops choose their phases apart, padding left zero, and pools that
do not reduce each channel to one value.

Example:
    >>> from fxblur.options import BlurOptions
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(2)))
    >>> [(o.target, str(o.kind)) for o in obstacles(BlurOptions(polyphase=True), [], [], [gm])]
    [('(padding)', 'not_circular'), ('1', 'local_head')]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from fxblur.options import BlurOptions
from fxblur.record import Action, Change, Obstacle, ObstacleKind, PhaseGroupRecord

_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d)


def obstacles(
    options: BlurOptions,
    decisions: Iterable[Change],
    groups: Iterable[PhaseGroupRecord],
    graph_modules: Iterable[fx.GraphModule],
) -> list[Obstacle]:
    """The obstacles of a rewrite with ``options``, given its decisions, phase groups and graphs."""
    found = []
    for change in decisions:
        if change.action is Action.SKIPPED or (options.polyphase and not change.action.polyphase):
            why = f"subsamples at a fixed phase ({change.reason or change.action})"
            found.append(Obstacle(change.target, ObstacleKind.FIXED_PHASE, why))
    for group in groups:
        if group.problem:
            why = f"phase group {group.name}: {group.problem}, so its ops choose their phases apart"
            found += [Obstacle(target, ObstacleKind.PHASE_NOT_SHARED, why) for target in group.members]
    if options.polyphase and not options.circular_padding:
        why = "convs, pools and blurs pad with zeros or by reflection: pass circular_padding=True"
        found.append(Obstacle("(padding)", ObstacleKind.NOT_CIRCULAR, why))
    for gm in graph_modules:
        for node in gm.graph.nodes:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, _ADAPTIVE_POOLS) and _not_global(module.output_size):
                why = f"pools to {module.output_size}, not to one value per channel"
                found.append(Obstacle(node.target, ObstacleKind.LOCAL_HEAD, why))
    return found


def _not_global(output_size: Any) -> bool:
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
    return any(size not in (1, None) for size in sizes)
