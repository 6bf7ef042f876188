"""Both implementations of the blur, in every layout and dtype, against the float64 reference.

``fxblur.blur`` picks shifted views (``fxblur.ops.separable``) or a depthwise convolution
(``fxblur.ops.depthwise``) by device, dtype and layout; whichever runs, users get the same
numbers, gradients and memory format.
"""

from __future__ import annotations

import pytest
import torch
from blur_reference import reference_blur
from hypothesis import given, settings
from hypothesis import strategies as st

import fxblur
from fxblur.ops.depthwise import depthwise_blur
from fxblur.ops.filters import binomial_kernel
from fxblur.ops.padding import PADDING_MODES
from fxblur.ops.separable import separable_blur

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


@settings(max_examples=150, deadline=None)
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
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
