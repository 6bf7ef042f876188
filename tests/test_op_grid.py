"""Property tests over the grid of strided conv and pool configurations and placements.

For every configuration the original op accepts, the rewritten model must produce the same
output shape and dtype, keep the conv's padding_mode, and never fail on tiny maps. With a
1-tap filter every blur only subsamples, so the rewrite must then reproduce the original's
values exactly: a test of every index each placement computes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import fxblur
from fxblur.ops.padding import PADDING_MODES
from support import examples

pairs = st.tuples(st.integers(1, 3), st.integers(1, 3))
sizes = st.tuples(st.integers(1, 12), st.integers(1, 12))
filter_sizes = st.integers(1, 7)
PLACEMENTS = {
    "blur_first": {"blur_first": True},
    "blur_after": {"blur_first": False},
    "past_nonlinearity": {"past_nonlinearity": True, "pool_blur_first": False},
}
placements = st.sampled_from(sorted(PLACEMENTS))


class FunctionalConv(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x):
        stride, padding, dilation, groups = self.geometry
        return F.relu(F.conv2d(x, self.weight, self.bias, stride, padding, dilation, groups) * 2.0)


class FunctionalPool(nn.Module):
    def __init__(self, pool, **geometry):
        super().__init__()
        self.pool, self.geometry = pool, geometry

    def forward(self, x):
        return self.pool(x, **self.geometry)


def check_rewrite(model: nn.Module, x: torch.Tensor, placement: str, filter_size: int, padding_mode: str) -> None:
    model.eval()
    try:
        expected = model(x)
    except RuntimeError:
        assume(False)  # a configuration PyTorch itself rejects
    options = {**PLACEMENTS[placement], "min_channels": 0, "replace_avgpools": True, "verbose": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxblur.NoEffectWarning)  # ceil_mode average pools placed after
        gm = fxblur.transform(model, filter_size=filter_size, padding_mode=padding_mode, **options)
    assert all(c.action != "skipped" or "ceil_mode" in c.reason for c in fxblur.changes(gm))
    got = gm(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if x.dtype == torch.float64:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxblur.NoEffectWarning)
            identity = fxblur.transform(model, filter_size=1, **options)
        torch.testing.assert_close(identity(x), expected)


@examples(40)
@given(
    size=sizes, kernel=pairs, stride=pairs, padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=pairs, groups=st.sampled_from([1, 2]), bias=st.booleans(),
    variant=st.sampled_from(["conv", "conv_bn_relu", "functional"]), placement=placements,
    filter_size=filter_sizes, padding_mode=st.sampled_from(PADDING_MODES),
    conv_padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)  # fmt: skip
def test_strided_convs(size, kernel, stride, padding, dilation, groups, bias, variant, placement, filter_size,
                       padding_mode, conv_padding_mode, dtype):  # fmt: skip
    assume(max(stride) > 1)
    conv = nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups, bias, padding_mode=conv_padding_mode)
    if variant == "functional":
        assume(conv_padding_mode == "zeros")
        model = FunctionalConv(conv)
    elif variant == "conv_bn_relu":
        model = nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU())
        model[1].running_mean.uniform_(-1, 1)
    else:
        model = nn.Sequential(conv)
    model = model.to(dtype)
    check_rewrite(model, torch.randn(2, 4, *size, dtype=dtype), placement, filter_size, padding_mode)
    if variant != "functional":
        gm = fxblur.transform(model, min_channels=0, verbose=False, **PLACEMENTS[placement])
        rewritten = gm.get_submodule("0")
        assert rewritten.padding_mode == conv_padding_mode
        (change,) = fxblur.changes(gm)
        if placement == "blur_first":  # an unpadded 1x1 conv reads every stride-th sample: subsample for it
            pointwise = kernel == (1, 1) and padding == (0, 0)
            assert change.action == ("subsample_before" if pointwise else "blur_before")
        assert rewritten.stride == (stride if change.action == "blur_before" else (1, 1))


@examples(40)
@given(
    size=sizes, kernel=pairs, stride=pairs | st.none(), padding=st.tuples(st.integers(0, 1), st.integers(0, 1)),
    dilation=pairs, ceil_mode=st.booleans(), functional=st.booleans(), placement=placements,
    filter_size=filter_sizes, padding_mode=st.sampled_from(PADDING_MODES),
)  # fmt: skip
def test_strided_max_pools(size, kernel, stride, padding, dilation, ceil_mode, functional, placement, filter_size,
                           padding_mode):  # fmt: skip
    assume(max(stride or kernel) > 1)
    geometry = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    model = FunctionalPool(F.max_pool2d, **geometry) if functional else nn.Sequential(nn.MaxPool2d(**geometry))
    check_rewrite(model, torch.randn(2, 3, *size, dtype=torch.float64), placement, filter_size, padding_mode)


@examples(30)
@given(
    size=sizes, kernel=pairs, stride=pairs | st.none(), padding=st.tuples(st.integers(0, 1), st.integers(0, 1)),
    ceil_mode=st.booleans(), count_include_pad=st.booleans(), functional=st.booleans(), placement=placements,
    filter_size=filter_sizes, padding_mode=st.sampled_from(PADDING_MODES),
)  # fmt: skip
def test_strided_avg_pools(size, kernel, stride, padding, ceil_mode, count_include_pad, functional, placement,
                           filter_size, padding_mode):  # fmt: skip
    assume(max(stride or kernel) > 1)
    geometry = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode,
                    count_include_pad=count_include_pad)  # fmt: skip
    model = FunctionalPool(F.avg_pool2d, **geometry) if functional else nn.Sequential(nn.AvgPool2d(**geometry))
    check_rewrite(model, torch.randn(2, 3, *size, dtype=torch.float64), placement, filter_size, padding_mode)


@examples(30)
@given(
    dims=st.sampled_from([1, 3]), kind=st.sampled_from(["conv", "max_pool", "avg_pool"]),
    size=st.integers(1, 9), kernel=st.integers(1, 3), stride=st.integers(2, 3), padding=st.integers(0, 1),
    placement=placements, filter_size=filter_sizes,
)  # fmt: skip
def test_1d_and_3d_ops(dims, kind, size, kernel, stride, padding, placement, filter_size):
    if kind == "conv":
        op = getattr(nn, f"Conv{dims}d")(2, 3, kernel, stride, padding)
    else:
        op = getattr(nn, f"{'Max' if kind == 'max_pool' else 'Avg'}Pool{dims}d")(kernel, stride, padding)
    x = torch.randn(1, 2, *(size,) * dims, dtype=torch.float64)
    check_rewrite(nn.Sequential(op).double(), x, placement, filter_size, "reflect")


def test_stride_one_ops_are_left_alone():
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.MaxPool2d(3, 1), nn.MaxPool2d(1), nn.AvgPool2d(3, 1))
    with pytest.warns(fxblur.NoEffectWarning):
        gm = fxblur.transform(model, replace_avgpools=True, verbose=False)
    assert fxblur.changes(gm) == []
