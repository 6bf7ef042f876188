"""Hugging Face vision models transform whole: decorated forwards, ModelOutput results, input checks.

Tiny random configurations (nothing is downloaded). What they need from the tracer:
``labels``, ``return_dict`` and ``**kwargs`` fixed at their defaults, the decorated
``forward`` of ConvNeXt traced through its wrapped signature, the ``ModelOutput`` kept,
and the embeddings' ``if num_channels != self.num_channels: raise`` kept as a check.
"""

from __future__ import annotations

import pytest
import torch

import fxblur
from support import assert_same_snapshot, snapshot

transformers = pytest.importorskip("transformers")
if not transformers.utils.is_torch_available():
    pytest.skip(f"transformers {transformers.__version__} does not support this torch", allow_module_level=True)

TINY = {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}


def resnet():
    config = transformers.ResNetConfig(embedding_size=16, **TINY)
    return transformers.ResNetForImageClassification(config).eval()


def convnext():
    return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(**TINY)).eval()


@pytest.fixture(params=[resnet, convnext], ids=["resnet", "convnext"])
def model(request):
    torch.manual_seed(0)
    return request.param()


def test_transforms_whole_and_returns_the_same_output_class(model):
    before = snapshot(model)
    gm = fxblur.transform(model, verbose=False)
    x = torch.randn(2, 3, 64, 64)
    output, expected = gm(x), model(x)
    assert type(output) is type(expected) and output.logits.shape == expected.logits.shape == (2, 2)
    decisions = fxblur.changes(gm)
    assert decisions and all(
        c.action != "skipped" for c in decisions if c.in_channels is None or c.in_channels >= 16
    ), fxblur.report(gm)
    assert gm(torch.randn(1, 3, 67, 67)).logits.shape == (1, 2)
    one_tap = fxblur.transform(model, filter_size=1, verbose=False)
    assert torch.allclose(one_tap(x).logits, expected.logits, atol=1e-5)
    assert_same_snapshot(before, snapshot(model))


def test_the_models_checks_and_fixed_arguments_still_hold(model):
    gm = fxblur.transform(model, verbose=False)
    with pytest.raises((ValueError, AssertionError), match="channel"):
        gm(torch.randn(1, 4, 64, 64))
    assert "labels" in fxblur.report(gm).specialised
    with pytest.raises(AssertionError, match="labels was fixed to its default"):
        gm(torch.randn(1, 3, 64, 64), labels=torch.tensor([0]))


def test_other_values_are_traced_on_request():
    x = torch.randn(1, 3, 64, 64)
    as_tuple = fxblur.transform(resnet(), concrete_args={"return_dict": False}, verbose=False)
    assert type(as_tuple(x, return_dict=False)) is tuple
    model = convnext()
    as_tuple = fxblur.transform(model, concrete_args={"**kwargs": {"return_dict": False}}, verbose=False)
    assert type(as_tuple(x)) is tuple and as_tuple(x)[0].shape == model(x).logits.shape
