"""Lazy modules: the result works on every call, the original stays lazy, a lazy strided conv gets a true reason."""

from __future__ import annotations

import pytest
import torch
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
