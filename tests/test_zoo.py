"""Every torchvision classification, segmentation and video model torch.fx can trace.

Models are built on the meta device: transform and forward run on shapes alone, so the
whole zoo takes a couple of minutes. Every norm and activation module must produce the
shape it produced in the original, at an even and an odd input size. Each model and its
original shapes are built once for all placements (its tests share an xdist group, so they
run in one worker).
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter

import pytest
import torch
import torchvision.models as tvm

import fxblur
from fxblur.ops.folded import FoldedLayer
from fxblur.record import record_of
from support import IMAGE_ZOO, VIDEO_ZOO, input_sizes, layer_shapes, meta_model

# Transformers whose only strided op is a patchify stem on 3 channels (< min_channels).
NOTHING_TO_BLUR = {name for name in IMAGE_ZOO + VIDEO_ZOO if name.startswith(("vit_", "swin_", "swin3d_"))}


PLACEMENTS = {
    "blur_first": {},
    "blur_after": {"blur_first": False},
    "past_nonlinearity": {"past_nonlinearity": True, "pool_blur_first": False, "replace_avgpools": True},
    "polyphase": {"polyphase": True, "circular_padding": True},
}
# DeepLab's and LR-ASPP's dilated convs pad by more than their maps are wide at these sizes:
# PyTorch's circular padding cannot wrap around more than once.
NO_CIRCULAR_PADDING = set(tvm.list_models(module=tvm.segmentation))


@functools.cache
def original(name: str) -> tuple[torch.nn.Module, dict[tuple[int, ...], dict]]:
    """The meta model and its per-layer output shapes at each input size, built once per worker."""
    model = meta_model(name)
    return model, {size: layer_shapes(model, torch.empty(size, device="meta")) for size in input_sizes(name)}


MODELS = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in IMAGE_ZOO + VIDEO_ZOO]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_feature_map_keeps_its_shape(name, placement):
    model, original_shapes = original(name)
    options = dict(PLACEMENTS[placement])
    if name in NO_CIRCULAR_PADDING:
        options.pop("circular_padding", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxblur.NoEffectWarning)
        gm = fxblur.transform(model, verbose=False, **options)
    blurred = [c for c in fxblur.changes(gm) if c.action != "skipped"]
    assert bool(blurred) == (name not in NOTHING_TO_BLUR or placement == "polyphase")  # there min_channels is 0
    if placement == "blur_first":
        assert {c.action for c in blurred} <= {"blur_before", "subsample_before"}
    enlarged = enlarged_calls(gm)
    for size, expected in original_shapes.items():
        got = layer_shapes(gm, torch.empty(size, device="meta"))
        assert expected, "the hooks must observe some layers"
        assert got.keys() == expected.keys()
        for path, shapes in expected.items():
            for call, shape in enumerate(shapes):
                if (path, call) in enlarged:  # runs at full resolution, before the blur subsamples
                    assert got[path][call][:2] == shape[:2] and got[path][call][2:] > shape[2:], (size, path)
                else:
                    assert got[path][call] == shape, (size, path, call)


def enlarged_calls(gm) -> set[tuple[str, int]]:
    """(module path, call number) of the module calls a rewrite moved to full resolution.

    A layer that a blur was folded into (``fxblur.assemble.fold``) subsamples its output itself.
    """
    calls, seen = {}, Counter()
    for node in record_of(gm).flat_graphs[0 if gm.training else 1].graph.nodes:  # no GraphModule built
        if node.op == "call_module":
            calls[node.name] = (node.target, seen[node.target])
            seen[node.target] += 1
    enlarged = {calls[n] for c in fxblur.changes(gm) for n in c.enlarged_nodes[1:] if n in calls}  # [0] is the op
    return {(path, call) for path, call in enlarged if "after" not in _folded_chains(gm, path)}


def _folded_chains(gm, path: str) -> set[str]:
    module = gm.get_submodule(path)
    return set(module.fxblur) if isinstance(module, FoldedLayer) else set()


def test_placements_reach_their_rewrites():
    actions = {}
    for placement, options in PLACEMENTS.items():
        gm = fxblur.transform(meta_model("densenet121"), verbose=False, **options)
        actions[placement] = {c.target: c.action for c in fxblur.changes(gm)}
    transition = "features.transition1.pool"  # AvgPool2d(2, 2), blurred only on request
    assert transition not in actions["blur_first"]
    assert actions["past_nonlinearity"][transition] == "blur_after"
    assert actions["past_nonlinearity"]["features.pool0"] == "blur_after"
    assert set(actions["blur_after"].values()) == {"skipped", "blur_after"}
    gm = fxblur.transform(meta_model("resnet50"), verbose=False, **PLACEMENTS["past_nonlinearity"])
    assert ("layer2.0.bn2", 0) in enlarged_calls(gm)
