"""Models whose forward reads self.training behave like the original in both modes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxblur
from fxblur.assemble.graph_module import TrainEvalGraphModule
from support import TrainOnlyHead


def inception_v3():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.inception_v3(init_weights=False)


@pytest.mark.parametrize("blur_first", [True, False])
def test_inception_v3_aux_logits_in_train_mode_only(blur_first):
    model = inception_v3().eval()
    # a 1-tap filter makes every blur the identity: the rewritten graph must then compute
    # exactly what the original computes, which tests the graph picked for each mode
    gm = fxblur.transform(model, blur_first=blur_first, filter_size=1, copy=True, verbose=False)
    x = torch.randn(2, 3, 299, 299)  # the aux head needs 17x17 maps
    torch.testing.assert_close(gm(x), model(x))
    gm.train()
    out = gm(x)
    assert type(out).__name__ == "InceptionOutputs"
    assert out.logits.shape == out.aux_logits.shape == (2, 1000)
    gm.eval()
    assert isinstance(gm(x), torch.Tensor)
    gm.load_state_dict(model.state_dict())  # undo the running statistics of the train step
    torch.testing.assert_close(gm(x), model(x))
    assert not model.training


def stochastic_depth_training_flags(gm) -> set[bool]:
    """The ``training`` argument a flat graph passes to torchvision's stochastic_depth."""
    calls = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "stochastic_depth"]
    assert calls
    return {n.args[3] for n in calls}


def test_efficientnet_flat_graph_bakes_stochastic_depth_per_mode():
    model = torchvision.models.efficientnet_b0().eval()
    gm = fxblur.transform(model, filter_size=1, copy=True, flatten=True, verbose=False)
    assert stochastic_depth_training_flags(gm) == {False}
    gm.train()
    assert stochastic_depth_training_flags(gm) == {True}
    gm.eval()


@pytest.mark.parametrize("flatten", [False, True])
def test_efficientnet_stochastic_depth_follows_the_mode(flatten):
    model = torchvision.models.efficientnet_b0().eval()
    # with a 1-tap filter the rewrite computes what the model computes: stochastic depth included
    gm = fxblur.transform(model, filter_size=1, copy=True, flatten=flatten, verbose=False)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(gm(x), model(x))
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = model.train()(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(gm.train()(x), expected)
    torch.manual_seed(0)
    first = gm(x)
    torch.manual_seed(1)
    assert not torch.allclose(gm(x), first)  # blocks are dropped at random in train mode
    gm.eval()
    model.eval()
    gm.load_state_dict(model.state_dict())
    torch.testing.assert_close(gm(x), model(x))


def test_model_traced_in_train_mode_starts_in_train_mode():
    model = inception_v3().train()
    gm = fxblur.transform(model, verbose=False)
    assert gm.training
    assert type(gm(torch.randn(2, 3, 299, 299))).__name__ == "InceptionOutputs"
    assert all(m.training for m in model.modules())


def test_models_without_mode_dependence_get_one_graph():
    gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
    assert isinstance(gm, torch.fx.GraphModule) and not isinstance(gm, TrainEvalGraphModule)


def test_transforming_a_two_graph_result_again_changes_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.googlenet(init_weights=False).eval()
    once = fxblur.transform(model, blur_first=False, verbose=False)
    code, graph = once.code, once.graph
    with pytest.warns(fxblur.NoEffectWarning):
        twice = fxblur.transform(once, blur_first=False, verbose=False)
    assert (once.code, once.graph, once.graph.owning_module) == (code, graph, once)  # input untouched
    assert twice.code == once.code
    x = torch.randn(2, 3, 75, 75)
    torch.testing.assert_close(twice(x), once(x))
    assert twice.train().code == once.train().code


def test_report_measures_the_mode_the_model_is_in():
    gm = fxblur.transform(TrainOnlyHead().eval(), verbose=False)
    shape = (1, 16, 9, 9)
    assert {row.target: row.output_size for row in fxblur.report(gm, shape).rows} == {"conv": (5, 5), "aux": None}
    assert "not run in eval mode" in str(fxblur.report(gm, shape))
    assert "MACs at 1x16x9x9: " in str(fxblur.report(gm, shape))
    gm.train()
    assert {row.target: row.output_size for row in fxblur.report(gm, shape).rows} == {"conv": (5, 5), "aux": (2, 2)}
    assert "MACs at 1x16x9x9 in train mode: " in str(fxblur.report(gm, shape))


def test_a_train_mode_model_that_cannot_take_the_batch_says_so_and_what_to_do():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.inception_v3(init_weights=False, aux_logits=True)  # train mode
    gm = fxblur.transform(model, verbose=False)
    refused = r"does not run in train mode on an input of \(1, 3, 299, 299\).*call \.eval\(\)"
    with pytest.raises(ValueError, match=refused):
        fxblur.report(gm, (1, 3, 299, 299))  # the aux head's BatchNorm sees one value per channel
    assert fxblur.report(gm.eval(), (1, 3, 299, 299)).macs_before > 5e9


class TrainOnlyPool(nn.Module):
    """A functional pool in train mode only, before one in both modes."""

    def forward(self, x):
        if self.training:
            x = F.max_pool2d(x, 2, 1)
        return F.max_pool2d(x, 2)


@pytest.mark.parametrize("train", [False, True])
def test_functional_calls_have_the_same_name_in_both_modes(train):
    gm = fxblur.transform(TrainOnlyPool().train(train), verbose=False)
    assert [c.target for c in fxblur.changes(gm)] == ["max_pool2d_1"]  # the strided one, once, named by its line
    with pytest.warns(fxblur.NoEffectWarning):
        excluded = fxblur.transform(TrainOnlyPool().train(train), exclude="max_pool2d_1", verbose=False)
    x = torch.randn(1, 2, 8, 8)
    for mode in (False, True):
        excluded.train(mode)
        expected = TrainOnlyPool().train(mode)(x)
        torch.testing.assert_close(excluded(x), expected)  # excluded in both modes, nothing else to blur
