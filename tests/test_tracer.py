"""What the tracer makes of forward signatures, outputs and checks that plain torch.fx gets wrong.

Optional arguments are fixed at their defaults (the graph is the code the model runs when
called with the input alone), a dict-subclass output keeps its class, a decorated forward
traces, and an input check that raises stays in the graph as an assertion.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import pickle
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxblur
from support import assert_same_snapshot, snapshot


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        return self.conv(x)


class Masked(nn.Module):
    """A ViT-like forward: ``if mask is not None`` would trace the masked branch, losing ``blocks`` as a module."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.pool = nn.MaxPool2d(2)

    def forward(self, x, mask=None, scale: float = 1.0):
        if mask is not None:
            for block in self.blocks:
                x = block(x, mask)
        else:
            x = self.blocks(x)
        return self.pool(x) * scale


def test_optional_arguments_are_fixed_at_their_defaults():
    model = Masked().eval()
    before = snapshot(model)
    gm = fxblur.transform(model, verbose=False)
    assert [c.target for c in fxblur.changes(gm)] == ["pool"]
    assert fxblur.report(gm).nesting.inlined == ()
    calls = []
    gm.blocks.register_forward_hook(lambda *args: calls.append("blocks"))
    x = torch.randn(2, 16, 8, 8)
    one_tap = fxblur.transform(model, filter_size=1, verbose=False)
    assert torch.allclose(one_tap(x), model(x)) and gm(x).shape == model(x).shape
    assert calls == ["blocks"]  # the unmasked branch, which calls blocks as a module, once
    assert gm(x, None, 1.0).shape == gm(x, mask=None, scale=1).shape == (2, 16, 4, 4)  # the defaults, by keyword too
    assert fxblur.report(gm).specialised == {"mask": None, "scale": 1.0}
    assert "forward arguments fixed to their defaults: mask=None, scale=1.0" in fxblur.report(gm).summary()
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("call", [{"mask": torch.ones(1)}, {"scale": 2.0}])
def test_another_value_for_a_fixed_argument_is_an_error_that_says_what_to_do(call):
    gm = fxblur.transform(Masked().eval(), verbose=False)
    name = next(iter(call))
    with pytest.raises(
        AssertionError, match=rf"{name} was fixed to its default.*concrete_args=\{{'{name}': torch.fx.PH\}}"
    ):
        gm(torch.randn(1, 16, 8, 8), **call)


def test_concrete_args_win_and_ph_keeps_an_argument_an_input():
    model = Masked().eval()
    x = torch.randn(1, 16, 8, 8)
    scaled = fxblur.transform(model, concrete_args={"scale": fx.PH}, verbose=False)
    assert torch.allclose(scaled(x, scale=2.0), 2 * scaled(x))
    assert fxblur.report(scaled).specialised == {"mask": None}
    masked = fxblur.transform(model, concrete_args={"mask": fx.PH}, filter_size=1, verbose=False)  # masked branch
    mask = torch.rand(1, 1, 8, 8)
    assert torch.allclose(masked(x, mask), model(x, mask))
    with pytest.raises(AssertionError, match="has been specialized"):  # torch.fx's own check of a value it was given
        fxblur.transform(model, concrete_args={"scale": 2.0}, verbose=False)(x)


class Variadic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, stride=2)

    def forward(self, x, *args, **kwargs):
        return self.conv(x, *args, **kwargs)


def test_star_args_and_kwargs_are_fixed_empty():
    gm = fxblur.transform(Variadic(), verbose=False)
    x = torch.randn(1, 16, 9, 9)
    assert gm(x).shape == (1, 16, 4, 4)
    assert fxblur.report(gm).specialised == {"*args": (), "**kwargs": {}}
    with pytest.raises(TypeError):
        gm(x, 1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bias'"):
        gm(x, bias=None)


def returns_dict_unless(forward):
    """A decorator in the style of Hugging Face's ``can_return_tuple``: ``wrapper(self, *args, **kwargs)``."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        as_tuple = kwargs.pop("return_tuple", False)
        output = forward(self, *args, **kwargs)
        return tuple(output.values()) if as_tuple else output

    return wrapper


@dataclasses.dataclass
class Output(collections.OrderedDict):
    """Like Hugging Face's ``ModelOutput``: a dataclass whose keys are its fields that are not ``None``."""

    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    loss: torch.Tensor | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(16, 16, 3, stride=2)
        self.head = nn.Linear(16, 4)

    @returns_dict_unless
    def forward(self, pixel_values, labels=None, **kwargs):
        features = F.max_pool2d(self.stem(pixel_values), 2)
        logits = self.head(features.mean((2, 3)))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return Output(logits=logits, features=features, loss=loss)


def test_a_decorated_forward_traces_and_a_dataclass_dict_output_keeps_its_class():
    model = Classifier().eval()
    before = snapshot(model)
    gm = fxblur.transform(model, verbose=False)
    x = torch.randn(2, 16, 20, 20)
    output, expected = gm(x), model(x)
    assert type(output) is Output and list(output) == ["logits", "features"]
    assert output.logits.shape == expected.logits.shape and output.loss is None
    assert [c.target for c in fxblur.changes(gm)] == ["stem", "max_pool2d"]
    assert torch.allclose(fxblur.transform(model, filter_size=1, verbose=False)(x).logits, expected.logits, atol=1e-6)
    assert fxblur.report(gm).specialised == {"labels": None, "**kwargs": {}}
    assert fxblur.report(gm, (2, 16, 20, 20)).rows[0].output_size == (9, 9)
    for clone in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert type(clone(x)) is Output and torch.equal(clone(x).logits, output.logits)
    assert fx.symbolic_trace(torch.nn.Sequential()).code  # tracing still works after unpickling
    assert_same_snapshot(before, snapshot(model))


def test_an_ordered_dict_output_stays_one():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, stride=2)

        def forward(self, x):
            return collections.OrderedDict(out=self.conv(x), aux=x)

    gm = fxblur.transform(Heads(), verbose=False)
    output = gm(torch.randn(1, 16, 9, 9))
    assert type(output) is collections.OrderedDict and list(output) == ["out", "aux"]
    assert type(pickle.loads(pickle.dumps(gm))(torch.randn(1, 16, 9, 9))) is collections.OrderedDict


class Checked(nn.Module):
    """An input check that raises, as Hugging Face's embeddings have: ``if num_channels != ...: raise``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3)
        self.channels = 16

    def forward(self, x):
        if x.shape[1] != self.channels:
            raise ValueError("wrong number of channels")
        assert x.dim() == 4, "images only"
        return F.max_pool2d(self.conv(x), 2)  # functional: this forward is rewritten, and keeps the checks


def test_an_input_check_that_raises_is_traced_as_passing_and_kept():
    model = nn.Sequential(Checked())
    gm = fxblur.transform(model, verbose=False)
    assert [c.target for c in fxblur.changes(gm)] == ["0.max_pool2d"]
    assert isinstance(gm.get_submodule("0"), fx.GraphModule)
    assert gm(torch.randn(1, 16, 9, 9)).shape == model(torch.randn(1, 16, 9, 9)).shape
    with pytest.raises(AssertionError, match=r"fails the check at .*test_tracer.py:\d+ \(`if x.shape\[1\] != self"):
        gm(torch.randn(1, 8, 9, 9))
    with pytest.raises(AssertionError, match=r"`assert x.dim\(\) == 4"):
        gm(torch.randn(1, 16, 2, 9, 9))


def test_a_check_whose_operands_need_different_values_is_still_untraceable():
    class Ambiguous(nn.Module):
        def forward(self, x):
            if x.shape[1] != 16 and x.shape[2] > 4:  # False if either is: no one value passes it
                raise ValueError("ambiguous")
            return F.max_pool2d(x, 2)

    with pytest.raises(fxblur.UntraceableModelError, match=r"x\.shape\[1\] != 16 and"):
        fxblur.transform(Ambiguous(), verbose=False)


def test_timm_vit_keeps_its_blocks_called_as_a_module():
    timm = pytest.importorskip("timm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
        gm = fxblur.transform(model, verbose=False)
    assert fxblur.report(gm).nesting.inlined == ()
    assert fxblur.report(gm).specialised == {"attn_mask": None, "is_causal": False}
    calls = []
    gm.blocks.register_forward_hook(lambda *args: calls.append("blocks"))
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    assert calls == ["blocks"]


def test_a_strided_conv_inside_a_module_timm_registers_as_not_traceable_is_blurred():
    cpubone = pytest.importorskip("timm.models.cpubone")
    model = nn.Sequential(cpubone.ConvAttention(96, att_stride=4)).eval()  # traced whole, it fails: called whole
    before = snapshot(model)
    gm = fxblur.transform(model, verbose=False)
    [decision] = fxblur.changes(gm)
    assert (decision.target, decision.action) == ("0.conv_proj.conv", "blur_before")
    leaf = gm.get_submodule("0")
    assert type(leaf) is cpubone.ConvAttention and type(leaf.conv_proj) is type(model[0].conv_proj)
    assert isinstance(leaf.conv_proj.conv, nn.Conv2d) and leaf.conv_proj.conv is not model[0].conv_proj.conv
    x = torch.randn(1, 96, 29, 29)
    assert gm(x).shape == model(x).shape
    assert torch.allclose(fxblur.transform(model, filter_size=1, verbose=False)(x), model(x), atol=1e-5)
    assert_same_snapshot(before, snapshot(model))
    with pytest.warns(fxblur.NoEffectWarning):  # the user's leaves stay whole
        kept = fxblur.transform(model, leaf_modules=[cpubone.ConvAttention], verbose=False)
    assert [c.reason for c in fxblur.changes(kept)] == ["inside 0 (ConvAttention), which is called whole"]


class ChannelsChecked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)

    def forward(self, x):
        if x.shape[1] not in (16, 32):
            raise ValueError("16 or 32 channels")
        return self.conv(x[:, :16])


def test_a_membership_check_is_traced_as_passing_and_kept_whole():
    model = ChannelsChecked().eval()
    gm = fxblur.transform(model, verbose=False)
    for channels in (16, 32):  # both pass eagerly, and after the rewrite
        x = torch.randn(1, channels, 8, 8)
        assert gm(x).shape == model(x).shape
    with pytest.raises(AssertionError, match=r"x.shape\[1\] not in \(16, 32\)"):
        gm(torch.randn(1, 8, 8, 8))
    assert "contains" in fxblur.record_of(gm).flat_graph(False).code  # one membership test, not an equality


class BlursItself(nn.Module):
    def forward(self, x):
        return fxblur.blur(x.long(), stride=2)  # an integer image: the blur refuses it


def test_an_error_inside_fxblurs_own_op_is_blamed_on_the_models_line():
    with pytest.raises(fxblur.UntraceableModelError) as error:
        fxblur.transform(nn.Sequential(BlursItself(), nn.Flatten()), verbose=False)
    assert "test_tracer.py" in error.value.summary and "(`return fxblur.blur(x.long(), stride=2)" in error.value.summary
    assert "fxblur/ops" not in error.value.summary


class Counting(nn.Module):
    """Counts its calls in a buffer, in place, as BatchNorm counts batches."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        return self.conv(x)


def test_a_forward_that_writes_a_buffer_is_called_whole_and_the_original_is_untouched():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), Counting())
    gm = fxblur.transform(model, verbose=False)
    assert model[1].calls.item() == 0  # tracing wrote nothing of the model's
    assert type(gm.get_submodule("1")) is Counting  # its code runs as it is
    assert type(gm.get_submodule("1.conv")).__name__ == "BlurredConv2d"
    assert [(c.target, c.action) for c in fxblur.changes(gm)] == [("1.conv", "blur_before")]
    gm(torch.randn(1, 16, 8, 8))
    assert model[1].calls.item() == 1  # the buffer is shared: the result counts where the model did


@pytest.mark.parametrize("flatten", [False, True])
def test_timm_batch_norm_act_keeps_its_statistics_exact(flatten):
    timm = pytest.importorskip("timm")
    from timm.layers.norm_act import BatchNormAct2d

    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=4).train()
    for module in model.modules():
        if isinstance(module, BatchNormAct2d):
            module.momentum = None  # a cumulative average, by num_batches_tracked
    before = snapshot(model)
    gm = fxblur.transform(model, filter_size=1, copy=True, flatten=flatten, verbose=False)
    assert_same_snapshot(before, snapshot(model))  # its batch counters are where they were
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        reference(x)
        gm(x)
    expected, got = reference.state_dict(), gm.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=name)
    assert got["bn1.num_batches_tracked"].item() == 3
