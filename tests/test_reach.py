"""Models people use beyond torchvision: timm's conv subclasses and fx registrations, models that anti-alias already.

A representative subset; ``tools/zoo.py`` sweeps one model of every timm model file.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxblur

timm = pytest.importorskip("timm")

PLACEMENTS = [{}, {"blur_first": False}]


def build(name: str) -> nn.Module:
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False).eval()


def strided_ops(model: nn.Module, min_channels: int = 16) -> set[str]:
    """Paths of the conv and pool modules of ``model`` that subsample, convs from ``min_channels`` inputs."""
    found = set()
    for path, module in model.named_modules():
        is_conv = isinstance(module, nn.modules.conv._ConvNd)
        is_pool = isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd))
        stride = getattr(module, "stride", 1)
        strides = stride if isinstance(stride, (tuple, list)) else (stride,)
        if ((is_conv and module.in_channels >= min_channels) or is_pool) and any(s > 1 for s in strides):
            found.add(path)
    return found


def every_shape(model: nn.Module, x: torch.Tensor) -> dict[str, list]:
    """The output shape of every module call, by path."""
    shapes: dict[str, list] = {}

    def keep(module, args, out, path):
        if isinstance(out, torch.Tensor):
            shapes.setdefault(path, []).append(tuple(out.shape))

    handles = [m.register_forward_hook(lambda *a, path=p: keep(*a, path)) for p, m in model.named_modules() if p]
    model(x)
    for handle in handles:
        handle.remove()
    return shapes


@pytest.mark.parametrize(
    "name", ["tf_efficientnet_b0", "tf_efficientnetv2_b0", "tf_mixnet_s", "dm_nfnet_f0", "nf_regnet_b0"]
)
@pytest.mark.parametrize("options", PLACEMENTS)
def test_conv_subclasses_with_their_own_forward_are_blurred_with_every_shape_kept(name, options):
    model = build(name)
    gm = fxblur.transform(model, verbose=False, **options)
    blurred = {c.target for c in fxblur.changes(gm) if c.action != "skipped"}
    wanted = {path for path in strided_ops(model) if not isinstance(model.get_submodule(path), nn.AvgPool2d)}
    assert wanted <= blurred and {c.note for c in fxblur.changes(gm)} == {""}
    subclasses = {type(model.get_submodule(path)).__name__ for path in wanted}
    assert subclasses & {"Conv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}
    for size in (224, 225):
        x = torch.empty(1, 3, size, size, device="meta")
        expected, got = every_shape(model, x), every_shape(gm, x)
        for path, shapes in expected.items():
            grown = options and any(path == c or path.startswith(f"{c}.") for c in blurred)
            assert grown or got[path] == shapes, (size, path)


@pytest.mark.parametrize("options", PLACEMENTS)
def test_bit_and_nf_resnets_get_every_downsampling_op(options):
    bit = fxblur.transform(build("resnetv2_50x1_bit"), verbose=False, **options)
    assert sum(c.action != "skipped" for c in fxblur.changes(bit)) == 7  # stem pool, 3 convs, 3 shortcuts
    nf = fxblur.transform(build("nf_resnet50"), verbose=False, **options)
    blurred = sorted(c.target for c in fxblur.changes(nf) if c.action != "skipped")
    assert blurred == ["stages.1.0.conv2", "stages.2.0.conv2", "stages.3.0.conv2", "stem.pool"]


def timm_padding_layers() -> nn.Module:
    """timm's layers that pad in a forward of their own: zeros whatever padding_mode says, or 'same' at run time."""
    from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d, StdConv2dSame
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    return nn.Sequential(
        StdConv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        Conv2dSame(16, 16, 3, stride=2),
        ScaledStdConv2d(16, 16, 3, stride=2, padding=1),
        StdConv2dSame(16, 16, 3, stride=2, padding="same"),
        MaxPool2dSame(3, 2),
        AvgPool2dSame(3, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


@pytest.mark.parametrize("options", [{}, {"blur_first": False}, {"past_nonlinearity": True}])
def test_timm_layers_that_pad_in_their_own_forward_pad_circularly_when_asked(options):
    from fxblur.evaluation.invariance import check_invariance

    torch.manual_seed(0)
    model = timm_padding_layers()
    assert model[4].same_pad  # a strided 'same' conv pads at run time
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False, **options)
    verdict = fxblur.record_of(gm).verdict_at((1, 3, 64, 64))
    assert verdict.exact, verdict.line()
    assert check_invariance(gm, (1, 3, 64, 64), structured=False).worst < 1e-9
    x = torch.randn(1, 3, 64, 64)
    assert gm(x).shape == model(x).shape
    if not options:  # the other placements run the strided layers at stride 1, then subsample
        assert {p: s for p, s in every_shape(gm, x).items() if p.isdigit()} == every_shape(model, x)
    assert type(model[2]).__name__ == "Conv2dSame" and model[4].same_pad  # the original is untouched
    assert gm.state_dict().keys() == model.state_dict().keys()


def test_timm_layers_that_pad_with_zeros_are_not_called_exact_without_circular_padding():
    model = timm_padding_layers()
    model[0].padding_mode = "circular"  # StdConv2d's forward ignores it: it pads with zeros
    verdict = fxblur.record_of(fxblur.transform(model, polyphase=True, verbose=False)).verdict_at((1, 3, 64, 64))
    assert not verdict.exact
    assert verdict.breaks[0].where.startswith("0 ") and "zeros" in verdict.breaks[0].reason, verdict.line()


@pytest.mark.parametrize("name", ["tf_efficientnet_b0"])  # nfnet_l0, resnetv2_50: tools/verdicts.py
def test_timm_families_with_such_layers_become_exactly_invariant(name):
    from fxblur.evaluation.invariance import check_invariance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
    verdict = fxblur.record_of(gm).verdict_at((1, 3, 64, 64))
    assert verdict.exact, verdict.line()
    assert check_invariance(gm, (1, 3, 64, 64), structured=False, samples=1).worst < 1e-9


def test_bit_pads_its_stem_ahead_of_the_blurred_pool_and_becomes_exactly_invariant():
    from fxblur.evaluation.invariance import check_invariance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10).eval()
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
    verdict = fxblur.record_of(gm).verdict_at((1, 3, 64, 64))
    assert verdict.exact, verdict.line()  # its nn.ConstantPad2d pads the pool's input, circularly
    assert check_invariance(gm, (1, 3, 64, 64), structured=False, samples=1).worst < 1e-9
    x = torch.randn(1, 3, 65, 65)  # an odd size: the stem pool's windows as before
    expected = every_shape(model, x)
    assert {path: shapes for path, shapes in every_shape(gm, x).items() if path in expected} == expected


def test_timm_blur_pools_are_left_alone_and_only_the_unblurred_shortcuts_get_a_blur():
    model = build("resnetblur50")
    gm = fxblur.transform(model, verbose=False)
    found = {c.target: (c.action, c.reason) for c in fxblur.changes(gm)}
    assert {t for t, (a, _) in found.items() if a != "skipped"} == {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}
    assert found["layer2.0.aa"] == ("skipped", "already anti-aliased: timm BlurPool2d")
    assert type(gm.layer2[0].aa) is type(model.layer2[0].aa)  # called whole, untouched
    x = torch.empty(1, 3, 97, 97, device="meta")
    expected = every_shape(model, x)
    assert {path: shapes for path, shapes in every_shape(gm, x).items() if path in expected} == expected


def test_an_antialiased_cnns_model_gets_nothing_new():
    antialiased_cnns = pytest.importorskip("antialiased_cnns")
    with pytest.warns(fxblur.NoEffectWarning):
        gm = fxblur.transform(antialiased_cnns.resnet50().eval(), verbose=False)
    reasons = {c.reason for c in fxblur.changes(gm)}
    assert reasons == {"already anti-aliased: antialiased-cnns BlurPool", "in_channels 3 < min_channels 16"}


class WithKorniaBlurs(nn.Module):
    def __init__(self):
        super().__init__()
        kornia_filters = pytest.importorskip("kornia.filters")
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.maxblur = kornia_filters.MaxBlurPool2D(3)
        self.blur = kornia_filters.BlurPool2D(3, stride=1)
        self.strided = nn.Conv2d(32, 32, 3, stride=2, padding=1)  # fed by a stride-1 blur: blurred already
        self.other = nn.Conv2d(32, 32, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.maxblur(self.conv(x))
        return self.strided(self.blur(y)) + self.other(y)


def test_kornia_blur_layers_are_left_alone_and_never_traced_into():
    model = WithKorniaBlurs().eval()
    gm = fxblur.transform(model, verbose=False)
    found = {c.target: (c.action, c.reason) for c in fxblur.changes(gm)}
    assert found == {
        "maxblur": ("skipped", "already anti-aliased: kornia MaxBlurPool2D"),
        "strided": ("skipped", "already anti-aliased by kornia BlurPool2D"),
        "other": ("blur_before", ""),
    }
    x = torch.randn(1, 16, 16, 16)
    assert gm(x).shape == model(x).shape
    torch.testing.assert_close(
        gm.maxblur(x[:, :1].expand(1, 16, 16, 16)), model.maxblur(x[:, :1].expand(1, 16, 16, 16))
    )


@pytest.mark.parametrize(
    "name",
    ["cpubone_nano", "efficientvit_b0", "fasternet_s", "mobilevitv2_050", "mvitv2_tiny", "nest_tiny",
     "tiny_vit_5m_224", "twins_svt_small"],
)  # fmt: skip
def test_models_timms_own_tracing_handles_are_rewritten_whole(name):
    model = build(name)
    gm = fxblur.transform(model, verbose=False)  # strict: traced whole
    assert any(c.action != "skipped" for c in fxblur.changes(gm))
    size = model.pretrained_cfg["input_size"]
    x = torch.empty(1, *size, device="meta")
    assert gm(x).shape == model(x).shape


def test_inspect_blurs_a_tf_efficientnet(capsys):
    from fxblur.inspect import main

    assert main(["timm:tf_efficientnet_b0", "--format", "json"]) == 0
    import json

    records = json.loads(capsys.readouterr().out)["records"]
    assert sum(r["action"] != "skipped" for r in records) == 4 and "overrides forward" not in str(records)
