"""Bad input fails early, clearly, and leaves the model as it was."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchvision
from torch import nn

import fxblur
from support import assert_same_snapshot, snapshot


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, stride=2)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_untraceable_model_names_module_line_and_remedies():
    model = GatedNet()
    before = snapshot(model)
    with pytest.raises(fxblur.UntraceableModelError) as error:
        fxblur.transform(model, verbose=False)
    message = str(error.value)
    assert "GatedNet" in message and "module `gate` (Gate)" in message
    assert "test_errors.py" in message and "if x.sum() > 0:" in message
    assert "leaf_modules=[Gate]" in message and "concrete_args" in message
    assert isinstance(error.value, torch.fx.proxy.TraceError)
    assert_same_snapshot(before, snapshot(model))


def test_leaf_modules_make_it_traceable():
    model = GatedNet()
    for leaf in (Gate, "gate"):
        gm = fxblur.transform(model, leaf_modules=[leaf], verbose=False)
        assert [c.target for c in fxblur.changes(gm)] == ["conv"]
        x = torch.randn(1, 16, 9, 9)
        assert gm(x).shape == model(x).shape


def test_concrete_args_fix_a_flag_argument():
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2)

        def forward(self, x, flatten: bool = True):
            y = self.pool(x)
            if flatten:
                return y.flatten(1)
            return y

    x = torch.randn(1, 2, 8, 8)
    at_default = fxblur.transform(Flagged(), verbose=False)  # traced with flatten=True, its default
    assert at_default(x).shape == at_default(x, True).shape == (1, 32)
    with pytest.raises(AssertionError, match="flatten"):
        at_default(x, False)
    gm = fxblur.transform(Flagged(), concrete_args={"flatten": False}, verbose=False)
    assert gm(x, False).shape == (1, 2, 4, 4)  # torch.fx asserts the fixed value


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"filter_size": 0}, "filter_size must be an int from 1 to 7"),
        ({"filter_size": 3.0}, "filter_size"),
        ({"padding_mode": "mirror"}, "padding_mode must be one of"),
        ({"min_channels": -1}, "min_channels"),
        ({"min_channels": True}, "min_channels"),
        ({"blur_first": "yes"}, "blur_first must be True or False"),
        ({"replace_convs": 1}, "replace_convs must be True or False"),
        ({"pool_blur_first": "no"}, "pool_blur_first must be True, False or None"),
        ({"adaptive_filter": 0}, "adaptive_filter"),
        ({"preset": "paper"}, "preset must be one of"),
        ({"exclude": [1]}, "exclude must be glob patterns"),
        ({"exclude": 3}, "exclude must be glob patterns"),
        ({"copy": 1}, "copy must be True or False"),
        ({"verbose": "no"}, "verbose"),
        ({"leaf_modules": [int]}, "leaf_modules"),
        ({"leaf_modules": 5}, "leaf_modules must be nn.Module classes or module paths"),
        ({"flatten": "yes"}, "flatten must be True or False"),
        ({"concrete_args": ["x"]}, "concrete_args must be a dict"),
    ],
)
def test_bad_options_raise_value_error_before_any_work(options, message, monkeypatch):
    traced = []
    monkeypatch.setattr(importlib.import_module("fxblur.transform"), "trace", lambda *a, **k: traced.append(1))
    with pytest.raises(ValueError, match=message):
        fxblur.transform(nn.Conv2d(16, 16, 3, stride=2), **options)
    assert not traced


@pytest.mark.parametrize("model", [torchvision.models.resnet18, "resnet18", None, lambda x: x])
def test_non_module_argument_raises_type_error(model):
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        fxblur.transform(model)


def test_changes_of_a_foreign_module_is_a_clear_error():
    with pytest.raises(ValueError, match=r"was not returned by fxblur\.transform"):
        fxblur.changes(torch.fx.symbolic_trace(nn.Conv2d(1, 1, 1)))


class FunctionalPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.fxblur = nn.Identity()  # the name fxblur gives the blurs a module's own graph calls

    def forward(self, x):
        return torch.nn.functional.max_pool2d(self.fxblur(x), 2)


def test_a_module_attribute_named_fxblur_is_reported_where_fxblur_needs_the_name():
    model = FunctionalPool()
    before = snapshot(model)
    with pytest.raises(ValueError, match="has an attribute named 'fxblur'"):
        fxblur.transform(model, verbose=False)
    assert_same_snapshot(before, snapshot(model))
    model = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2))
    model.fxblur = nn.Identity()  # never needed: the conv carries its own blur
    gm = fxblur.transform(model, verbose=False)
    assert gm(torch.randn(1, 16, 9, 9)).shape == (1, 16, 4, 4)


@pytest.mark.parametrize(
    ("wrap", "inner"),
    [
        (torch.compile, "model._orig_mod"),
        (nn.DataParallel, "model.module"),
        (torch.jit.script, "the model before scripting"),
    ],
)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_compiled_scripted_and_parallel_wrappers_get_a_clear_error_and_stay_as_they_were(wrap, inner):
    model = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2))
    wrapped = wrap(model)
    keys = list(wrapped.state_dict())
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf"Pass {inner}.*fxblur.transform\(model\) first, then wrap"):
        fxblur.transform(wrapped, verbose=False)
    assert list(wrapped.state_dict()) == keys
    assert_same_snapshot(before, snapshot(model))


def test_options_that_match_nothing_are_named_in_a_warning():
    model = GatedNet()
    with pytest.warns(UserWarning) as caught:
        fxblur.transform(model, leaf_modules=["gate", "gaet", nn.LSTM], exclude=["conv", "layer9.*"],
                         concrete_args={"flag": True}, verbose=False)  # fmt: skip
    messages = [str(w.message) for w in caught if type(w.message) is UserWarning]
    assert messages == [
        "exclude pattern 'layer9.*' matches no strided conv or pool; it has no effect",
        "leaf_modules path 'gaet' names no module (did you mean gate?); it has no effect",
        "leaf_modules class LSTM has no instance in the model; it has no effect",
        "concrete_args names 'flag', which forward does not take; it has no effect",
    ]
