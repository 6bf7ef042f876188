"""Downsamplers that are not strided convs or pools: strided slices, space-to-depth, downscaling
interpolation and LP pools are found, blurred at every feature-map shape, and polyphase-sampled
into exact invariance (``fxblur.passes.BlurSubsampling``, ``fxblur.analysis.subsampling``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from blur_reference import reference_blur
from torch import nn

import fxblur
from fxblur.analysis.subsampling import read_subsampling
from fxblur.evaluation.invariance import check_invariance
from fxblur.record import Action, changes
from support import layer_shapes


class Lambda(nn.Module):
    """One expression of ``x``, for one-op graphs."""

    def __init__(self, body) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (lambda x: x[..., ::2, ::2], ("slice", (-2, -1), (2, 2))),
        (lambda x: x[:, :, 1::2, ::3], ("slice", (2, 3), (2, 3))),
        (lambda x: x[..., 1::2], ("slice", (-1,), (2,))),
        (lambda x: x[:, 0::2, 1::2, :], ("slice", (1, 2), (2, 2))),  # channels-last, as Swin slices
        (lambda x: x[..., 1::2, 0::2, :], ("slice", (-3, -2), (2, 2))),
        (lambda x: F.pixel_unshuffle(x, 2), ("space_to_depth", (-2, -1), (2, 2))),
        (lambda x: torch.pixel_unshuffle(x, downscale_factor=4), ("space_to_depth", (-2, -1), (4, 4))),
        (lambda x: F.interpolate(x, scale_factor=0.5), ("interpolate", None, (2,))),
        (lambda x: F.interpolate(x, scale_factor=(0.5, 0.25), mode="bilinear"), ("interpolate", (-2, -1), (2, 4))),
    ],
)
def test_every_form_is_read_with_its_axes_and_factors(body, expected) -> None:
    gm = fx.symbolic_trace(Lambda(body))
    (op,) = [o for n in gm.graph.nodes if (o := read_subsampling(n, gm)) is not None]
    assert (op.kind, op.axes, op.stride) == expected


@pytest.mark.parametrize(
    "body",
    [
        lambda x: x[..., 1:-1, 1:-1],  # a crop
        lambda x: x[..., 0:8:2, ::2],  # strided, but stops early: a crop too
        lambda x: x[..., 3::2],  # starts past its step: drops a sample
        lambda x: x[:, ::2],  # an NCHW map's channels
        lambda x: x[::2],  # the batch
        lambda x: F.interpolate(x, size=(8, 8)),  # a size: its factor depends on the input
        lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True),  # filters itself
        lambda x: F.interpolate(x, scale_factor=2.0),
        lambda x: F.interpolate(x, scale_factor=0.3),
    ],
)
def test_what_is_not_a_subsampling_is_not_read_as_one(body) -> None:
    gm = fx.symbolic_trace(Lambda(body))
    assert [o for n in gm.graph.nodes if (o := read_subsampling(n, gm)) is not None and o.downsamples] == []


def test_a_slice_of_the_channels_is_not_blurred_and_breaks_no_claim() -> None:
    model = Stage(Lambda(lambda x: x[:, ::2]), 4)
    with pytest.warns(fxblur.NoEffectWarning):
        gm = fxblur.transform(model, replace_subsampling=True, verbose=False)
    assert changes(gm) == []
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
    assert fxblur.record_of(gm).verdict_at((1, 3, 16, 16)).exact


LAYERS = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}


class Stage(nn.Module):
    """conv -> norm -> act -> the downsampler -> conv -> norm -> act -> global mean: a CNN stage."""

    def __init__(self, downsample, channels_in: int = 8, channels_out: int | None = None, dims: int = 2) -> None:
        super().__init__()
        conv, norm = LAYERS[dims]
        out = channels_out or 8
        self.stem = nn.Sequential(conv(3, 8, 3, padding=1), norm(8), nn.ReLU())
        self.downsample = downsample
        self.body = nn.Sequential(conv(channels_in, out, 3, padding=1), norm(out), nn.ReLU())
        self.dims = dims

    def forward(self, x):
        x = self.downsample(self.stem(x))
        return self.body(x).mean(tuple(range(2, 2 + self.dims)))


class PatchMerging(nn.Module):
    """Swin's: four strided slices of a channels-last map, concatenated, then a linear layer."""

    def __init__(self, channels: int = 8, ellipsis: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * channels)
        self.reduction = nn.Linear(4 * channels, channels)
        self.ellipsis = ellipsis

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        if self.ellipsis:
            parts = [x[..., i::2, j::2, :] for j in (0, 1) for i in (0, 1)]
        else:
            parts = [x[:, i::2, j::2, :] for j in (0, 1) for i in (0, 1)]
        return self.reduction(self.norm(torch.cat(parts, -1))).permute(0, 3, 1, 2)


# name -> (model, the sizes its original runs at, input rank)
DOWNSAMPLERS = {
    "slice": (lambda: Stage(Lambda(lambda x: x[..., ::2, ::2])), (32, 33), 2),
    "offset slice": (lambda: Stage(Lambda(lambda x: x[:, :, 1::2, 1::2])), (32, 33), 2),
    "slice by 4": (lambda: Stage(Lambda(lambda x: x[..., ::4, ::4])), (32, 35), 2),
    "slice along the width": (lambda: Stage(Lambda(lambda x: x[..., ::2])), (32, 33), 2),
    "patch merging": (lambda: Stage(PatchMerging()), (32,), 2),
    "patch merging, ellipsis": (lambda: Stage(PatchMerging(ellipsis=True)), (32,), 2),
    "PixelUnshuffle": (lambda: Stage(nn.PixelUnshuffle(2), 32), (32,), 2),
    "pixel_unshuffle": (lambda: Stage(Lambda(lambda x: F.pixel_unshuffle(x, 2)), 32), (32,), 2),
    "nearest 0.5": (lambda: Stage(Lambda(lambda x: F.interpolate(x, scale_factor=0.5))), (32, 33), 2),
    "bilinear 0.5": (lambda: Stage(Lambda(lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear"))), (32, 33), 2),
    "Upsample 0.5": (lambda: Stage(nn.Upsample(scale_factor=0.5)), (32, 33), 2),
    "LPPool2d": (lambda: Stage(nn.LPPool2d(2, 2)), (32, 33), 2),
    "lp_pool2d": (lambda: Stage(Lambda(lambda x: F.lp_pool2d(x, 3, 2, stride=2))), (32, 33), 2),
    "1-D slice": (lambda: Stage(Lambda(lambda x: x[..., ::2]), dims=1), (32, 33), 1),
    "3-D nearest 0.5": (lambda: Stage(Lambda(lambda x: F.interpolate(x, scale_factor=0.5)), dims=3), (16, 17), 3),
    "3-D LPPool3d": (lambda: Stage(nn.LPPool3d(1, 2), dims=3), (16, 17), 3),
}


def model_named(name: str) -> nn.Module:
    torch.manual_seed(0)
    return DOWNSAMPLERS[name][0]().eval()


def shapes_of(name: str) -> list[tuple[int, ...]]:
    _, sizes, dims = DOWNSAMPLERS[name]
    return [(2, 3, *([size] * dims)) for size in sizes]


SUBSAMPLING = dict(replace_subsampling=True, replace_avgpools=True, replace_convs=False, replace_maxpools=False)


@pytest.mark.parametrize("name", DOWNSAMPLERS)
def test_every_downsampler_is_blurred_at_every_feature_map_shape(name) -> None:
    model = model_named(name)
    gm = fxblur.transform(model, **SUBSAMPLING, verbose=False)
    assert {c.action for c in changes(gm)} == {Action.BLUR_BEFORE}
    for shape in shapes_of(name):
        x = torch.randn(shape)
        assert layer_shapes(gm, x) == layer_shapes(model, x), shape
        assert gm(x).shape == model(x).shape


@pytest.mark.parametrize("name", DOWNSAMPLERS)
def test_polyphase_sampling_makes_every_downsampler_exactly_invariant(name) -> None:
    model = model_named(name)
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
    even = shapes_of(name)[0]
    assert {c.action for c in changes(gm)} == {Action.PHASE_BEFORE}
    verdict = fxblur.record_of(gm).verdict_at(even)
    assert verdict.exact, verdict.line()
    assert check_invariance(gm, even, structured=False).worst < 1e-9
    assert check_invariance(model, even, structured=False).worst > 1e-3  # the original is not


@pytest.mark.parametrize("name", [n for n, (_, sizes, _) in DOWNSAMPLERS.items() if len(sizes) > 1])
def test_a_size_the_stride_does_not_divide_is_not_claimed(name) -> None:
    model = model_named(name)
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
    odd = shapes_of(name)[1]
    verdict = fxblur.record_of(gm).verdict_at(odd)
    assert not verdict.exact
    gm(torch.randn(odd))  # still runs


class Halve(nn.Module):
    def __init__(self, channels_last: bool = False, step: int = 2) -> None:
        super().__init__()
        self.channels_last, self.step = channels_last, step

    def forward(self, x):
        if self.channels_last:
            return x.permute(0, 2, 3, 1)[:, :: self.step, :: self.step, :]
        return x[..., :: self.step, :: self.step]


@pytest.mark.parametrize("mode", ["reflect", "replicate", "zeros", "circular"])
@pytest.mark.parametrize(("step", "taps"), [(2, 3), (4, 5)])
def test_the_blur_before_a_slice_is_the_reference_blur(mode, step, taps) -> None:
    x = torch.randn(2, 4, 13, 12, dtype=torch.float64)
    expected = reference_blur(x, (1, 1), (taps, taps), mode)[..., ::step, ::step]
    for channels_last in (False, True):
        gm = fxblur.transform(Halve(channels_last, step), replace_subsampling=True, padding_mode=mode, verbose=False)
        out = gm(x)
        got = out.permute(0, 3, 1, 2) if channels_last else out
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_the_blur_before_an_unshuffle_and_an_interpolation_is_the_reference_blur() -> None:
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    blurred = reference_blur(x, (1, 1), (3, 3), "reflect")
    for op, reference in [
        (lambda x: F.pixel_unshuffle(x, 2), F.pixel_unshuffle(blurred, 2)),
        (lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear"), F.interpolate(blurred, scale_factor=0.5,
                                                                                      mode="bilinear")),
    ]:  # fmt: skip
        gm = fxblur.transform(Lambda(op), replace_subsampling=True, verbose=False)
        torch.testing.assert_close(gm(x), reference, rtol=0, atol=1e-12)


def test_subsampling_is_left_alone_by_default_and_taken_under_polyphase() -> None:
    model = model_named("slice")
    with pytest.warns(fxblur.NoEffectWarning):
        plain = fxblur.transform(model, verbose=False)
    assert changes(plain) == []
    assert [c.op for c in changes(fxblur.transform(model, polyphase=True, verbose=False))] == ["strided_slice"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxblur.NoEffectWarning)
        off = fxblur.transform(model, polyphase=True, replace_subsampling=False, verbose=False)
    assert not fxblur.record_of(off).verdict_at((1, 3, 32, 32)).exact


def test_an_excluded_slice_is_skipped_with_the_pattern() -> None:
    model = model_named("slice")
    with pytest.warns(fxblur.NoEffectWarning):
        gm = fxblur.transform(model, replace_subsampling=True, exclude=("downsample.*",), verbose=False)
    (change,) = changes(gm)
    assert change.action is Action.SKIPPED and "downsample.*" in change.reason


def test_fixed_phase_blurpool_on_a_slice_is_not_claimed_invariant() -> None:
    gm = fxblur.transform(model_named("slice"), replace_subsampling=True, circular_padding=True, verbose=False)
    verdict = fxblur.record_of(gm).verdict_at((1, 3, 32, 32))
    assert not verdict.exact and "2x2" in verdict.line()
