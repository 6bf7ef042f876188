"""The equivariance analysis (``fxblur.analysis``): one test per rule, each claim checked against measurement.

Every case builds a small model, asks the analysis, and measures the model with
``fxblur.check_invariance`` in float64: where the analysis says exact, nothing moves beyond
float rounding; where it names a break, the output does move, and the break names the op.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxblur
from fxblur.analysis.equivariance import BreakKind, analyse
from fxblur.evaluation.invariance import check_invariance
from fxblur.ops.polyphase import phase_of, roll_to_phase
from fxblur.record import flat_graph_module
from fxblur.trace import trace

SHAPE = (1, 3, 16, 16)


def circular(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    padding = dilation * (k - 1) // 2
    return nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, padding_mode="circular")


class Head(nn.Module):
    """Global average pool, then a linear layer: invariant along every axis."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, 5)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class Wrap(nn.Module):
    """A body given as a function of (module, x), for one-off graphs."""

    def __init__(self, body, **modules) -> None:
        super().__init__()
        self.body = body
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, x):
        return self.body(self, x)


def verdict(model: nn.Module, shape=SHAPE):
    return analyse(fx.GraphModule(model, trace(model.eval()).graph), torch.empty(shape))


def moves(model: nn.Module, shape=SHAPE) -> float:
    torch.manual_seed(0)
    for parameter in model.parameters():  # no zero-initialised bias hides an obstacle
        nn.init.normal_(parameter, std=0.5)
    return check_invariance(model, shape, structured=False).worst


def assert_exact(model: nn.Module, shape=SHAPE) -> None:
    found = verdict(model, shape)
    assert found.exact, found.line()
    assert moves(model, shape) < 1e-9


def assert_breaks(model: nn.Module, kind: BreakKind, where: str, shape=SHAPE) -> None:
    found = verdict(model, shape)
    assert not found.exact
    assert [(b.kind, b.where) for b in found.breaks][:1] == [(kind, where)], found.line()
    assert moves(model, shape) > 1e-6


# -- what holds for every op ------------------------------------------------------------------


def test_anything_after_a_global_pool_is_invariant():
    head = nn.Sequential(nn.Linear(8, 8), nn.Softmax(1))
    assert_exact(nn.Sequential(circular(3, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head))


def test_an_op_without_a_rule_breaks_what_follows_the_shifts():
    model = Wrap(lambda m, x: m.head(torch.cumsum(m.conv(x), 3)), conv=circular(3, 8), head=Head(8))
    assert_breaks(model, BreakKind.UNKNOWN, "cumsum")


def test_a_module_with_code_fxblur_does_not_see_breaks():
    class Opaque(nn.Module):
        def forward(self, x):
            return x.flip(-1)

    model = nn.Sequential(circular(3, 8), Opaque(), nn.AdaptiveAvgPool2d(1))

    class Leaves(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Opaque) or super().is_leaf_module(m, name)

    gm = fx.GraphModule(model, Leaves().trace(model))
    found = analyse(gm, torch.empty(SHAPE))
    assert [b.kind for b in found.breaks] == [BreakKind.UNKNOWN] and "Opaque" in found.breaks[0].reason


# -- pointwise ----------------------------------------------------------------------------------


def test_per_channel_constants_keep_equivariance_and_positional_ones_break():
    scale = nn.Parameter(torch.randn(1, 8, 1, 1))
    model = Wrap(lambda m, x: m.head(F.gelu(m.conv(x)) * m.scale + 1.0), conv=circular(3, 8), head=Head(8))
    model.scale = scale
    assert_exact(model)
    model.scale = nn.Parameter(torch.randn(1, 8, 16, 16))  # a learned positional embedding
    assert_breaks(model, BreakKind.POSITIONAL, "mul")


def test_joining_maps_of_different_resolutions_breaks():
    def body(m, x):
        a = m.down(x)
        return m.head(torch.cat([a, F.avg_pool2d(m.conv(x), 2)], 1))  # one phase fixed, one not: misaligned?

    # both subsample at a fixed phase by 2: they line up; the lattice is coarsened, not broken
    model = Wrap(body, down=circular(3, 4, stride=2), conv=circular(3, 4), head=Head(8))
    found = verdict(model)
    assert not found.breaks and [b.kind for b in found.fixed] == [BreakKind.FIXED_PHASE] * 2
    assert "multiples of 2x2" in found.line()


# -- window ops -------------------------------------------------------------------------------------


def test_a_conv_padded_circularly_to_its_size_keeps_equivariance():
    assert_exact(nn.Sequential(circular(3, 8, 5, dilation=2), circular(8, 8, 1), nn.AdaptiveAvgPool2d(1)))


def test_zero_padding_breaks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    assert_breaks(model, BreakKind.PADDING, "0 (conv2d)")


def test_a_conv_that_crops_or_grows_the_map_breaks():
    assert_breaks(nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1)), BreakKind.SIZE, "0 (conv2d)")
    even = nn.Conv2d(3, 8, 2, padding=1, padding_mode="circular")  # an even kernel padded by k/2: one more
    assert_breaks(nn.Sequential(even, nn.AdaptiveAvgPool2d(1)), BreakKind.SIZE, "0 (conv2d)")


def test_a_pool_with_ceil_mode_windows_past_the_map_breaks():
    pool = nn.Sequential(nn.AvgPool2d(3, 2, 0, ceil_mode=True), nn.AdaptiveAvgPool2d(1))
    assert_breaks(pool, BreakKind.PADDING, "0 (avg_pool2d)")


def test_a_fixed_phase_stride_follows_only_shifts_by_its_multiples():
    model = nn.Sequential(circular(3, 8, stride=2), circular(8, 8, stride=2), nn.AdaptiveAvgPool2d(1))
    found = verdict(model)
    assert not found.exact and not found.breaks and found.outputs[0].lattice == (4, 4)
    assert check_invariance(model, SHAPE, shifts=[(4, 8), (-4, 12)], structured=False).worst < 1e-9
    assert check_invariance(model, SHAPE, shifts=[(1, 0)], structured=False).worst > 1e-6


def test_a_size_the_stride_does_not_divide_breaks():
    model = nn.Sequential(circular(3, 8, stride=2), nn.AdaptiveAvgPool2d(1))
    assert_breaks(model, BreakKind.SIZE, "0 (conv2d)", shape=(1, 3, 15, 16))


def test_a_conv_subclass_with_its_own_forward_is_not_trusted():
    class Standardised(nn.Conv2d):
        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)  # ignores padding_mode

    conv = Standardised(3, 8, 3, padding=1, padding_mode="circular")
    assert_breaks(nn.Sequential(conv, nn.AdaptiveAvgPool2d(1)), BreakKind.UNKNOWN, "0 (conv2d)")


def test_a_pool_over_a_whole_axis_is_a_global_pool():
    model = Wrap(lambda m, x: m.head(F.avg_pool2d(m.conv(x), (16, 1)).mean(3, keepdim=True)), conv=circular(3, 8),
                 head=Head(8))  # fmt: skip
    assert_exact(model)


def test_circular_f_pad_before_an_unpadded_conv_is_a_circular_conv_and_other_modes_break():
    conv = nn.Conv2d(3, 8, 3)
    model = Wrap(lambda m, x: m.head(m.conv(F.pad(x, (1, 1, 1, 1), mode="circular"))), conv=conv, head=Head(8))
    assert_exact(model)
    model.body = lambda m, x: m.head(m.conv(F.pad(x, (1, 1, 1, 1), mode="reflect")))
    assert_breaks(model, BreakKind.PADDING, "pad")


@pytest.mark.filterwarnings("ignore::fxblur.NoEffectWarning")  # nothing strided: circular padding only
def test_padding_layers_pad_as_their_mode_says_and_circular_padding_makes_them_wrap_around():
    model = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, 8, 3), nn.ZeroPad2d(2), nn.Conv2d(8, 8, 5),
                          nn.CircularPad2d(1), nn.Conv2d(8, 8, 3), Head(8))  # fmt: skip
    assert_breaks(model, BreakKind.PADDING, "0 (ReflectionPad2d)")
    gm = fxblur.transform(model, circular_padding=True, verbose=False)
    padding = [type(gm.get_submodule(path)).__name__ for path in ("0", "2", "4")]
    assert padding == ["CircularPad", "CircularPad", "CircularPad2d"]
    assert fxblur.record_of(gm).verdict_at(SHAPE).exact
    assert moves(gm) < 1e-9
    assert type(model[0]).__name__ == "ReflectionPad2d"  # the original keeps its padding


def test_a_padding_layer_ahead_of_a_blurred_pool_pads_what_the_pool_reads():
    """BiT's stem: the padding moves past the blur and the phase selection, to the pool's input."""
    model = nn.Sequential(circular(3, 16), nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2), Head(16))
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
    assert fxblur.record_of(gm).verdict_at(SHAPE).exact, fxblur.record_of(gm).verdict_at(SHAPE).line()
    (pool,) = [node for node in flat_graph_module(gm).graph.nodes if node.target == "2"]
    padding = pool.args[0]
    assert padding.target == "1" and padding.args[0].name.startswith("roll_to_phase")  # the selected phase, padded
    assert moves(gm) < 1e-9  # test_reach.py: BiT itself, every shape kept
    assert type(model[1]) is nn.ConstantPad2d and len(list(model.children())) == 4  # the original is untouched


# -- reductions, layout, indexing, joins --------------------------------------------------------------


def test_a_non_global_adaptive_pool_breaks():
    model = nn.Sequential(circular(3, 8), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))
    assert_breaks(model, BreakKind.LOCAL_POOL, "1 (AdaptiveAvgPool2d)")
    model = Wrap(lambda m, x: m.fc(F.adaptive_avg_pool2d(m.conv(x), 2).flatten(1)), conv=circular(3, 8),
                 fc=nn.Linear(32, 5))  # fmt: skip
    assert_breaks(model, BreakKind.LOCAL_POOL, "adaptive_avg_pool2d")


def test_permutes_move_the_axes_and_flattening_them_breaks():
    norm = nn.LayerNorm(8)
    model = Wrap(lambda m, x: m.head(m.norm(m.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)),
                 conv=circular(3, 8), norm=norm, head=Head(8))  # fmt: skip
    assert_exact(model)
    flat = nn.Sequential(circular(3, 4), nn.Flatten(), nn.Linear(4 * 256, 5))
    assert_breaks(flat, BreakKind.LAYOUT, "1 (Flatten)")


def test_a_linear_layer_over_the_channels_of_a_channels_last_map_keeps_equivariance():
    model = Wrap(lambda m, x: m.fc(m.conv(x).permute(0, 2, 3, 1)).mean((1, 2)), conv=circular(3, 8),
                 fc=nn.Linear(8, 5))  # fmt: skip
    assert_exact(model)


def test_slicing_channels_keeps_and_cropping_or_indexing_a_spatial_axis_breaks():
    assert_exact(Wrap(lambda m, x: m.head(m.conv(x)[:, 2:6]), conv=circular(3, 8), head=Head(4)))
    assert_breaks(Wrap(lambda m, x: m.head(m.conv(x)[..., 1:-1, :]), conv=circular(3, 8), head=Head(8)),
                  BreakKind.LAYOUT, "getitem")  # fmt: skip
    assert_breaks(Wrap(lambda m, x: m.conv(x)[..., 0, 0], conv=circular(3, 8)), BreakKind.LAYOUT, "getitem")


def test_a_strided_slice_subsamples_at_a_fixed_phase():
    found = verdict(Wrap(lambda m, x: m.head(m.conv(x)[..., ::2, ::2]), conv=circular(3, 8), head=Head(8)))
    assert not found.breaks and found.outputs[0].lattice == (2, 2)


def test_cat_and_chunk_along_channels_keep_equivariance_and_along_space_break():
    def channels(m, x):
        pieces = torch.chunk(m.conv(x), 2, 1)
        return m.head(torch.cat([pieces[1], pieces[0] * 2], 1))

    assert_exact(Wrap(channels, conv=circular(3, 8), head=Head(8)))
    along_width = Wrap(lambda m, x: torch.cat([m.conv(x), m.conv(x) * 2], 3), conv=circular(3, 8))
    assert_breaks(along_width, BreakKind.LAYOUT, "cat")


def test_norms_keep_equivariance_and_a_layer_norm_weight_over_space_breaks():
    assert_exact(nn.Sequential(circular(3, 8), nn.GroupNorm(2, 8), nn.InstanceNorm2d(8), nn.BatchNorm2d(8),
                               nn.AdaptiveAvgPool2d(1)))  # fmt: skip
    assert_exact(nn.Sequential(circular(3, 8), nn.LayerNorm([8, 16, 16], elementwise_affine=False),
                               nn.AdaptiveAvgPool2d(1)))  # fmt: skip
    model = nn.Sequential(circular(3, 8), nn.LayerNorm([8, 16, 16]), nn.AdaptiveAvgPool2d(1))
    assert_breaks(model, BreakKind.POSITIONAL, "1 (LayerNorm)")


def test_a_dense_output_at_full_resolution_is_equivariant():
    model = nn.Sequential(circular(3, 8), nn.ReLU(), circular(8, 2, 1))
    found = verdict(model)
    assert found.exact and found.property_name == "equivariance" and found.outputs[0].kind == "equivariant"
    assert moves(model) < 1e-9


# -- polyphase ---------------------------------------------------------------------------------------


def aps_stride(conv: nn.Conv2d):
    """The cheap form of polyphase sampling by hand: choose the phase, roll to it, the conv at its stride."""

    def body(m, x):
        return m.head(m.conv(roll_to_phase(x, phase_of(x, [2, 2]))))

    return Wrap(body, conv=conv, head=Head(conv.out_channels))


def test_a_map_rolled_to_its_phase_keeps_every_shift_through_a_stride():
    assert_exact(aps_stride(circular(3, 8, stride=2)))


def test_a_phase_from_another_map_misaligns():
    def body(m, x):
        small = m.down(x)  # at half resolution
        phase = phase_of(small, [2, 2])
        return m.head(m.conv(roll_to_phase(x, phase)))  # full-resolution map rolled by it

    model = Wrap(body, down=circular(3, 3, stride=2), conv=circular(3, 8, stride=2), head=Head(8))
    assert_breaks(model, BreakKind.MISALIGNED, "roll_to_phase")


def test_maps_subsampled_at_phases_chosen_apart_do_not_join():
    def body(m, x):
        a = m.a(roll_to_phase(x, phase_of(x, [2, 2])))
        y = m.pre(x)
        b = m.b(roll_to_phase(y, phase_of(y, [2, 2])))
        return m.head(F.relu(a + b))  # pooled after a nonlinearity: the misalignment shows

    model = Wrap(body, a=circular(3, 8, stride=2), pre=circular(3, 3), b=circular(3, 8, stride=2), head=Head(8))
    assert_breaks(model, BreakKind.MISALIGNED, "add")


def test_the_report_says_what_the_analysis_proves_at_the_shape_given():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
    assert fxblur.record_of(gm).verdict_at((1, 3, 32, 32)).exact
    odd = fxblur.record_of(gm).verdict_at((1, 3, 33, 32))
    assert not odd.exact and odd.breaks[0].kind is BreakKind.SIZE
    assert check_invariance(gm, (1, 3, 33, 32), structured=False).worst > 1e-6
    assert "shift invariance: not exact at 1x3x33x32" in str(fxblur.report(gm, (1, 3, 33, 32)))
    fixed = fxblur.transform(model, circular_padding=True, min_channels=0, verbose=False)  # BlurPool, circular
    assert "follows only shifts by multiples of 2x2" in fxblur.report(fixed, (1, 3, 32, 32)).summary()


@pytest.mark.parametrize("options", [{}, {"blur_first": False}, {"past_nonlinearity": True}])
def test_polyphase_resnet_claims_hold_under_measurement(options):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False, **options)
    assert fxblur.record_of(gm).verdict_at((1, 3, 64, 64)).exact
    assert check_invariance(gm, (1, 3, 64, 64), structured=False).worst < 1e-9
    assert not fxblur.record_of(fxblur.transform(model, polyphase=True, verbose=False)).verdict_at((1, 3, 64, 64)).exact
