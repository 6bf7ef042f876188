"""Every torchvision classification, segmentation and video model torch.fx can trace.

Models are built on the meta device: transform and forward run on shapes alone, so the
whole zoo takes a couple of minutes. Every norm and activation module must produce the
shape it produced in the original, at an even and an odd input size.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxblur
from support import IMAGE_ZOO, VIDEO_ZOO, input_sizes, layer_shapes, meta_model

# Transformers whose only strided op is a patchify stem on 3 channels (< min_channels).
NOTHING_TO_BLUR = {name for name in IMAGE_ZOO + VIDEO_ZOO if name.startswith(("vit_", "swin_", "swin3d_"))}


@pytest.mark.parametrize("name", IMAGE_ZOO + VIDEO_ZOO)
@pytest.mark.parametrize("blur_first", [True, False], ids=["blur_first", "blur_after"])
def test_every_feature_map_keeps_its_shape(name, blur_first):
    model = meta_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxblur.NoEffectWarning)
        gm = fxblur.transform(model, blur_first=blur_first, verbose=False)
    decisions = fxblur.changes(gm)
    blurred = [c for c in decisions if c.action != "skipped"]
    if name in NOTHING_TO_BLUR:
        assert not blurred
    else:
        assert blurred and {c.action for c in blurred} == {"blur_before" if blur_first else "blur_after"}
    for size in input_sizes(name):
        x = torch.empty(size, device="meta")
        expected = layer_shapes(model, x)
        assert expected, "the hooks must observe some layers"
        assert layer_shapes(gm, x) == expected, size
