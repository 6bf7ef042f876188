"""Polyphase sampling: exact invariance to circular shifts, phase groups, and the rest of fxblur's guarantees."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxblur
from support import layer_shapes

PLACEMENTS = {
    "phase_before": {},
    "phase_after": {"blur_first": False},
    "phase_past_nonlinearity": {"past_nonlinearity": True},
}
SHIFTS = [(1, 0), (0, 3), (-13, 2), (17, 31)]  # each axis alone, then both; odd and even, small and large


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"init_weights": False} if name == "googlenet" else {}
        return torchvision.models.get_model(name, **kwargs).eval()


def worst_move(model: nn.Module, x: torch.Tensor) -> tuple[float, bool]:
    """The largest change of the logits under the circular shifts, relative to their size; and whether top-1 held."""
    with torch.no_grad():
        y = model(x)
        worst, same_class = 0.0, True
        for shift in SHIFTS:
            moved = model(torch.roll(x, shift, (2, 3)))
            same_class &= torch.equal(moved.argmax(1), y.argmax(1))
            worst = max(worst, ((moved - y).abs().max() / y.abs().max()).item())
    return worst, same_class


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large", "shufflenet_v2_x1_0"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_logits_do_not_move_under_circular_shifts(name, placement):
    model = build(name)
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False, **PLACEMENTS[placement])
    # pools take blur_first's placement; a conv with no per-channel op after it selects right after
    assert {c.action for c in fxblur.changes(gm)} <= {
        placement,
        "phase_subsample_before",
        "phase_before",
        "phase_after",
    }
    assert fxblur.record_of(gm).verdict_at((2, 3, 64, 64)).exact
    x = torch.randn(2, 3, 64, 64)
    moved, same_class = worst_move(gm, x)
    assert moved <= 1e-5 and same_class
    assert moved * 100 < worst_move(model, x)[0]  # the original moves by far more


def test_resnet50_phase_groups_pair_each_strided_conv_with_its_shortcut():
    gm = fxblur.transform(build("resnet50"), polyphase=True, verbose=False)
    groups = {c.target: c.phase_group for c in fxblur.changes(gm)}
    assert groups["conv1"] == "conv1" and groups["maxpool"] == "maxpool"
    for n in (2, 3, 4):
        assert groups[f"layer{n}.0.conv2"] == groups[f"layer{n}.0.downsample.0"] == f"layer{n}.0.conv2"
    assert len(set(groups.values())) == 5
    report = fxblur.report(gm)
    assert "phase group" in report.table() and "layer2.0.conv2" in report.table()


def test_the_cheap_form_chooses_a_group_phase_once_on_the_block_input():
    gm = fxblur.transform(build("resnet18"), polyphase=True, verbose=False)
    code = gm.layer2[0].code
    # conv2's blurred input and the shortcut's input are rolled by the phase; the shortcut then subsamples
    assert code.count("phase_of(") == 1 and code.count("roll_to_phase(") == 2 and "select_phase(" not in code
    assert "phase_of(x, [2, 2], 'l2')" in code  # the block's input: conv1's and the shortcut's source


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_resnet_blocks_stay_modules_with_their_shortcut_unchanged(placement):
    gm = fxblur.transform(build("resnet50"), polyphase=True, verbose=False, **PLACEMENTS[placement])
    assert fxblur.report(gm).nesting.inlined == ()
    for n in (2, 3, 4):
        shortcut = gm.get_submodule(f"layer{n}.0.downsample")
        assert type(shortcut) is nn.Sequential  # the phase is applied where the block chose it, and handed down
    x = torch.randn(1, 3, 64, 64)
    seen = []
    for n in (2, 3, 4):  # blocks are still modules that hooks see
        gm.get_submodule(f"layer{n}.0").register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        gm(x)
    assert [s[1] for s in seen] == [512, 1024, 2048]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("size", [64, 67])
def test_every_feature_map_keeps_its_shape(placement, size):
    model = build("googlenet")  # ceil_mode pools
    for circular in (False, True):
        gm = fxblur.transform(model, polyphase=True, circular_padding=circular, verbose=False, **PLACEMENTS[placement])
        x = torch.randn(1, 3, size, size)
        expected, got = layer_shapes(model, x), layer_shapes(gm, x)
        assert got.keys() == expected.keys()
        for path, shapes in expected.items():
            for call, shape in enumerate(shapes):
                assert got[path][call][:2] == shape[:2]
                if placement == "phase_before":  # past the nonlinearity, enlarged maps are expected
                    assert got[path][call] == shape, (path, call)


def test_strides_above_two_select_among_all_their_phases():
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    for options in ({}, {"blur_first": False}):
        gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False, **options)
        assert fxblur.changes(gm)[0].action != "skipped"
        x = torch.randn(2, 3, 32, 32)
        assert worst_move(gm, x)[0] <= 1e-5


def test_a_cropping_conv_is_named_as_what_breaks_invariance():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, stride=2, padding=1))  # the first crops
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
    (where,) = fxblur.record_of(gm).verdict.breaks
    assert (where.where, where.kind) == ("0 (conv2d)", "size") and "from 224 to 222" in where.reason
    assert "0 (conv2d): changes the map's size from 224 to 222" in str(fxblur.report(gm))


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = F.cross_entropy(gm(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10  # it fits the batch, as the plain model does
    assert all(p.grad is not None for p in gm.parameters())


@pytest.mark.parametrize("placement", ["phase_after"])  # phase_before: test_compat.py's "resnet18 polyphase"
def test_compile_fullgraph_and_export_match_eager(placement):
    model = build("resnet18")
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False, **PLACEMENTS[placement])
    x = torch.randn(2, 3, 64, 64)
    expected = gm(x)
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
    program = torch.export.export(gm, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-5)
    shifted = torch.roll(x, (3, 5), (2, 3))
    torch.testing.assert_close(program.module()(shifted), expected, rtol=1e-4, atol=1e-5)  # still invariant


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"past_nonlinearity": True},
        {"preset": "zhang2019"},
        {"circular_padding": True},
        {"polyphase": True},
        {"polyphase": True, "circular_padding": True},
        {"polyphase": True, "circular_padding": True, "blur_first": False},
        {"polyphase": True, "circular_padding": True, "past_nonlinearity": True},
        {"preset": "aps"},
    ],
)
def test_transforming_again_changes_nothing(options):
    model = build("resnet18")
    once = fxblur.transform(model, verbose=False, **options)
    with pytest.warns(fxblur.NoEffectWarning, match="anti-aliased already"):
        twice = fxblur.transform(once, verbose=False, **options)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(twice(x), once(x), rtol=0, atol=0)
    if options.get("circular_padding") or options.get("preset") == "aps":  # the claim holds the second time too
        assert fxblur.record_of(twice).verdict_at((2, 3, 64, 64)) == fxblur.record_of(once).verdict_at((2, 3, 64, 64))
