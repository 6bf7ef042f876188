"""The stride-1 max pool of blurred max pools: PyTorch's values and gradients, on any path.

``fxblur.ops.max_pool`` computes the pool one axis at a time for NCHW tensors on CPU. Users
must not be able to tell, except by speed: the values, the element each window's gradient
reaches (ties included), the memory format and every other path must be PyTorch's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxblur
from fxblur import NoEffectWarning
from fxblur.ops import blurred
from fxblur.ops.blurred import BlurredMaxPool2d
from fxblur.ops.max_pool import max_pool_stride_one, separable_max_pool, stride_one_max_pool
from support import examples


def native(x: torch.Tensor, kernel: list[int], padding: list[int], dilation: list[int]) -> torch.Tensor:
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    return pool(x, kernel, 1, padding, dilation)


def every_window_reads_the_input(size: int, kernel: int, padding: int, dilation: int) -> bool:
    """PyTorch's kernel is undefined for windows that lie wholly in the padding."""
    outputs = size + 2 * padding - dilation * (kernel - 1)
    return outputs >= 1 and all(
        any(0 <= i + j * dilation - padding < size for j in range(kernel)) for i in range(outputs)
    )


@st.composite
def geometries(draw):
    dims = draw(st.integers(1, 3))
    axes = []
    for _ in range(dims):
        kernel = draw(st.integers(1, 5))
        padding = draw(st.integers(0, kernel // 2))
        dilation = draw(st.integers(1, 3))
        size = draw(st.integers(1, 9 if dims < 3 else 5))
        if not every_window_reads_the_input(size, kernel, padding, dilation):
            size += dilation * (kernel - 1)
        axes.append((size, kernel, padding, dilation))
    return [list(axis) for axis in zip(*axes, strict=True)]


@examples(200)
@given(geometry=geometries(), levels=st.integers(2, 100))
def test_values_and_gradients_are_pytorchs_exactly(geometry, levels):
    sizes, kernel, padding, dilation = geometry
    # Few distinct values make many ties; integer gradients make every sum exact.
    x = torch.randint(0, levels, (2, 3, *sizes)).double().requires_grad_()
    expected = native(x, kernel, padding, dilation)
    got = separable_max_pool(x, kernel, padding, dilation)
    assert torch.equal(got, expected)
    grad = torch.randint(-9, 10, expected.shape).double()
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


@examples(100)
@given(geometry=geometries(), levels=st.integers(2, 100))
def test_second_order_and_forward_mode_route_like_pytorchs(geometry, levels):
    # The backward is linear in the gradient and constant in x: its derivatives are the
    # routing itself (to the first maximum, ties included) and zero, bit for bit.
    sizes, kernel, padding, dilation = geometry
    x = torch.randint(0, levels, (2, 3, *sizes)).double().requires_grad_()
    grad = torch.randint(-9, 10, native(x, kernel, padding, dilation).shape).double().requires_grad_()
    tangent = torch.randint(-9, 10, x.shape).double()
    derivatives = []
    for pool in (native, separable_max_pool):
        (grad_x,) = torch.autograd.grad(pool(x, kernel, padding, dilation), x, grad, create_graph=True)
        second = torch.autograd.grad((grad_x * tangent).sum(), (grad, x), allow_unused=True, materialize_grads=True)
        _, forward = torch.func.jvp(lambda t, pool=pool: pool(t, kernel, padding, dilation), (x.detach(),), (tangent,))
        derivatives.append((*second, forward))
    for got, expected in zip(*derivatives[::-1], strict=True):
        assert torch.equal(got, expected)


def test_float32_on_a_resnet_stem_sized_map():
    x = torch.randn(2, 64, 56, 56).relu().requires_grad_()  # ReLU's zeros: ties everywhere
    expected = F.max_pool2d(x, 3, 1, 1)
    got = separable_max_pool(x, [3, 3], [1, 1], [1, 1])
    assert torch.equal(got, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


def test_nan_propagates_like_pytorchs():
    x = torch.randn(1, 1, 6, 6)
    x[0, 0, 2, 3] = float("nan")
    assert torch.equal(separable_max_pool(x, [3, 3], [1, 1], [1, 1]).isnan(), F.max_pool2d(x, 3, 1, 1).isnan())


@pytest.mark.parametrize(
    ("make", "fast"),
    [
        (lambda: torch.randn(2, 4, 7, 7), True),
        (lambda: torch.randn(2, 4, 7, 7, dtype=torch.float64), True),
        (lambda: torch.randn(2, 4, 7, 7).contiguous(memory_format=torch.channels_last), False),
        (lambda: torch.randn(2, 4, 7, 7, dtype=torch.bfloat16), False),
        (lambda: torch.randn(2, 8, 7, 7)[:, ::2], False),
    ],
    ids=["float32", "float64", "channels_last", "bfloat16", "strided view"],
)
def test_the_separable_path_runs_only_where_it_is_faster(make, fast):
    x = make().requires_grad_()
    y = max_pool_stride_one(x, [3, 3], [1, 1], [1, 1])
    assert ("SeparableMaxPool" in type(y.grad_fn).__name__) == fast
    assert torch.equal(y, F.max_pool2d(x, 3, 1, 1))
    assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)


def test_meta_tensors_take_pytorchs_kernel():
    y = max_pool_stride_one(torch.empty(8, 64, 112, 112, device="meta"), [3, 3], [1, 1], [1, 1])
    assert y.shape == (8, 64, 112, 112) and y.device.type == "meta"


def test_stride_one_module_is_still_the_pool_users_know():
    pool = stride_one_max_pool(nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True))
    assert isinstance(pool, nn.MaxPool2d) and pool.stride == (1, 1) and not pool.ceil_mode
    assert list(pool.state_dict()) == []
    x = torch.randn(1, 2, 9, 9)
    assert torch.equal(pool(x), F.max_pool2d(x, 3, 1, 1))
    assert torch.equal(torch.jit.script(pool)(x), F.max_pool2d(x, 3, 1, 1))


def test_pools_blurred_after_call_the_stride_one_pool(monkeypatch):
    resnet = fxblur.transform(torchvision.models.resnet18().eval(), blur_first=False, verbose=False)
    assert isinstance(resnet.maxpool, BlurredMaxPool2d)  # the pool module runs at stride 1, then blurs
    pools = []
    monkeypatch.setattr(blurred, "max_pool_stride_one", lambda *args: pools.append(args) or max_pool_stride_one(*args))
    resnet(torch.randn(1, 3, 32, 32))
    assert len(pools) == 1
    inception = torchvision.models.inception_v3(init_weights=False, aux_logits=False)
    inception = fxblur.transform(inception, preset="zhang2019", verbose=False)
    for block in (inception.Mixed_6a, inception.Mixed_7a):  # each calls F.max_pool2d(x, 3, stride=2)
        assert [n.target for n in block.graph.nodes].count(max_pool_stride_one) == 1


class FunctionalPools(nn.Module):
    def forward(self, x):  # no annotations: FX writes this module's string annotations as names TorchScript rejects
        return F.max_pool2d(x, 3, 2) + F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=False)


def test_rewritten_functional_pools_script_and_transform_again_unchanged():
    gm = fxblur.transform(FunctionalPools(), blur_first=False, verbose=False)
    x = torch.randn(2, 16, 11, 11)
    torch.testing.assert_close(torch.jit.script(gm)(x), gm(x))  # the scripted blur is a conv: rounding differs
    with pytest.warns(NoEffectWarning):  # traced again, the stride-1 pools stay single calls
        again = fxblur.transform(gm, blur_first=False, verbose=False)
    assert [n.target for n in again.graph.nodes].count(max_pool_stride_one) == 2
    assert torch.equal(again(x), gm(x))


def test_compiles_without_graph_breaks():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    gm = fxblur.transform(nn.Sequential(model, FunctionalPools()), blur_first=False, verbose=False)
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")  # a graph break raises
    x = torch.randn(2, 16, 23, 23)
    torch.testing.assert_close(compiled(x), gm(x))
