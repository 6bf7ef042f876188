"""Where each placement puts its blur, which filter it uses, and when it steps aside."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torchvision
from torch import nn

import fxblur
from fxblur.record import flat_graph_module


def decisions(gm) -> dict[str, fxblur.Change]:
    return {c.target: c for c in fxblur.changes(gm)}


def node_targets(gm, names) -> list:
    by_name = {n.name: n for n in flat_graph_module(gm).graph.nodes}
    return [by_name[name].target for name in names]


class ConvBlock(nn.Module):
    def __init__(self, branch: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.drop = nn.Dropout2d(0.1)
        self.scale = nn.Parameter(torch.rand(1, 16, 1, 1))
        self.branch = branch

    def forward(self, x):
        y = self.drop(self.act(self.bn(self.conv(x))) * self.scale * 2.0)
        if self.branch:
            return y + self.bn(self.conv(x)).mean()
        return torch.sigmoid(y).flatten(1)


def test_blur_moves_past_bn_activation_dropout_and_per_channel_affine_ops():
    gm = fxblur.transform(ConvBlock(), past_nonlinearity=True, verbose=False)
    change = decisions(gm)["conv"]
    assert change.action == "blur_past_nonlinearity"
    chain = node_targets(gm, change.enlarged_nodes)
    assert chain == ["conv", "bn", "act", operator.mul, operator.mul, "drop", torch.sigmoid]  # * scale, * 2.0
    x = torch.randn(2, 16, 9, 9)
    assert gm.eval()(x).shape == ConvBlock().eval()(x).shape


def test_the_walk_stops_where_the_output_meets_another_branch():
    gm = fxblur.transform(ConvBlock(branch=True), past_nonlinearity=True, verbose=False)
    # one conv module called twice: the first call's chain ends at the add that joins the
    # second call's branch; the second call's chain ends at the mean after its BatchNorm
    first, second = fxblur.changes(gm)
    assert (first.target, second.target) == ("conv", "conv")
    assert first.action == "blur_past_nonlinearity" and node_targets(gm, first.enlarged_nodes)[-1] == "drop"
    assert second.action == "blur_past_nonlinearity" and node_targets(gm, second.enlarged_nodes) == ["conv", "bn"]
    x = torch.randn(2, 16, 9, 9)
    assert gm.eval()(x).shape == ConvBlock(branch=True).eval()(x).shape


def test_a_spatially_varying_operand_stops_the_walk():
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
            self.position = nn.Parameter(torch.rand(1, 16, 4, 4))  # varies over H and W

        def forward(self, x):
            return torch.relu(self.conv(x) * self.position)

    gm = fxblur.transform(Positional(), past_nonlinearity=True, verbose=False)
    change = decisions(gm)["conv"]
    assert change.action == "blur_after" and change.blurred_module  # the conv carries the blur after it
    assert gm(torch.randn(1, 16, 8, 8)).shape == (1, 16, 4, 4)


def test_one_by_one_convs_subsample_first_only_when_that_is_exact():
    x = torch.randn(2, 16, 11, 10)
    for bias, padding_mode, expected in [
        (False, "zeros", "subsample_before"),
        (True, "reflect", "subsample_before"),
        (True, "zeros", "blur_after"),  # zero padding darkens the bias at the border
    ]:
        conv = nn.Conv2d(16, 8, 1, stride=2, bias=bias)
        gm = fxblur.transform(nn.Sequential(conv), blur_first=False, padding_mode=padding_mode, verbose=False)
        assert decisions(gm)["0"].action == expected
        # either way the result is the blurred, subsampled output of the conv at stride 1
        stride_one = nn.functional.conv2d(x, conv.weight, conv.bias)
        torch.testing.assert_close(gm(x), fxblur.blur(stride_one, 2, 3, padding_mode))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("padding_mode", ["reflect", "zeros"])
def test_one_by_one_convs_under_blur_first_read_a_subsampling_blur(bias, padding_mode):
    x = torch.randn(2, 16, 11, 10)
    conv = nn.Conv2d(16, 8, 1, stride=2, bias=bias)
    gm = fxblur.transform(nn.Sequential(conv), padding_mode=padding_mode, verbose=False)
    assert decisions(gm)["0"].action == "subsample_before" and gm.get_submodule("0").stride == (1, 1)
    # the strided conv of the stride-1 blur, whatever the bias or padding
    blurred = fxblur.blur(x, 1, 3, padding_mode)
    torch.testing.assert_close(gm(x), nn.functional.conv2d(blurred, conv.weight, conv.bias, stride=2))


def test_filters_follow_the_subsampled_axes_and_widen_with_the_stride():
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, stride=(2, 1), padding=1),
        nn.Conv2d(16, 16, 4, stride=4),  # a patchify conv: kernel == stride
        nn.Conv2d(16, 16, 16, stride=16),
    )
    gm = fxblur.transform(model, verbose=False)
    filters = [gm.get_submodule(c.blur).filter_size for c in fxblur.changes(gm)]
    assert filters == [(3, 1), (5, 5), (7, 7)]
    fixed = fxblur.transform(model, adaptive_filter=False, verbose=False)
    assert [fixed.get_submodule(c.blur).filter_size for c in fxblur.changes(fixed)] == [(3, 3)] * 3
    x = torch.randn(1, 16, 160, 160)
    assert gm(x).shape == model(x).shape == fixed(x).shape


def test_patchify_stems_are_left_to_min_channels_and_convnext_downsamplers_are_blurred():
    model = torchvision.models.convnext_tiny()
    gm = fxblur.transform(model, verbose=False)
    found = decisions(gm)
    assert found["features.0.0"].reason == "in_channels 3 < min_channels 16"  # the 4x4/4 stem
    assert all(found[f"features.{i}.1"].action == "blur_before" for i in (2, 4, 6))  # 2x2/2 downsamplers


def test_pool_placement_is_independent_of_conv_placement():
    model = torchvision.models.resnet18()
    gm = fxblur.transform(model, pool_blur_first=False, verbose=False)
    found = decisions(gm)
    assert found["maxpool"].action == "blur_after" and found["layer2.0.conv1"].action == "blur_before"
    gm = fxblur.transform(model, past_nonlinearity=True, verbose=False)
    found = decisions(gm)
    assert found["maxpool"].action == "blur_before" and found["layer2.0.conv1"].action == "blur_past_nonlinearity"


def test_average_pools_only_on_request():
    model = torchvision.models.densenet121()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = fxblur.transform(model, replace_convs=False, replace_maxpools=False, verbose=False)
    assert fxblur.changes(default) == []
    gm = fxblur.transform(model, replace_avgpools=True, pool_blur_first=False, verbose=False)
    pools = {t: c.action for t, c in decisions(gm).items() if "transition" in t}
    assert pools == dict.fromkeys([f"features.transition{i}.pool" for i in (1, 2, 3)], "blur_after")
    assert gm.get_submodule("features.transition1.pool").stride == (1, 1)


def test_ceil_mode_average_pools_are_skipped_when_placed_after():
    model = nn.Sequential(nn.AvgPool2d(3, 2, ceil_mode=True))
    with pytest.warns(fxblur.NoEffectWarning):
        gm = fxblur.transform(model, replace_avgpools=True, blur_first=False, verbose=False)
    assert "ceil_mode=True" in decisions(gm)["0"].reason
    gm = fxblur.transform(model, replace_avgpools=True, verbose=False)
    assert decisions(gm)["0"].action == "blur_before"
    x = torch.randn(1, 2, 8, 8)
    assert gm(x).shape == model(x).shape


def test_video_models_blur_in_time_and_space():
    gm = fxblur.transform(torchvision.models.video.r3d_18(), verbose=False)
    change = decisions(gm)["layer2.0.conv1.0"]
    assert change.op == "conv3d" and change.stride == (2, 2, 2)
    assert gm.get_submodule(change.blur).filter_size == (3, 3, 3)
    x = torch.randn(1, 3, 8, 32, 32)
    assert gm.eval()(x).shape == (1, 400)


class Doubler(nn.Module):
    """Called whole (a leaf module), and shares its conv with the model's own graph."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x) * 2


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.leaf = Doubler(self.conv)

    def forward(self, x):
        return self.conv(x), self.leaf(x)


@pytest.mark.parametrize("options", [{}, {"blur_first": False}, {"past_nonlinearity": True}])
def test_a_conv_a_leaf_module_also_calls_is_blurred_without_changing_the_leaf(options):
    model = SharedConv()
    gm = fxblur.transform(model, leaf_modules=[Doubler], verbose=False, **options)
    change, inside_leaf = fxblur.changes(gm)  # the graph's call, then the leaf's call of the same conv
    assert change.action == "blur_before" and type(gm.conv) is nn.Conv2d and gm.leaf.conv is gm.conv
    assert (inside_leaf.target, inside_leaf.action) == ("leaf.conv", "skipped")
    assert inside_leaf.reason == "inside leaf (Doubler), which is called whole"
    if options:
        assert change.note.endswith("but its module is also called from outside the graph")
    x = torch.randn(1, 16, 9, 9)
    (blurred, doubled), (_, expected) = gm(x), model(x)
    torch.testing.assert_close(doubled, expected, rtol=0, atol=0)  # the leaf computes exactly as before
    torch.testing.assert_close(blurred, gm.conv(fxblur.blur(x, 1, 3)))
