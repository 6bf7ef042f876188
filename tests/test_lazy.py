"""Lazy and meta-initialised models: the result works on every call, the original stays as it was."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxblur


def test_a_lazy_linear_materialises_in_the_result_only():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, 2), nn.Flatten(), nn.LazyLinear(4))
    gm = fxblur.transform(model, verbose=False)
    x = torch.randn(2, 3, 16, 16)
    assert gm(x).shape == gm(x).shape == (2, 4)  # twice: the copy's own hook, removed from its own table
    assert model[4].has_uninitialized_params() and model[4]._forward_pre_hooks  # the original is still lazy
    assert model(x).shape == (2, 4)


def test_a_lazy_strided_conv_is_skipped_with_a_true_reason_or_rewritten():
    model = nn.Sequential(nn.LazyConv2d(16, 3, stride=2), nn.ReLU(), nn.LazyConv2d(8, 3, stride=2))
    with pytest.warns(fxblur.NoEffectWarning):
        gm = fxblur.transform(model, verbose=False)
    reasons = {change.reason for change in fxblur.changes(gm)}
    assert reasons == {"in_channels not known before the lazy conv's first call (min_channels 16): run one first"}
    x = torch.randn(2, 3, 16, 16)
    for options in ({"min_channels": 0}, {"min_channels": 0, "blur_first": False}):
        gm = fxblur.transform(model, verbose=False, **options)
        assert {change.action for change in fxblur.changes(gm)} != {"skipped"}
        assert gm(x).shape == gm(x).shape == (2, 8, 3, 3)
    assert model[0].has_uninitialized_params()
    assert model(x).shape == (2, 8, 3, 3)


@pytest.mark.parametrize("options", [{}, {"preset": "zhang2019"}, {"polyphase": True}])
def test_a_model_built_on_meta_then_materialised_and_loaded_blurs_correctly(options):
    real = torchvision.models.resnet18().eval()
    with torch.device("meta"):
        on_meta = torchvision.models.resnet18()
    gm = fxblur.transform(on_meta, verbose=False, **options)
    gm.to_empty(device="cpu")  # the large-model recipe: no manual reset of the blur filters
    gm.load_state_dict(real.state_dict())
    gm.eval()
    expected = fxblur.transform(real, verbose=False, **options)
    x = torch.randn(2, 3, 64, 64)
    for memory_format in (torch.contiguous_format, torch.channels_last):  # channels-last reads the filter buffers
        torch.testing.assert_close(gm(x.to(memory_format=memory_format)), expected(x), rtol=1e-4, atol=1e-5)
