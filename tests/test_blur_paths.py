"""Both implementations of the blur, in every layout and dtype, against the float64 reference.

``fxblur.blur`` picks shifted views (``fxblur.ops.separable``) or a depthwise convolution
(``fxblur.ops.depthwise``) by device, dtype and layout; whichever runs, users get the same
numbers, gradients and memory format.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from blur_reference import reference_blur
from hypothesis import given
from hypothesis import strategies as st

import fxblur
from fxblur.ops.depthwise import depthwise_blur
from fxblur.ops.filters import binomial_kernel
from fxblur.ops.padding import PADDING_MODES
from fxblur.ops.separable import separable_blur
from support import examples, needs_cpu_half_padding

IMPLEMENTATIONS = {
    "separable": lambda x, stride, sizes, mode: separable_blur(x, sizes, stride, mode),
    "depthwise": lambda x, stride, sizes, mode: depthwise_blur(x, binomial_kernel(sizes, x.dtype), stride, mode),
    "dispatched": lambda x, stride, sizes, mode: fxblur.blur(x, stride, sizes, mode),
}


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided view":  # every other channel of a larger tensor
        return torch.repeat_interleave(x, 2, dim=1)[:, ::2]
    return x.contiguous()


@examples(150)
@given(
    implementation=st.sampled_from(sorted(IMPLEMENTATIONS)),
    layout=st.sampled_from(["nchw", "channels_last", "strided view"]),
    height=st.integers(1, 11),
    width=st.integers(1, 11),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    sizes=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    mode=st.sampled_from(PADDING_MODES),
)
def test_values_and_gradients_equal_the_reference(implementation, layout, height, width, stride, sizes, mode):
    run = IMPLEMENTATIONS[implementation]
    x64 = torch.randn(2, 3, height, width, dtype=torch.float64)
    expected = reference_blur(x64, stride, sizes, mode)
    x32 = in_layout(x64.float(), layout)
    torch.testing.assert_close(run(x32, stride, sizes, mode).double(), expected, atol=1e-6, rtol=0)

    x = in_layout(x64, layout).requires_grad_()
    y = run(x, stride, sizes, mode)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    grad = torch.randn_like(expected)
    (got,) = torch.autograd.grad(y, x, grad)
    reference_input = x64.clone().requires_grad_()
    (wanted,) = torch.autograd.grad(reference_blur(reference_input, stride, sizes, mode), reference_input, grad)
    torch.testing.assert_close(got, wanted, atol=1e-12, rtol=0)


INF, NAN = float("inf"), float("nan")


def with_specials(x: torch.Tensor, specials: list[tuple[float, int]]) -> torch.Tensor:
    """``x`` with each (value, position) written at that position modulo its size."""
    x = x.clone()
    for value, position in specials:
        x.view(-1)[position % x.numel()] = value
    return x


@examples(150)
@given(
    implementation=st.sampled_from(sorted(IMPLEMENTATIONS)),
    layout=st.sampled_from(["nchw", "channels_last"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    sizes=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    mode=st.sampled_from(PADDING_MODES),
    specials=st.lists(st.tuples(st.sampled_from([INF, -INF, NAN]), st.integers(0, 10**6)), min_size=1, max_size=4),
)
def test_non_finite_values(implementation, layout, dtype, height, width, stride, sizes, mode, specials):
    """Infinities and NaN give the reference's results, in the input and in the gradient."""
    run = IMPLEMENTATIONS[implementation]
    x64 = with_specials(torch.randn(2, 3, height, width, dtype=torch.float64), specials)
    expected = reference_blur(x64, stride, sizes, mode)
    x = in_layout(x64.to(dtype), layout).requires_grad_()
    y = run(x, stride, sizes, mode)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-6, equal_nan=True)

    grad = with_specials(torch.randn_like(expected), specials)
    reference_input = x64.clone().requires_grad_()
    (wanted,) = torch.autograd.grad(reference_blur(reference_input, stride, sizes, mode), reference_input, grad)
    (got,) = torch.autograd.grad(y, x, in_layout(grad.to(dtype), layout))
    torch.testing.assert_close(got.double(), wanted, atol=1e-5, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_beyond_half_the_range_do_not_overflow(implementation, dtype):
    # +-0.75 * max, alternating: differences of neighbours overflow, the blurred values do not
    huge = 0.75 * torch.finfo(dtype).max
    checkerboard = torch.tensor([[huge, -huge], [-huge, huge]], dtype=dtype).repeat(2, 3, 4, 4)
    run = IMPLEMENTATIONS[implementation]
    for stride, mode in itertools.product((1, 2), PADDING_MODES):
        strides = (stride, stride)
        x = checkerboard.clone().requires_grad_()
        y = run(x, strides, (3, 3), mode)
        reference_input = checkerboard.double().requires_grad_()
        expected = reference_blur(reference_input, strides, (3, 3), mode)
        torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6 * huge)
        grad = checkerboard[..., ::stride, ::stride]
        (wanted,) = torch.autograd.grad(expected, reference_input, grad.double())
        (got,) = torch.autograd.grad(y, x, grad)
        torch.testing.assert_close(got.double(), wanted, rtol=1e-6, atol=1e-6 * huge)


def test_masking_with_minus_inf_before_a_blurred_max_pool():
    # Masked positions stay -inf through the blur, so the pool picks the unmasked neighbours.
    x = torch.randn(2, 4, 12, 12).masked_fill(torch.rand(2, 1, 12, 12) < 0.3, -INF)
    outputs = [F.max_pool2d(fxblur.blur(in_layout(x, layout), 1), 2, 2) for layout in ("nchw", "channels_last")]
    expected = F.max_pool2d(reference_blur(x.double(), (1, 1), (3, 3), "reflect"), 2, 2)
    for y in outputs:
        assert not y.isnan().any()
        torch.testing.assert_close(y.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["separable", "depthwise"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_gradcheck(implementation, stride):
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    run = IMPLEMENTATIONS[implementation]
    for mode in PADDING_MODES:
        for sizes in ((3, 3), (4, 2), (5, 1)):
            assert torch.autograd.gradcheck(lambda t, mode=mode, sizes=sizes: run(t, (stride,) * 2, sizes, mode), (x,))


def test_gradient_of_a_broadcast_loss():
    # y.sum() sends back an expanded gradient with zero strides; the backward must read it as is
    x = torch.randn(2, 4, 9, 10, requires_grad=True)
    fxblur.blur(x, 2).sum().backward()
    reference = x.detach().double().requires_grad_()
    reference_blur(reference, (2, 2), (3, 3), "reflect").sum().backward()
    torch.testing.assert_close(x.grad.double(), reference.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["separable", "depthwise"])
@pytest.mark.parametrize("shape", [(2, 3, 10), (1, 2, 5, 6, 7)])
def test_1d_and_3d(implementation, shape):
    x = torch.randn(shape, dtype=torch.float64)
    spatial = len(shape) - 2
    stride, sizes = (2,) * spatial, (3,) * spatial
    expected = reference_blur(x, stride, sizes, "reflect")
    torch.testing.assert_close(IMPLEMENTATIONS[implementation](x, stride, sizes, "reflect"), expected)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, pytest.param(torch.float16, marks=needs_cpu_half_padding), torch.bfloat16]
)
def test_output_keeps_dtype_and_memory_format(layout, dtype):
    x = in_layout(torch.randn(2, 8, 12, 12), layout).to(dtype)
    for stride in (1, 2):
        y = fxblur.blur(x, stride)
        assert y.dtype == dtype
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        else:
            assert y.is_contiguous()
        tolerance = 1e-6 if dtype in (torch.float32, torch.float64) else 2e-2
        expected = reference_blur(x.double(), (stride, stride), (3, 3), "reflect")
        torch.testing.assert_close(y.double(), expected, atol=tolerance, rtol=tolerance)


def test_compiles_without_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    blur = fxblur.Blur(filter_size=3, stride=2)
    x = torch.randn(2, 16, 15, 14, requires_grad=True)
    compiled = torch.compile(blur, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, blur(x))
    (compiled_grad,) = torch.autograd.grad(y.square().sum(), x)
    (eager_grad,) = torch.autograd.grad(blur(x).square().sum(), x)
    torch.testing.assert_close(compiled_grad, eager_grad)
