"""The blur op and module against a direct float64 reference."""

from __future__ import annotations

import pytest
import torch
from blur_reference import PASCAL
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxblur
from fxblur import Blur, blur
from fxblur.ops.ceil_mode import ceil_mode_padding, pad_for_ceil_mode
from fxblur.ops.filters import binomial_filter
from fxblur.ops.padding import circular_pad
from support import examples, needs_cpu_half_padding


def test_binomial_filters_are_normalised_rows_of_pascals_triangle():
    for size, row in PASCAL.items():
        expected = torch.tensor(row, dtype=torch.float64) / sum(row)
        assert torch.equal(binomial_filter(size), expected)
    with pytest.raises(ValueError, match="between 1 and 7"):
        binomial_filter(8)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_constant_image_stays_constant(mode, size):
    x = torch.full((1, 4, size, size + 1), 3.25)
    for stride in (1, 2):
        for filter_size in (2, 3, 7):
            y = blur(x, stride, filter_size, mode)
            assert torch.equal(y, torch.full_like(y, 3.25))


def test_meta_tensors_give_shapes_without_compute():
    y = blur(torch.empty(8, 256, 57, 57, device="meta"), 2, 4, "reflect")
    assert y.device.type == "meta" and y.shape == (8, 256, 29, 29)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = torch.randn(2, 16, 31, 30)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y = blur(x.cuda().to(dtype), 2)
        assert y.is_cuda and y.dtype == dtype
        torch.testing.assert_close(y.float().cpu(), blur(x, 2), atol=2e-2, rtol=2e-2)


def test_bad_arguments_are_rejected():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="padding_mode"):
        blur(x, padding_mode="mirror")
    with pytest.raises(ValueError, match="stride"):
        blur(x, stride=0)
    with pytest.raises(ValueError, match="filter_size"):
        blur(x, filter_size=(3, 3, 3))
    with pytest.raises(ValueError, match="spatial"):
        blur(torch.randn(4, 4))


def test_module_matches_functional_and_keeps_state_dict_empty():
    module = Blur(filter_size=(3, 1), stride=(2, 1), padding_mode="replicate")
    x = torch.randn(2, 5, 9, 8)
    assert torch.equal(module(x), blur(x, (2, 1), (3, 1), "replicate"))
    assert list(module.state_dict()) == []
    assert module.filter.shape == (3, 1)
    assert "stride=(2, 1)" in repr(module)


@needs_cpu_half_padding
def test_module_follows_dtype_and_meta_initialisation():
    module = Blur(stride=2).half()
    assert module.filter.dtype == torch.float16
    assert module(torch.randn(1, 2, 6, 6, dtype=torch.float16)).dtype == torch.float16
    with torch.device("meta"):
        on_meta = Blur(stride=2)
    on_meta.to_empty(device="cpu")
    on_meta.reset_parameters()
    assert torch.equal(on_meta.filter, Blur(stride=2).filter)


def test_module_refills_its_filter_whenever_it_is_moved_or_materialised():
    with torch.device("meta"):
        on_meta = Blur(filter_size=(3, 4), stride=2)
    expected = Blur(filter_size=(3, 4), stride=2).filter
    assert torch.equal(on_meta.to_empty(device="cpu").filter, expected)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert torch.equal(on_meta.to(dtype).filter, expected.to(dtype))


def test_model_built_on_meta_then_materialised_blurs_like_one_built_on_cpu():
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(16, 8, 3, 2))

    on_cpu = fxblur.transform(build(), verbose=False)
    with torch.device("meta"):
        on_meta = fxblur.transform(build(), verbose=False)
    on_meta.to_empty(device="cpu")  # the large-model recipe: materialise, then load the weights
    on_meta.load_state_dict(on_cpu.state_dict())
    x = torch.randn(2, 3, 29, 29).contiguous(memory_format=torch.channels_last)  # the convolution paths
    assert torch.equal(on_meta(x), on_cpu(x))
    assert torch.equal(on_meta.bfloat16()(x.bfloat16()), on_cpu.bfloat16()(x.bfloat16()))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.bool])
def test_non_floating_input_is_a_type_error_that_says_what_to_do(dtype):
    x = torch.ones(1, 2, 5, 5, dtype=dtype)
    for run in (lambda t: blur(t, 2), Blur(stride=2), Blur(stride=1)):
        with pytest.raises(TypeError, match=rf"floating-point input, got {dtype}.*x\.float\(\)"):
            run(x)


def test_module_accepts_unbatched_input_like_conv2d():
    x = torch.randn(4, 9, 9)
    assert torch.equal(Blur(stride=2)(x), Blur(stride=2)(x[None])[0])


@examples(300)
@given(
    size=st.integers(1, 40),
    kernel=st.integers(1, 5),
    stride=st.integers(1, 4),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
)
def test_ceil_mode_padding_gives_a_stride_one_pool_every_ceil_mode_window(size, kernel, stride, padding, dilation):
    x = torch.randn(1, 1, size)
    try:
        expected = torch.nn.functional.max_pool1d(x, kernel, stride, padding, dilation, ceil_mode=True)
    except RuntimeError:
        return  # a configuration PyTorch itself rejects
    padded = pad_for_ceil_mode(x, (kernel,), (stride,), (padding,), (dilation,))
    assert padded.shape[-1] == size + ceil_mode_padding(size, kernel, stride, padding, dilation)
    every_window = torch.nn.functional.max_pool1d(padded, kernel, 1, padding, dilation)
    assert torch.equal(every_window[..., ::stride], expected)


@examples(40)
@given(
    rank=st.integers(3, 5),
    axes=st.integers(1, 3),
    before=st.integers(0, 9),
    after=st.integers(0, 9),
    size=st.integers(1, 6),
)
def test_circular_padding_of_any_extent_and_any_number_of_axes_wraps_around(rank, axes, before, after, size):
    axes = min(axes, rank - 1)
    x = torch.randn(*([2] * (rank - axes)), *([size] * axes))
    padded = circular_pad(x, [before, after] * axes)
    index = torch.arange(-before, size + after) % size
    expected = x
    for axis in range(rank - axes, rank):
        expected = expected.index_select(axis, index)
    assert torch.equal(padded, expected)
