"""transform on real models: what is blurred, what is shared, what is left alone."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxblur
from fxblur import Blur, NoEffectWarning
from fxblur.ops.blurred import BlurredOp
from support import assert_same_snapshot, layer_shapes, needs_cpu_half_padding, snapshot


def blurred(gm) -> dict[str, str]:
    return {c.target: c.action for c in fxblur.changes(gm) if c.action != "skipped"}


def skipped(gm) -> dict[str, str]:
    return {c.target: c.reason for c in fxblur.changes(gm) if c.action == "skipped"}


@pytest.fixture(scope="module")
def resnet50():
    return torchvision.models.resnet50().eval()


def test_resnet50_defaults_blur_downsampling_convs_and_stem_pool(resnet50):
    gm = fxblur.transform(resnet50, verbose=False)
    expected = {"maxpool"} | {f"layer{i}.0.conv2" for i in (2, 3, 4)}
    downsample = {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}  # 1x1: the blur subsamples for them
    assert blurred(gm) == dict.fromkeys(expected, "blur_before") | dict.fromkeys(downsample, "subsample_before")
    assert skipped(gm) == {"conv1": "in_channels 3 < min_channels 16"}
    # the stride-1 ops (layer1's downsample, every 3x3 conv outside the first blocks) are untouched
    considered = {c.target for c in fxblur.changes(gm)}
    assert "layer1.0.downsample.0" not in considered and "layer2.1.conv2" not in considered
    # every op blurred before now blurs its own input along both axes, and keeps its stride
    for change in fxblur.changes(gm):
        if change.action == "blur_before":
            op, blur = gm.get_submodule(change.target), gm.get_submodule(change.blur)
            assert isinstance(op, BlurredOp) and op.blur_input and blur is op.fxblur
            assert isinstance(blur, Blur) and blur.stride == (1, 1) and blur.filter_size == (3, 3)
            assert op.stride in (2, (2, 2))


def test_resnet50_blur_after_runs_ops_at_stride_one(resnet50):
    gm = fxblur.transform(resnet50, blur_first=False, verbose=False)
    actions = blurred(gm)
    assert {t for t, a in actions.items() if a == "blur_after"} == {
        "maxpool",
        "layer2.0.conv2",
        "layer3.0.conv2",
        "layer4.0.conv2",
    }
    # 1x1 shortcut convs commute with the blur: it subsamples before them instead
    assert {t for t, a in actions.items() if a == "subsample_before"} == {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}
    assert gm.get_submodule("layer2.0.downsample.0").stride == (1, 1)
    conv = gm.get_submodule("layer2.0.conv2")
    assert conv.stride == (1, 1) and resnet50.layer2[0].conv2.stride == (2, 2)
    assert conv.weight is resnet50.layer2[0].conv2.weight
    assert gm.maxpool.stride == (1, 1) and resnet50.maxpool.stride == 2
    blur = gm.get_submodule(fxblur.changes(gm)[1].blur)
    assert blur.stride == (2, 2)


@pytest.mark.parametrize("blur_first", [True, False])
def test_resnet50_feature_maps_keep_their_shapes(resnet50, blur_first):
    gm = fxblur.transform(resnet50, blur_first=blur_first, verbose=False)
    for size in (64, 67):
        x = torch.randn(1, 3, size, size)
        assert layer_shapes(gm, x) == layer_shapes(resnet50, x)


def test_googlenet_blurs_only_its_stride_two_pools():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.googlenet(init_weights=False, aux_logits=False).eval()
    gm = fxblur.transform(model, blur_first=False, verbose=False)
    pools = {name for name, m in model.named_modules() if isinstance(m, nn.MaxPool2d)}
    strided = {name for name in pools if model.get_submodule(name).stride == 2}
    assert strided == {"maxpool1", "maxpool2", "maxpool3", "maxpool4"}
    assert {t for t in blurred(gm) if t in pools} == strided
    x = torch.randn(1, 3, 75, 75)  # odd sizes: ceil_mode pools round up, the blur must too
    assert layer_shapes(gm, x) == layer_shapes(model, x)


def test_inception_v3_functional_max_pools_are_blurred():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.inception_v3(init_weights=False, aux_logits=False).eval()
    gm = fxblur.transform(model, verbose=False)
    functional = {c.target for c in fxblur.changes(gm) if c.op == "max_pool2d" and "max_pool2d" in c.target}
    assert functional == {"Mixed_6a.max_pool2d", "Mixed_7a.max_pool2d"}  # F.max_pool2d(x, 3, stride=2) in each
    assert all(blurred(gm)[t] == "blur_before" for t in functional)
    assert isinstance(gm.Mixed_6a, type(model.Mixed_6a)) and "fxblur" in gm.Mixed_6a.code  # their blocks got a graph
    assert {"maxpool1", "maxpool2"} <= set(blurred(gm))


class FunctionalNet(nn.Module):
    """Every functional spelling of a strided conv and max pool."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 16, 3, 3))
        self.w2 = nn.Parameter(torch.randn(16, 16, 1, 1))

    def forward(self, x):
        a = F.conv2d(x, self.w1, None, 2, 1)
        b = torch.conv2d(x, self.w2, stride=(2, 2))
        c = F.max_pool2d(x, 3, stride=2, padding=1)
        d = torch.max_pool2d(x, kernel_size=2)  # builtin: stride=() means the kernel size
        e = F.max_pool2d(x, 3, 1, 1)  # stride 1: nothing to blur
        return a, b, c, d, e


@pytest.mark.parametrize("blur_first", [True, False])
def test_functional_calls_are_matched_and_shapes_kept(blur_first):
    model = FunctionalNet()
    gm = fxblur.transform(model, blur_first=blur_first, verbose=False)
    by_op = sorted((c.op, c.stride) for c in fxblur.changes(gm))
    assert by_op == [("conv2d", (2, 2))] * 2 + [("max_pool2d", (2, 2))] * 2
    assert all(c.in_channels == 16 for c in fxblur.changes(gm) if c.op == "conv2d")
    for size in (8, 9):
        x = torch.randn(2, 16, size, size)
        expected, got = model(x), gm(x)
        assert [t.shape for t in got] == [t.shape for t in expected]
        torch.testing.assert_close(got[4], expected[4])  # the stride-1 pool computes as before


def test_original_model_is_untouched(resnet50):
    model = torchvision.models.resnet18()
    model.layer1[0].bn1.eval()  # mixed modes must survive too
    hook = model.layer2.register_forward_hook(lambda *args: None)
    before = snapshot(model)
    for options in ({}, {"blur_first": False}, {"copy": True}):
        gm = fxblur.transform(model, verbose=False, **options)
        gm.eval()
        gm(torch.randn(1, 3, 32, 32))
        assert_same_snapshot(before, snapshot(model))
    assert model.training and not model.layer1[0].bn1.training
    assert model.layer2._forward_hooks.keys() == {hook.id}


def test_result_keeps_modes_and_mode_changes_stay_local():
    model = torchvision.models.resnet18()
    model.layer1[0].bn1.eval()
    gm = fxblur.transform(model, verbose=False)
    assert gm.training and not gm.get_submodule("layer1.0.bn1").training
    assert gm.get_submodule("layer1.1.bn1").training
    gm.eval()
    assert model.training and model.layer1[1].bn1.training


def test_parameters_are_shared_unless_copy():
    model = torchvision.models.resnet18()
    shared = fxblur.transform(model, verbose=False)
    copied = fxblur.transform(model, copy=True, verbose=False)
    originals = dict(model.named_parameters())
    for name, parameter in shared.named_parameters():
        assert parameter is originals[name]
    for name, parameter in copied.named_parameters():
        assert parameter is not originals[name] and torch.equal(parameter, originals[name])
    assert [n for n, _ in shared.named_parameters()] == list(originals)


def test_state_dict_keys_identical_and_strict_round_trip():
    model = torchvision.models.resnet18()
    gm = fxblur.transform(model, copy=True, verbose=False)
    assert list(gm.state_dict()) == list(model.state_dict())
    other = torchvision.models.resnet18()
    gm.load_state_dict(other.state_dict(), strict=True)
    model.load_state_dict(gm.state_dict(), strict=True)
    assert torch.equal(model.fc.weight, other.fc.weight)


def test_unused_parameters_keep_their_state_dict_keys():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.inception_v3(init_weights=False).eval()  # AuxLogits unused in eval
    gm = fxblur.transform(model, verbose=False)
    assert list(gm.state_dict()) == list(model.state_dict())


def test_optimizer_built_before_transform_trains_the_new_model():
    model = torchvision.models.resnet18(num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = fxblur.transform(model, verbose=False)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = gm.fc.weight.detach().clone()
    F.cross_entropy(gm(x), y).backward()
    optimizer.step()
    assert not torch.equal(gm.fc.weight, before)
    assert gm.fc.weight is model.fc.weight


def test_eval_outputs_change_only_by_the_blur():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    for options in ({}, {"blur_first": False}):
        gm = fxblur.transform(model, verbose=False, **options)
        assert gm(x).shape == model(x).shape
        assert not torch.allclose(gm(x), model(x))
    identity = fxblur.transform(model, filter_size=1, verbose=False)
    torch.testing.assert_close(identity(x), model(x))  # a 1-tap filter is the identity


def test_transform_is_idempotent():
    model = torchvision.models.resnet18()
    for options in ({}, {"blur_first": False}):
        once = fxblur.transform(model, verbose=False, **options)
        with pytest.warns(NoEffectWarning):
            twice = fxblur.transform(once, verbose=False, **options)
        assert twice.code == once.code
        assert blur_count(twice) == blur_count(once) == 7
        x = torch.randn(1, 3, 40, 40)
        torch.testing.assert_close(twice.eval()(x), once.eval()(x))


def blur_count(model: nn.Module) -> int:
    return sum(isinstance(module, Blur) for module in model.modules())


def test_nothing_to_blur_warns():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.warns(NoEffectWarning, match="nothing to blur"):
        gm = fxblur.transform(model, verbose=False)
    assert fxblur.changes(gm) == []
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), model(x))


def test_exclude_and_min_channels():
    model = torchvision.models.resnet18()
    gm = fxblur.transform(model, exclude=["layer4.*", "maxpool"], min_channels=0, verbose=False)
    assert skipped(gm) == {
        "layer4.0.conv1": "excluded by 'layer4.*'",
        "layer4.0.downsample.0": "excluded by 'layer4.*'",
        "maxpool": "excluded by 'maxpool'",
    }
    assert "conv1" in blurred(gm)  # min_channels=0 blurs the stem too
    only_pools = fxblur.transform(model, replace_convs=False, verbose=False)
    assert blurred(only_pools) == {"maxpool": "blur_before"}


class StandardisedConv(nn.Conv2d):
    """A conv subclass with a forward of its own that honours its attributes."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class IndicesAndOwnForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.conv = StandardisedConv(16, 16, 3, stride=2)

    def forward(self, x):
        y, indices = self.pool(x)
        return self.unpool(y, indices), self.conv(x)


def test_return_indices_are_skipped_and_a_forward_of_its_own_is_blurred_before():
    model = IndicesAndOwnForward()
    for options in ({}, {"blur_first": False}):
        gm = fxblur.transform(model, verbose=False, **options)
        assert skipped(gm) == {"pool": "return_indices=True: the indices must refer to the strided pool's input"}
        (conv,) = [c for c in fxblur.changes(gm) if c.target == "conv"]
        assert conv.action == "blur_before" and gm.conv.stride == (2, 2)
        x = torch.randn(1, 16, 8, 8)
        torch.testing.assert_close(gm(x)[1], model.conv(fxblur.blur(x, 1, 3)))
    assert conv.note.startswith("StandardisedConv has a forward of its own; fxblur.trust_forward(StandardisedConv)")


def test_a_trusted_forward_runs_at_stride_one():
    class Trusted(StandardisedConv):
        pass

    model = IndicesAndOwnForward()
    model.conv.__class__ = Trusted
    fxblur.trust_forward(Trusted)
    gm = fxblur.transform(model, blur_first=False, verbose=False)
    (conv,) = [c for c in fxblur.changes(gm) if c.target == "conv"]
    assert conv.action == "blur_after" and not conv.note
    x = torch.randn(1, 16, 8, 8)
    stride_one = StandardisedConv(16, 16, 3)
    stride_one.load_state_dict(model.conv.state_dict())
    torch.testing.assert_close(gm(x)[1], fxblur.blur(stride_one(x), 2, 3))


@needs_cpu_half_padding
def test_blur_follows_the_model_device_and_dtype():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2)).double()
    gm = fxblur.transform(model, verbose=False)
    y = gm(torch.randn(1, 16, 9, 9, dtype=torch.float64))
    assert y.dtype == torch.float64
    half = fxblur.transform(model.half(), verbose=False, blur_first=False)
    assert half(torch.randn(1, 16, 9, 9, dtype=torch.float16)).dtype == torch.float16


def test_padding_mode_and_requires_grad_are_preserved():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, padding_mode="circular"))
    model[0].bias.requires_grad_(False)
    gm = fxblur.transform(model, blur_first=False, verbose=False)
    conv = gm.get_submodule("0")
    assert conv.padding_mode == "circular" and conv.stride == (1, 1)
    assert not conv.bias.requires_grad and conv.weight.requires_grad
    x = torch.randn(1, 16, 11, 11)
    assert gm(x).shape == model(x).shape


def test_channels_last_input_gives_channels_last_feature_maps():
    model = torchvision.models.resnet18().eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    for options in ({}, {"blur_first": False}):
        gm = fxblur.transform(model, verbose=False, **options)
        maps: list[torch.Tensor] = []
        gm.get_submodule("layer4.0.bn2").register_forward_hook(lambda m, i, out, maps=maps: maps.append(out))
        assert gm(x).shape == model(x).shape
        assert maps[0].is_contiguous(memory_format=torch.channels_last)


def test_plain_attributes_the_model_set_are_kept():
    model = torchvision.models.resnet18(num_classes=7)
    gm = fxblur.transform(model, verbose=False)
    assert (gm.inplanes, gm.groups, gm.base_width) == (model.inplanes, model.groups, model.base_width)
    assert gm.layer2.get_submodule("0").stride == 2  # a traced-through block keeps its own
    assert gm.graph is not None and isinstance(gm.code, str)  # the GraphModule's own names win


@pytest.mark.parametrize("options", [{}, {"blur_first": False}, {"past_nonlinearity": True}])
def test_blocks_stay_modules_that_compute_their_part_of_the_rewrite(options):
    model = torchvision.models.resnet18().eval()
    gm = fxblur.transform(model, verbose=False, **options)
    assert type(gm.layer2) is nn.Sequential or isinstance(gm.layer2, nn.Sequential)
    assert [name for name, _ in gm.named_children()] == [name for name, _ in model.named_children()]
    x = torch.randn(1, 3, 64, 64)
    stem = gm.maxpool(gm.relu(gm.bn1(gm.conv1(x))))
    layers = gm.layer4(gm.layer3(gm.layer2(gm.layer1(stem))))  # called one by one, as a user may
    torch.testing.assert_close(gm.fc(torch.flatten(gm.avgpool(layers), 1)), gm(x))
    y = torch.randn(1, 64, 16, 16)
    for block in gm.layer2:  # iterable, and each block callable on its own
        y = block(y)
    assert y.shape == (1, 128, 8, 8)


def test_copy_gives_an_independent_model():
    model = torchvision.models.resnet18()
    gm = fxblur.transform(model, copy=True, verbose=False)
    with torch.no_grad():
        gm.fc.weight.zero_()
    assert model.fc.weight.abs().sum() > 0
    assert copy.deepcopy(gm).fc.weight.abs().sum() == 0


def test_verbose_prints_the_change_table(capsys):
    fxblur.transform(torchvision.models.resnet18())
    printed = capsys.readouterr().out
    assert "layer2.0.conv1" in printed and "blur_before" in printed
    assert "skipped: in_channels 3 < min_channels 16" in printed
    assert "ResNet: 7 blurred, 1 skipped" in printed


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.scale = 1.0

    def forward(self, x):
        return F.max_pool2d(self.conv(x), 2) * self.scale


def test_setting_a_plain_attribute_a_rewritten_forward_baked_in_warns():
    gm = fxblur.transform(nn.Sequential(Scaled()), verbose=False)
    block = gm.get_submodule("0")
    assert isinstance(block, torch.fx.GraphModule)  # its forward was rewritten: 2.0 would not be read
    with pytest.warns(fxblur.BakedAttributeWarning, match=r"Scaled.scale was 1.0 .* setting it to 2.0"):
        block.scale = 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block.scale = 1.0  # its old value, or a mode change, or a module whose code fxblur kept: no warning
        block.eval()
        gm.get_submodule("0.conv").padding = (1, 1)
