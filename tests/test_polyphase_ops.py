"""The runtime ops of adaptive polyphase sampling: a brute-force reference, and the shift property.

``phase_of``, ``roll_to_phase`` and ``select_phase`` must equal a loop over the components
that rolls and slices by the definition, ties included, on every grid of dims, strides and
sizes; and a circular shift of the input must move the chosen phase and roll the selected
component, which is what makes APS exactly shift invariant. They must also go through every
way a rewritten graph may run: autograd, vmap, ``torch.compile``, export, TorchScript, fx.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.fx
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from fxblur.ops import polyphase
from fxblur.ops.polyphase import NORMS, phase_of, roll_to_phase, select_phase
from support import examples

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def component(sample: Tensor, offsets: list[int], stride: list[int]) -> Tensor:
    """Component ``offsets`` of one sample (C, *spatial), by the definition: roll, then slice."""
    axes = list(range(-len(stride), 0))
    rolled = torch.roll(sample, [-p for p in offsets], axes)
    return rolled[(..., *(slice(None, None, s) for s in stride))]


def reference_phase(x: Tensor, stride: list[int], norm: str) -> Tensor:
    """Per sample, the component with the largest keys (``fxblur.ops.polyphase._component_keys``), by trying all.

    With Python's integers on integer-valued inputs, by the documented rule: contributions
    scaled by the sample's largest and rounded to 40 bits; the norm (for linf, the largest
    value, then the sum); then per axis the sum of ``q[i] * q[i + 1] ** 2`` over 10-bit values,
    wrapping around the component; the first component wins what ties remain.
    """
    phases = []
    for sample in x.double():
        contributions = {"l2": sample.square().sum(0), "l1": sample.abs().sum(0), "linf": sample.abs().amax(0)}[norm]
        top = max(int(contributions.max().item()), 1)
        quantised = (contributions.long() * 2**41 + top) // (2 * top)  # round(c / top * 2**40), exactly
        best, best_keys = None, None
        for offsets in itertools.product(*(range(s) for s in stride)):
            part = component(quantised.unsqueeze(0), list(offsets), stride)[0]
            keys = ([int(part.max())] if norm == "linf" else []) + [int(part.sum())]
            coarse = part // 2**30
            keys += [int((coarse * torch.roll(coarse, -1, axis) ** 2).sum()) for axis in range(coarse.dim())]
            if best_keys is None or keys > best_keys:
                best, best_keys = list(offsets), keys
        phases.append(best)
    return torch.tensor(phases)


def reference_select(x: Tensor, phase: Tensor, stride: list[int]) -> Tensor:
    return torch.stack([component(sample, p.tolist(), stride) for sample, p in zip(x, phase, strict=True)])


def per_sample_roll(x: Tensor, shifts: Tensor) -> Tensor:
    axes = list(range(-shifts.shape[1], 0))
    return torch.stack([torch.roll(sample, s.tolist(), axes) for sample, s in zip(x, shifts, strict=True)])


def channels_last(x: Tensor) -> Tensor:
    """``x`` with its channels innermost in memory: channels_last(_3d) for 2-d and 3-d maps, (N, L, C) for 1-d."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def is_channels_last(x: Tensor) -> bool:
    return x.movedim(1, -1).is_contiguous()


@st.composite
def grids(draw, divisible: bool = False):
    """(batch, channels, sizes, stride): dims 1-3, strides 1-4, sizes 1-9 (multiples of the stride if asked)."""
    dims = draw(st.integers(1, 3))
    stride = [draw(st.integers(1, 4)) for _ in range(dims)]
    if divisible:
        sizes = [s * draw(st.integers(1, 3)) for s in stride]
    else:
        sizes = [draw(st.integers(1, 9)) for _ in range(dims)]
    return draw(st.integers(1, 3)), draw(st.integers(1, 3)), sizes, stride


@examples(200)
@given(
    grid=grids(),
    norm=st.sampled_from(NORMS),
    dtype=st.sampled_from(DTYPES),
    levels=st.integers(1, 20),
    last=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_ops_match_the_brute_force_reference(grid, norm, dtype, levels, last, seed):
    batch, channels, sizes, stride = grid
    generator = torch.Generator().manual_seed(seed)
    # Few small integers make many ties, and every norm exact in every dtype.
    x = torch.randint(-levels, levels + 1, (batch, channels, *sizes), generator=generator).to(dtype)
    x = channels_last(x) if last else x
    phase = phase_of(x, stride, norm)
    assert phase.dtype == torch.int64
    assert torch.equal(phase, reference_phase(x, stride, norm))

    selected = select_phase(x, phase, stride)
    assert torch.equal(selected, reference_select(x, phase, stride))
    assert selected.dtype == dtype
    assert is_channels_last(selected) if last else selected.is_contiguous()

    offsets = torch.randint(-9, 10, phase.shape, generator=generator)  # any integers are offsets
    rolled = roll_to_phase(x, offsets)
    assert torch.equal(rolled, per_sample_roll(x, -offsets))
    assert is_channels_last(rolled) if last else rolled.is_contiguous()
    assert torch.equal(select_phase(x, offsets, stride), rolled[(..., *(slice(None, None, s) for s in stride))])


@examples(100)
@given(grid=grids(divisible=True), norm=st.sampled_from(NORMS), last=st.booleans(), data=st.data())
def test_a_circular_shift_moves_the_phase_and_rolls_the_component(grid, norm, last, data):
    batch, channels, sizes, stride = grid
    shift = data.draw(st.lists(st.integers(-20, 20), min_size=len(sizes), max_size=len(sizes)))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x = torch.randn(batch, channels, *sizes, dtype=torch.float64, generator=generator)  # no ties
    x = channels_last(x) if last else x
    shifted = torch.roll(x, shift, list(range(2, x.dim())))
    t = torch.tensor(shift)

    phase, moved = phase_of(x, stride, norm), phase_of(shifted, stride, norm)
    assert torch.equal(moved, (phase + t) % torch.tensor(stride))

    selected = select_phase(x, phase, stride)
    expected = per_sample_roll(selected, (phase + t).div(torch.tensor(stride), rounding_mode="floor"))
    assert torch.equal(select_phase(shifted, moved, stride), expected)


@pytest.mark.parametrize("norm", NORMS)
def test_components_alike_up_to_a_roll_go_to_the_first_in_row_major_order(norm):
    assert phase_of(torch.ones(2, 3, 8, 8), [4, 4], norm).eq(0).all()
    assert phase_of(torch.zeros(1, 1, 3, 5, 7), [2, 3, 4], norm).eq(0).all()
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 3, 2] = 1.0  # component (1, 0)
    x[0, 1, 2, 3] = -1.0  # component (0, 1), first in row-major order
    assert phase_of(x, [2, 2], norm).tolist() == [[0, 1]]
    # A 1-pixel map under stride 4: all 16 components are that pixel.
    assert phase_of(torch.randn(3, 2, 1, 1), [4, 4], norm).eq(0).all()


@pytest.mark.parametrize("norm", NORMS)
def test_a_tie_between_mirror_images_follows_the_shift(norm):
    # components 0 and 1 hold (1, 3) and (3, 1): the same norms, one the other's mirror image
    x = torch.tensor([[[1.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0]]])
    phase = phase_of(x, [2], norm)
    for shift in range(1, 8):
        moved = phase_of(torch.roll(x, shift, 2), [2], norm)
        assert moved.item() == (phase.item() + shift) % 2, shift


@pytest.mark.parametrize("norm", NORMS)
def test_the_choice_does_not_depend_on_the_order_of_the_samples(norm):
    # a sum in float flips between near-tied components when a shift reorders its terms; an integer sum cannot
    torch.manual_seed(0)
    low = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    x = torch.nn.functional.interpolate(low, scale_factor=4, mode="bilinear", align_corners=False)
    phase = phase_of(x, [2, 2], norm)
    for shift in [(1, 0), (0, 1), (3, 5), (13, -7)]:
        moved = phase_of(torch.roll(x, shift, (2, 3)), [2, 2], norm)
        assert torch.equal(moved, (phase + torch.tensor(shift)) % 2), shift


def test_axes_with_stride_one_get_offset_zero():
    x = torch.randn(4, 3, 5, 6)
    phase = phase_of(x, [1, 2])
    assert phase[:, 0].eq(0).all()
    assert torch.equal(select_phase(x, phase, [1, 2]), reference_select(x, phase, [1, 2]))


def test_offsets_may_have_any_integer_dtype():
    x = torch.randn(2, 3, 5, 6)
    phase = torch.tensor([[1, -2], [7, 3]])
    for dtype in (torch.int32, torch.int16, torch.uint8):
        offsets = phase.remainder(5).to(dtype)
        assert torch.equal(roll_to_phase(x, offsets), roll_to_phase(x, phase.remainder(5)))
        assert torch.equal(select_phase(x, offsets, [2, 3]), select_phase(x, phase.remainder(5), [2, 3]))


def test_phase_of_is_not_differentiable_and_the_selection_is():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    phase = phase_of(x, [2, 2])
    assert not phase.requires_grad
    select_phase(x, phase, [2, 2]).sum().backward()
    assert x.grad.sum() == 2 * 3 * 3 * 3  # every selected sample once


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize(("sizes", "stride"), [([7], [2]), ([5, 4], [2, 3]), ([3, 2, 3], [2, 1, 2])])
def test_gradients_of_every_order(sizes, stride, last):
    x = torch.randn(2, 3, *sizes, dtype=torch.float64)
    x = (channels_last(x) if last else x).requires_grad_()
    phase = phase_of(x, stride)
    for op in (lambda x: select_phase(x, phase, stride), lambda x: roll_to_phase(x, phase)):
        assert torch.autograd.gradcheck(op, x, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(op, x)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("sizes", "grid"), [((7, 9), (4, 3)), ((8, 12), (4, 3))])
def test_meta_tensors_give_shapes(sizes, grid, norm):
    x = torch.empty(2, 8, *sizes, device="meta", dtype=torch.bfloat16)
    phase = phase_of(x, [2, 4], norm)
    assert phase.device.type == "meta"
    assert phase.shape == (2, 2)
    assert phase.dtype == torch.int64
    assert select_phase(x, phase, [2, 4]).shape == (2, 8, *grid)
    assert roll_to_phase(x, phase).shape == x.shape


def aps(x: Tensor) -> Tensor:
    """All three ops together, every norm: the cheap and the published form of stride-2 subsampling."""
    out = x.new_zeros(())
    for norm in NORMS:
        phase = phase_of(x, [2, 2], norm)
        out = out + roll_to_phase(x, phase)[..., ::2, ::2] + select_phase(x, phase, [2, 2])
    return out


SIZES = pytest.mark.parametrize("sizes", [(6, 4), (7, 6)])  # with and without wrapping around


@SIZES
@pytest.mark.parametrize("last", [False, True])
def test_vmap(sizes, last):
    x = torch.randn(4, 2, 3, *sizes)
    x = x.movedim(2, -1).contiguous().movedim(-1, 2) if last else x
    assert torch.equal(torch.func.vmap(aps)(x), torch.stack([aps(slice_) for slice_ in x]))


@SIZES
def test_compile_without_graph_breaks_and_export(sizes):
    x = torch.randn(2, 3, *sizes)
    assert torch.equal(torch.compile(aps, fullgraph=True, backend="eager")(x), aps(x))

    class Aps(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return aps(x)

    exported = torch.export.export(Aps(), (x,))
    assert torch.equal(exported.module()(x), aps(x))


@SIZES
@pytest.mark.parametrize("last", [False, True])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript(sizes, last):
    x = torch.randn(2, 3, *sizes)
    x = channels_last(x) if last else x
    for norm in NORMS:
        phase = phase_of(x, [2, 2], norm)
        assert torch.equal(torch.jit.script(phase_of)(x, [2, 2], norm), phase)
        assert torch.equal(torch.jit.script(select_phase)(x, phase, [2, 2]), select_phase(x, phase, [2, 2]))
        assert torch.equal(torch.jit.script(roll_to_phase)(x, phase), roll_to_phase(x, phase))


def test_fx_tracing_keeps_each_op_one_call():
    def traced(x: Tensor) -> Tensor:
        phase = polyphase.phase_of(x, [2, 2])
        return polyphase.select_phase(polyphase.roll_to_phase(x, phase), phase, [2, 2])

    targets = [node.target for node in torch.fx.symbolic_trace(traced).graph.nodes if node.op == "call_function"]
    assert targets == [phase_of, roll_to_phase, select_phase]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: phase_of(torch.ones(1, 1, 4, 4), [2, 2], "l3"), "unknown norm 'l3'"),
        (lambda: phase_of(torch.ones(1, 1, 4, 4), [2]), "got a 4-d input and 1 strides"),
        (lambda: phase_of(torch.ones(1, 1, 4, 4, 4, 4), [2, 2, 2, 2]), "1 to 3"),
        (lambda: phase_of(torch.ones(1, 4), []), "1 to 3"),
        (lambda: phase_of(torch.ones(1, 1, 4, 4), [2, 0]), "at least 1"),
        (lambda: roll_to_phase(torch.ones(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)), "shape \\[2\\]"),
        (lambda: roll_to_phase(torch.ones(2, 1, 4, 4), torch.zeros(3, 2, dtype=torch.long)), "shape \\[3, 2\\]"),
        (lambda: roll_to_phase(torch.ones(2, 1, 4, 4), torch.zeros(2, 3, dtype=torch.long)), "shape \\[2, 3\\]"),
        (lambda: roll_to_phase(torch.ones(2, 1, 4, 4), torch.zeros(2, 2)), "integer offsets"),
        (lambda: select_phase(torch.ones(2, 1, 4, 4), torch.zeros(2, 2, dtype=torch.long), [2]), "got a 4-d input"),
        (lambda: select_phase(torch.ones(2, 1, 4), torch.zeros(2, 2, dtype=torch.long), [2, 2]), "phase of shape"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
