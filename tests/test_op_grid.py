"""Property tests over the grid of strided conv and max pool configurations.

For every configuration the original op accepts, the rewritten op must produce the same
output shape and dtype, keep the conv's padding_mode, and never fail on tiny maps. With a
1-tap filter the blur is the identity, so the rewrite must then reproduce the original's
values exactly: a test of every index the rewrite computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fxblur
from fxblur.blur import PADDING_MODES

pairs = st.tuples(st.integers(1, 3), st.integers(1, 3))


class FunctionalConv(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x):
        stride, padding, dilation, groups = self.geometry
        return F.conv2d(x, self.weight, self.bias, stride, padding, dilation, groups)


class FunctionalMaxPool(nn.Module):
    def __init__(self, **geometry):
        super().__init__()
        self.geometry = geometry

    def forward(self, x):
        return F.max_pool2d(x, **self.geometry)


def check_rewrite(model: nn.Module, x: torch.Tensor, blur_first: bool, padding_mode: str, exact: bool) -> None:
    try:
        expected = model(x)
    except RuntimeError:
        assume(False)  # a configuration PyTorch itself rejects
    gm = fxblur.transform(model, blur_first=blur_first, padding_mode=padding_mode, min_channels=0, verbose=False)
    assert [c.action for c in fxblur.changes(gm)] == ["blur_before" if blur_first else "blur_after"]
    got = gm(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    identity = fxblur.transform(model, blur_first=blur_first, filter_size=1, min_channels=0, verbose=False)
    if exact:
        torch.testing.assert_close(identity(x), expected)


@settings(max_examples=150, deadline=None)
@given(
    size=pairs.map(lambda p: (p[0] * 3 - 2, p[1] * 4 - 3)) | st.tuples(st.integers(1, 12), st.integers(1, 12)),
    kernel=pairs,
    stride=pairs,
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=pairs,
    groups=st.sampled_from([1, 2]),
    functional=st.booleans(),
    blur_first=st.booleans(),
    padding_mode=st.sampled_from(PADDING_MODES),
    conv_padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_strided_convs(
    size, kernel, stride, padding, dilation, groups, functional, blur_first, padding_mode, conv_padding_mode, dtype
):
    assume(max(stride) > 1)
    conv = nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups, padding_mode=conv_padding_mode).to(dtype)
    model = FunctionalConv(conv) if functional and conv_padding_mode == "zeros" else nn.Sequential(conv)
    check_rewrite(model, torch.randn(2, 4, *size, dtype=dtype), blur_first, padding_mode, exact=dtype == torch.float64)
    if not functional:
        gm = fxblur.transform(model, blur_first=blur_first, min_channels=0, verbose=False)
        rewritten = gm.get_submodule("0")
        assert rewritten.padding_mode == conv_padding_mode
        assert rewritten.stride == (stride if blur_first else (1, 1))


@settings(max_examples=150, deadline=None)
@given(
    size=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    kernel=pairs,
    stride=pairs | st.none(),
    padding=st.tuples(st.integers(0, 1), st.integers(0, 1)),
    dilation=pairs,
    ceil_mode=st.booleans(),
    functional=st.booleans(),
    blur_first=st.booleans(),
    padding_mode=st.sampled_from(PADDING_MODES),
)
def test_strided_max_pools(size, kernel, stride, padding, dilation, ceil_mode, functional, blur_first, padding_mode):
    assume(max(stride or kernel) > 1)
    geometry = {
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "ceil_mode": ceil_mode,
    }
    model = FunctionalMaxPool(**geometry) if functional else nn.Sequential(nn.MaxPool2d(**geometry))
    check_rewrite(model, torch.randn(2, 3, *size, dtype=torch.float64), blur_first, padding_mode, exact=True)


def test_stride_one_ops_are_left_alone():
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.MaxPool2d(3, 1), nn.MaxPool2d(1))
    with pytest.warns(fxblur.NoEffectWarning):
        gm = fxblur.transform(model, verbose=False)
    assert fxblur.changes(gm) == []
