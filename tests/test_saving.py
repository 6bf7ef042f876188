"""The README's saving, loading and undoing routes: weights, the rewrite's arguments, whole modules, programs."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import fxblur

OPTIONS = {"default": {}, "polyphase": {"polyphase": True, "circular_padding": True}}


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS)
def test_weights_and_arguments_through_json_give_the_same_model_back(options, tmp_path):
    gm = fxblur.transform(resnet(), verbose=False, **options)
    torch.save(gm.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "fxblur.json").write_text(json.dumps(fxblur.record_of(gm).transform_arguments()))
    torch.manual_seed(1)  # other initial weights: the checkpoint must overwrite every one
    again = fxblur.transform(
        torchvision.models.resnet18(num_classes=10), **json.loads((tmp_path / "fxblur.json").read_text())
    )
    again.load_state_dict(torch.load(tmp_path / "weights.pt"), strict=True)
    assert fxblur.changes(again) == fxblur.changes(gm)
    x = torch.randn(2, 3, 64, 64)
    for mode in (False, True):  # eval, then train: BatchNorm in batch statistics
        torch.testing.assert_close(again.train(mode)(x), gm.train(mode)(x), rtol=0, atol=0)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(16, 16, 1, stride=2)

    def forward(self, x, use_skip: bool = False):
        return self.skip(x) if use_skip else self.conv(x)


def test_arguments_repeat_a_rewrite_traced_with_concrete_args():
    gm = fxblur.transform(Gated(), concrete_args={"use_skip": True}, verbose=False)
    arguments = fxblur.record_of(gm).transform_arguments()
    assert arguments["concrete_args"] == {"use_skip": True}  # the values, not only the names
    again = fxblur.transform(Gated(), **arguments)
    assert [c.target for c in fxblur.changes(again)] == [c.target for c in fxblur.changes(gm)] == ["skip"]


def test_undoing_loads_the_weights_into_the_plain_architecture():
    model = resnet().eval()
    gm = fxblur.transform(model, verbose=False).eval()
    plain = torchvision.models.resnet18(num_classes=10).eval()
    plain.load_state_dict(gm.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)  # the original network, no blur
    assert not torch.allclose(plain(x), gm(x))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS)
def test_a_whole_module_checkpoint_computes_and_trains_the_same(options, tmp_path):
    gm = fxblur.transform(resnet(), verbose=False, **options)
    torch.save(gm, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert fxblur.changes(loaded) == fxblur.changes(gm)
    x = torch.randn(2, 3, 64, 64)
    for model in (gm, loaded):
        model(x).square().sum().backward()
    for (name, expected), got in zip(gm.named_parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=0, msg=name)


def test_an_exported_program_saves_and_loads(tmp_path):  # polyphase programs: test_compat.py exports one
    gm = fxblur.transform(resnet(), verbose=False).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.export.save(torch.export.export(gm, (x,)), tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    torch.testing.assert_close(loaded(x), gm(x))  # float32 rounding: the program blurs by a depthwise conv
