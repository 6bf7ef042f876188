"""The blur op and module against a direct float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxblur import Blur, blur
from fxblur.blur import PADDING_MODES
from fxblur.ceil_mode import ceil_mode_padding, pad_for_ceil_mode
from fxblur.filters import binomial_filter

PASCAL = {
    1: [1],
    2: [1, 1],
    3: [1, 2, 1],
    4: [1, 3, 3, 1],
    5: [1, 4, 6, 4, 1],
    6: [1, 5, 10, 10, 5, 1],
    7: [1, 6, 15, 20, 15, 6, 1],
}


def source_index(j: int, before: int, after: int, n: int, mode: str) -> int | None:
    """Which input sample padded position ``j`` holds (``None``: a zero)."""
    i = j - before
    if (mode == "reflect" and max(before, after) >= n) or (mode == "circular" and max(before, after) > n):
        mode = "replicate"  # documented fallback on maps too small to reflect or wrap
    if 0 <= i < n:
        return i
    if mode == "zeros":
        return None
    if mode == "replicate":
        return min(max(i, 0), n - 1)
    if mode == "reflect":
        return -i if i < 0 else 2 * (n - 1) - i
    return i % n


def reference_blur(x: torch.Tensor, stride, sizes, mode: str) -> torch.Tensor:
    """out[i] = sum_a f[a] * padded[i * s + a], one spatial axis at a time, in float64."""
    x = x.double()
    for axis, (s, k) in enumerate(zip(stride, sizes, strict=True)):
        dim = 2 + axis
        n = x.shape[dim]
        before, after = (k - 1) // 2, k - 1 - (k - 1) // 2
        taps = torch.tensor(PASCAL[k], dtype=torch.float64) / sum(PASCAL[k])
        outputs = (n + before + after - k) // s + 1
        slices = []
        for o in range(outputs):
            acc = torch.zeros_like(x.select(dim, 0))
            for a in range(k):
                source = source_index(o * s + a, before, after, n, mode)
                if source is not None:
                    acc = acc + taps[a] * x.select(dim, source)
            slices.append(acc)
        x = torch.stack(slices, dim)
    return x


def test_binomial_filters_are_normalised_rows_of_pascals_triangle():
    for size, row in PASCAL.items():
        expected = torch.tensor(row, dtype=torch.float64) / sum(row)
        assert torch.equal(binomial_filter(size), expected)
    with pytest.raises(ValueError, match="between 1 and 7"):
        binomial_filter(8)


@settings(max_examples=120, deadline=None)
@given(
    height=st.integers(1, 11),
    width=st.integers(1, 11),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    sizes=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    mode=st.sampled_from(PADDING_MODES),
)
def test_blur_equals_direct_float64_reference(height, width, stride, sizes, mode):
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    expected = reference_blur(x, stride, sizes, mode)
    actual = blur(x.float(), stride, sizes, mode)
    assert actual.shape == expected.shape == (2, 3, (height - 1) // stride[0] + 1, (width - 1) // stride[1] + 1)
    torch.testing.assert_close(actual.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(blur(x, stride, sizes, mode), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 10), (1, 2, 5, 6, 7)])
def test_blur_1d_and_3d(shape):
    x = torch.randn(shape, dtype=torch.float64)
    spatial = len(shape) - 2
    expected = reference_blur(x, (2,) * spatial, (4,) * spatial, "reflect")
    torch.testing.assert_close(blur(x, 2, 4), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_constant_image_stays_constant(mode, size):
    x = torch.full((1, 4, size, size + 1), 3.25)
    for stride in (1, 2):
        for filter_size in (2, 3, 7):
            y = blur(x, stride, filter_size, mode)
            assert torch.equal(y, torch.full_like(y, 3.25))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float32(dtype):
    x = torch.randn(2, 8, 13, 13)
    y = blur(x.to(dtype), 2)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), blur(x, 2), atol=2e-2, rtol=2e-2)


def test_meta_tensors_give_shapes_without_compute():
    y = blur(torch.empty(8, 256, 57, 57, device="meta"), 2, 4, "reflect")
    assert y.device.type == "meta" and y.shape == (8, 256, 29, 29)


def test_gradients_match_finite_differences():
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    for mode in PADDING_MODES:
        assert torch.autograd.gradcheck(lambda t, mode=mode: blur(t, 2, 3, mode), (x,))


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


def test_module_follows_dtype_and_meta_initialisation():
    module = Blur(stride=2).half()
    assert module.filter.dtype == torch.float16
    assert module(torch.randn(1, 2, 6, 6, dtype=torch.float16)).dtype == torch.float16
    with torch.device("meta"):
        on_meta = Blur(stride=2)
    on_meta.to_empty(device="cpu")
    on_meta.reset_parameters()
    assert torch.equal(on_meta.filter, Blur(stride=2).filter)


def test_module_accepts_unbatched_input_like_conv2d():
    x = torch.randn(4, 9, 9)
    assert torch.equal(Blur(stride=2)(x), Blur(stride=2)(x[None])[0])


@settings(max_examples=300, deadline=None)
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
