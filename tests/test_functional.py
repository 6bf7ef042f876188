"""``fxblur.apply_blurpool``: Composer's functional call, in the method card's plain training loop."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxblur


def small_resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=4)


def test_the_method_cards_loop_trains_the_rewrite_with_the_optimizer_built_before():
    torch.manual_seed(0)
    model = small_resnet()
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    blurred = fxblur.apply_blurpool(model, optimizers=opt, replace_convs=True, replace_maxpools=True, blur_first=True)
    assert blurred is not model
    assert {c.action for c in fxblur.changes(blurred)} >= {"blur_before"}
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 4, (8,))
    before = blurred.get_parameter("layer2.0.conv1.weight").detach().clone()
    losses = []
    blurred.train()
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(blurred(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    assert not torch.equal(blurred.get_parameter("layer2.0.conv1.weight"), before)  # the optimizer moved it
    assert blurred.state_dict().keys() == original_state.keys()


def test_an_optimizer_over_parameters_the_rewrite_does_not_hold_is_named():
    model = small_resnet()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"optimizer 0 \(Adam\) holds the original model's 'conv1.weight'"):
        fxblur.apply_blurpool(model, optimizers=[opt], copy=True)


def test_optimizers_must_be_optimizers():
    model = small_resnet()
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        fxblur.apply_blurpool(model, optimizers=[model.parameters()])


def test_defaults_are_composers_numerics():
    model = small_resnet()
    expected = fxblur.transform(model, preset="composer", verbose=False)
    got = fxblur.apply_blurpool(model)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(got.eval()(x), expected.eval()(x))
    assert [(c.target, c.action) for c in fxblur.changes(got)] == [
        (c.target, c.action) for c in fxblur.changes(expected)
    ]
