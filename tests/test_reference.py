"""Presets reproduce the references they are named after, number for number.

``zhang2019`` is compared with the antialiased-cnns package (a test-only dependency; its
code is CC BY-NC-SA and is only imported here, never copied), ``composer`` with a direct
implementation of Composer's method card written below.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxblur

antialiased_cnns = pytest.importorskip("antialiased_cnns")


def randomise(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine terms, so that every layer matters.

    Convs and linears keep their (random) initialisation, which keeps activations of
    order one: with larger weights a deep plain net like VGG amplifies float rounding
    until near-zero logits differ by percents between any two correct implementations.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn_like(module.running_mean) * 0.1)
                module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)
                module.weight.copy_(torch.rand_like(module.weight) + 0.5)
                module.bias.copy_(torch.randn_like(module.bias) * 0.1)
    return model.eval()


def copy_weights(source: nn.Module, reference: nn.Module) -> None:
    """Load ``source``'s tensors into ``reference`` in order; the reference's blur filters are its own."""
    theirs = {k: v for k, v in reference.state_dict().items() if not k.endswith(".filt")}
    ours = source.state_dict()
    assert [v.shape for v in theirs.values()] == [v.shape for v in ours.values()]
    reference.load_state_dict(dict(zip(theirs, ours.values(), strict=True)), strict=False)


@pytest.mark.parametrize("size", [64, 67])
def test_zhang2019_vgg16_equals_antialiased_cnns(size):
    model = randomise(torchvision.models.vgg16())
    reference = antialiased_cnns.vgg16(filter_size=4).eval()
    for net in (model, reference):  # a small head: the 100M-parameter one only costs time
        net.classifier = nn.Linear(512 * 7 * 7, 10)
    copy_weights(model, reference)
    gm = fxblur.transform(model, preset="zhang2019", verbose=False)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)  # float64: any difference is not rounding
    with torch.no_grad():
        torch.testing.assert_close(gm.double()(x), reference.double()(x))


@pytest.mark.parametrize("size", [64, 67])
def test_zhang2019_resnet50_equals_antialiased_cnns(size):
    model = torchvision.models.resnet50()
    # fxblur never changes a layer's kernel; antialiased-cnns also swaps ResNet's 3x3/2
    # stem pool for a 2x2 one. Give the torchvision model that pool, and everything else
    # - the blur past bn2/relu in every strided block, the blurred 1x1 shortcuts - is
    # compared as fxblur makes it.
    model.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
    randomise(model)
    reference = antialiased_cnns.resnet50(filter_size=4).eval()
    copy_weights(model, reference)
    gm = fxblur.transform(model, preset="zhang2019", verbose=False)
    actions = {c.target: c.action for c in fxblur.changes(gm)}
    assert actions["layer2.0.conv2"] == "blur_past_nonlinearity"
    assert actions["layer2.0.downsample.0"] == "subsample_before"
    assert actions["maxpool"] == "blur_after" and actions["conv1"] == "skipped"
    x = torch.randn(2, 3, size, size, dtype=torch.float64)  # float64: any difference is not rounding
    with torch.no_grad():
        torch.testing.assert_close(gm.double()(x), reference.double()(x))


def method_card_blur(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Composer's method card: a depthwise 3x3 binomial filter with zero padding."""
    row = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype)
    kernel = (row[:, None] * row[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(x, kernel, stride=stride, padding=1, groups=x.shape[1])


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.shortcut = nn.Conv2d(16, 32, 1, stride=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(self.bn(self.down(x))) + self.shortcut(x)
        return self.head(x.mean((2, 3)))


def composer_forward(net: SmallNet, x: torch.Tensor) -> torch.Tensor:
    """SmallNet as the method card describes Composer's rewrite of it."""
    x = torch.relu(net.stem(x))
    x = method_card_blur(F.max_pool2d(x, 3, stride=1, padding=1), stride=2)  # BlurMaxPool2d
    blurred = method_card_blur(x, stride=1)  # BlurConv2d with blur_first=True
    x = torch.relu(net.bn(net.down(blurred))) + net.shortcut(blurred)
    return net.head(x.mean((2, 3)))


@pytest.mark.parametrize("size", [32, 33])
def test_composer_preset_equals_the_method_card(size):
    net = randomise(SmallNet())
    gm = fxblur.transform(net, preset="composer", verbose=False)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm.double()(x), composer_forward(net.double(), x))


def test_explicit_options_override_a_preset():
    gm = fxblur.transform(SmallNet(), preset="composer", padding_mode="reflect", filter_size=5, verbose=False)
    blur = gm.get_submodule(fxblur.changes(gm)[0].blur)
    assert blur.padding_mode == "reflect" and blur.filter_size == (5, 5)
    actions = {c.target: c.action for c in fxblur.changes(gm)}
    assert actions == {"pool": "blur_after", "down": "blur_before", "shortcut": "subsample_before"}
