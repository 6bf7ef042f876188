"""Derivatives of every order through the fast paths equal the reference computation's.

On NCHW CPU tensors the blur runs ``fxblur.ops.separable`` and the stride-1 max pool
``fxblur.ops.max_pool``, each a hand-written ``torch.autograd.Function``. Whatever a user
differentiates with (double backward for Hessians and gradient penalties, forward mode,
``torch.func``), they must get what the reference computation gives: padding and a
depthwise convolution for the blur, ``F.max_pool{1,2,3}d`` for the pool.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import fxblur
from fxblur.ops.depthwise import depthwise_blur
from fxblur.ops.filters import binomial_kernel
from fxblur.ops.max_pool import max_pool_stride_one, separable_max_pool
from fxblur.ops.padding import PADDING_MODES
from fxblur.ops.separable import separable_blur


def reference_blur(x: torch.Tensor, stride, taps, mode: str) -> torch.Tensor:
    return depthwise_blur(x, binomial_kernel(taps, x.dtype), list(stride), mode)


def reference_pool(x: torch.Tensor, kernel, padding, dilation) -> torch.Tensor:
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    return pool(x, kernel, 1, padding, dilation)


def distinct_values(*shape: int) -> torch.Tensor:
    """No ties anywhere, so that a max pool is differentiable and finite differences see it."""
    count = torch.Size(shape).numel()
    return (torch.randperm(count, dtype=torch.float64) / count).reshape(shape) + 0.5


# Map shapes (odd, even, tiny) per number of spatial axes, with per-axis filter sizes that
# run through 1 to 7 on every axis as k runs through 1 to 7.
BLUR_GEOMETRIES = {
    1: ([(1, 2, 7), (2, 1, 2)], lambda k: (k,)),
    2: ([(1, 2, 5, 4), (1, 1, 1, 3)], lambda k: (k, 8 - k)),
    3: ([(1, 1, 3, 4, 2)], lambda k: (k, 8 - k, (k + 2) % 7 + 1)),
}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_blur_gradcheck_and_gradgradcheck(dims, mode):
    shapes, taps_for = BLUR_GEOMETRIES[dims]
    for shape, stride, k in itertools.product(shapes, (1, 2, 3), range(1, 8)):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        strides, taps = (stride,) * dims, taps_for(k)
        assert gradcheck(lambda t, s=strides, k=taps: separable_blur(t, k, s, mode), (x,), fast_mode=True)
        assert gradgradcheck(lambda t, s=strides, k=taps: separable_blur(t, k, s, mode), (x,), fast_mode=True)


POOL_GEOMETRIES = [  # shape, kernel, padding, dilation
    ((1, 2, 9), [3], [1], [1]),
    ((1, 1, 8), [2], [1], [3]),
    ((1, 2, 6, 5), [3, 3], [1, 1], [1, 1]),
    ((1, 1, 7, 6), [2, 3], [0, 1], [2, 1]),
    ((1, 1, 4, 5, 4), [3, 2, 3], [1, 1, 0], [1, 2, 1]),
]


@pytest.mark.parametrize(("shape", "kernel", "padding", "dilation"), POOL_GEOMETRIES)
def test_max_pool_gradcheck_and_gradgradcheck(shape, kernel, padding, dilation):
    x = distinct_values(*shape)
    x.view(-1)[1::5] = float("-inf")  # masked samples: never all of a window here
    assert reference_pool(x, kernel, padding, dilation).isfinite().all()
    x.requires_grad_()
    pool = lambda t: separable_max_pool(t, kernel, padding, dilation)  # noqa: E731
    assert gradcheck(pool, (x,))
    assert gradgradcheck(pool, (x,))


def test_forward_mode_equals_the_reference():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    tangent = torch.randn_like(x)
    for stride, mode in itertools.product((1, 2), PADDING_MODES):
        with fwAD.dual_level():
            y = separable_blur(fwAD.make_dual(x, tangent), (3, 4), (stride, stride), mode)
            got = fwAD.unpack_dual(y).tangent
        torch.testing.assert_close(got, reference_blur(tangent, (stride, stride), (3, 4), mode))
    pool = lambda t: separable_max_pool(t, [3, 3], [1, 1], [1, 1])  # noqa: E731
    got = torch.func.jvp(pool, (x,), (tangent,))
    expected = torch.func.jvp(lambda t: F.max_pool2d(t, 3, 1, 1), (x,), (tangent,))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def blur_fn(t: torch.Tensor) -> torch.Tensor:
    return separable_blur(t, (3, 2), (2, 1), "reflect")


def reference_blur_fn(t: torch.Tensor) -> torch.Tensor:
    return reference_blur(t, (2, 1), (3, 2), "reflect")


def pool_fn(t: torch.Tensor) -> torch.Tensor:
    return separable_max_pool(t, [3, 2], [1, 0], [1, 2])


def reference_pool_fn(t: torch.Tensor) -> torch.Tensor:
    return reference_pool(t, [3, 2], [1, 0], [1, 2])


PAIRS = {"blur": (blur_fn, reference_blur_fn), "max pool": (pool_fn, reference_pool_fn)}


@pytest.mark.parametrize("op", sorted(PAIRS))
def test_torch_func_grad_jacrev_jacfwd_hessian(op):
    fast, reference = PAIRS[op]
    x = distinct_values(1, 2, 6, 5)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(fast)(x), transform(reference)(x))
    loss = lambda f: lambda t: f(t).square().sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss(fast))(x), torch.func.grad(loss(reference))(x))
    torch.testing.assert_close(torch.func.hessian(loss(fast))(x), torch.func.hessian(loss(reference))(x))


@pytest.mark.parametrize("op", sorted(PAIRS))
def test_vmap_over_any_dimension(op):
    fast, reference = PAIRS[op]
    x = distinct_values(2, 3, 4, 6, 5)
    for dim in (0, 1, 2, -1):
        got = torch.func.vmap(fast, in_dims=dim)(x)
        expected = torch.stack([reference(sample) for sample in x.unbind(dim)])
        torch.testing.assert_close(got, expected)
    # A batched tangent for an unbatched point: vmap over the backward of each output.
    point, cotangents = x[0], torch.randn(5, *fast(x[0]).shape, dtype=torch.float64)
    _, vjp = torch.func.vjp(fast, point)
    _, reference_vjp = torch.func.vjp(reference, point)
    torch.testing.assert_close(torch.func.vmap(vjp)(cotangents), torch.func.vmap(reference_vjp)(cotangents))


def test_dispatched_ops_under_torch_func_equal_the_reference():
    # vmap over the first of five axes, whose samples are NCHW or channels-last maps
    x = distinct_values(2, 3, 6, 6, 4)
    for t in (x.movedim(-1, 2), x.movedim(-1, 2).contiguous()):
        got = torch.func.vmap(lambda s: fxblur.blur(s, 1))(t)
        torch.testing.assert_close(got, torch.stack([reference_blur(s, (1, 1), (3, 3), "reflect") for s in t]))
        got = torch.func.vmap(torch.func.jacrev(lambda s: max_pool_stride_one(s, [3, 3], [1, 1], [1, 1])))(t)
        torch.testing.assert_close(got, torch.func.vmap(torch.func.jacrev(lambda s: F.max_pool2d(s, 3, 1, 1)))(t))


class Network(nn.Module):
    """Conv, tanh, a stride-1 max pool, a subsampling blur, tanh, linear: curved everywhere."""

    def __init__(self, blur, pool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 3 * 3, 1)
        self.blur, self.pool = blur, pool
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.tanh(self.conv(x)), [3, 3], [1, 1], [1, 1])
        return self.head(torch.tanh(self.blur(y, (3, 3), (2, 2), "reflect")).flatten(1)).sum()


def fast_network() -> Network:
    return Network(separable_blur, separable_max_pool)


def reference_network() -> Network:
    return Network(lambda y, taps, stride, mode: reference_blur(y, stride, taps, mode), reference_pool)


def test_network_hessian_and_hvp_equal_the_reference():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    fast, reference = fast_network(), reference_network()
    expected = torch.autograd.functional.hessian(reference, x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(torch.autograd.functional.hessian(fast, x), expected)
    torch.testing.assert_close(torch.func.hessian(fast)(x), expected)
    v = torch.randn_like(x)
    torch.testing.assert_close(
        torch.autograd.functional.hvp(fast, x, v), torch.autograd.functional.hvp(reference, x, v)
    )


def test_gradient_penalty_trains_like_the_reference():
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    grads = []
    for network in (fast_network(), reference_network()):
        t = x.clone().requires_grad_()
        (gradient,) = torch.autograd.grad(network(t), t, create_graph=True)
        gradient.square().sum().backward()  # R1 / WGAN-GP
        grads.append([p.grad for p in network.parameters()])
    for got, expected in zip(*grads, strict=True):
        if expected is None:  # the head's bias: the input gradient does not depend on it
            assert got is None
        else:
            torch.testing.assert_close(got, expected)


def test_hessian_of_a_transformed_model_equals_the_original():
    # A 1-tap blur changes nothing: the transformed model is the original function.
    model = nn.Sequential(nn.Conv1d(2, 2, 3, 2, 1), nn.Tanh(), nn.Flatten(), nn.Linear(8, 1)).double()
    gm = fxblur.transform(model, min_channels=0, filter_size=1, verbose=False)
    x = torch.randn(1, 2, 8, dtype=torch.float64)
    expected = torch.autograd.functional.hessian(lambda t: model(t).sum(), x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(torch.autograd.functional.hessian(lambda t: gm(t).sum(), x), expected)
