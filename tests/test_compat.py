"""A transformed model goes where the original goes: compile, export, script, ONNX, copies, checkpoints."""

from __future__ import annotations

import copy
import functools
import io
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torch.export import Dim

import fxblur
from fxblur.assemble.graph_module import TrainEvalGraphModule
from support import TORCH_VERSION, TrainOnlyHead, needs_torch

MODELS = {  # a model and the options it is rewritten with
    "resnet50": (torchvision.models.resnet50, {}),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, {}),
    "resnet18 polyphase": (torchvision.models.resnet18, {"polyphase": True, "circular_padding": True}),
}


def calibrated(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics of real activations.

    Randomly initialised, MobileNetV3's logits are ~1e-10; measured statistics give both
    networks outputs of order one, so that tolerances mean what they say.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average: one batch sets the statistics
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 64))
    return model.eval()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: eager CPU blurs by shifted views, compiled code by a depthwise conv."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    """A calibrated torchvision model and its rewrite."""
    return rewritten(request.param)


@functools.cache
def rewritten(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    build, options = MODELS[name]
    model = calibrated(build())
    return model, fxblur.transform(model, verbose=False, **options)


def test_torch_compile_fullgraph_matches_eager(pair):
    gm = copy.deepcopy(pair[1]).double()  # in float64, so that the two blur routes' rounding cannot hide a mismatch
    torch._dynamo.reset()
    # fullgraph: a graph break anywhere raises; the eager backend runs what dynamo captured as is
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    expected = gm(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    got = compiled(x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    for actual, wanted in ((got, expected), (got_grad, expected_grad)):  # the gradient: through every blur's backward
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-12 * wanted.abs().max().item())


@needs_torch((2, 5), "torch 2.4.1's export cannot prove the guards of strided sizes")
def test_torch_export_with_dynamic_shapes_runs_and_matches(pair):
    model, gm = pair
    # reflect padding needs maps of 2 pixels or more: sizes from 64 keep the last blurred map so
    batch, height, width = Dim("batch"), Dim("height", min=64, max=1024), Dim("width", min=64, max=1024)
    program = torch.export.export(gm, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch, 2: height, 3: width},))
    x = torch.randn(3, 3, 96, 80)
    assert_matches(program.module()(x), gm(x))
    assert not torch.allclose(program.module()(x), model(x))  # the blurs are in the program


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torch_jit_script_where_the_original_scripts(pair):
    model, gm = pair
    torch.jit.script(model)  # the original scripts
    x = torch.randn(1, 3, 64, 64)
    assert_matches(torch.jit.script(gm)(x), gm(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torch_jit_trace(pair):
    _, gm = pair
    x = torch.randn(1, 3, 64, 64)
    assert_matches(torch.jit.trace(gm, (x,))(x), gm(x))


# MobileNetV3's blurs are the ops of the other two; its export would add 20 s
@pytest.fixture(scope="module", params=["resnet50", "resnet18 polyphase"])
def onnx_model(request):
    """The ONNX model proto from the (dynamo-based) exporter."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    if TORCH_VERSION < (2, 5):
        pytest.skip("needs torch >= 2.5: torch 2.4's dynamo exporter needs onnxscript < 0.4")
    _, gm = rewritten(request.param)
    return torch.onnx.export(gm, (torch.randn(1, 3, 64, 64),), dynamo=True, verbose=False).model_proto


def test_onnx_export_gives_a_valid_model(onnx_model):
    import onnx

    onnx.checker.check_model(onnx_model, full_check=True)


def test_onnx_model_runs_in_onnxruntime_and_matches(onnx_model, request):
    ort = pytest.importorskip("onnxruntime")
    _, gm = rewritten(request.node.callspec.params["onnx_model"])
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 64, 64)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_matches(torch.from_numpy(got), gm(x).detach())


def save_load(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a whole module is code, not only tensors


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), save_load])
def test_copies_and_whole_module_checkpoints_compute_the_same(pair, clone):
    _, gm = pair
    twin = clone(gm)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(twin(x), gm(x))
    assert twin.code == gm.code and type(twin).__name__ == type(gm).__name__
    assert fxblur.changes(twin) == fxblur.changes(gm)
    assert list(twin.state_dict()) == list(gm.state_dict())
    assert [name for name, _ in twin.named_buffers()] == [name for name, _ in gm.named_buffers()]  # blur filters too
    assert all(p is not q for p, q in zip(twin.parameters(), gm.parameters(), strict=True))


def checkpoint(module: nn.Module) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def scrambled(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for tensor in twin.state_dict().values():
            tensor.copy_(torch.randn_like(tensor.float()))
    return twin


def test_state_dict_checkpoints_load_strictly_both_ways(pair):
    model, gm = pair
    x = torch.randn(1, 3, 64, 64)
    original = scrambled(model)
    original.load_state_dict(checkpoint(gm), strict=True)
    torch.testing.assert_close(original(x), model(x))
    blurred = scrambled(gm)
    blurred.load_state_dict(checkpoint(model), strict=True)
    torch.testing.assert_close(blurred(x), gm(x))


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), save_load])
@pytest.mark.parametrize("start_in_train_mode", [False, True])
def test_two_graph_module_keeps_both_modes_through_copies(clone, start_in_train_mode):
    gm = fxblur.transform(TrainOnlyHead().train(start_in_train_mode), verbose=False)
    assert isinstance(gm, TrainEvalGraphModule)
    twin = clone(gm)
    assert isinstance(twin, TrainEvalGraphModule) and twin.training == start_in_train_mode
    x = torch.randn(2, 16, 9, 9)
    for mode in (not start_in_train_mode, start_in_train_mode, not start_in_train_mode):
        expected, got = gm.train(mode)(x), twin.train(mode)(x)
        assert isinstance(got, tuple) == mode
        torch.testing.assert_close(got, expected)
        assert twin.code == gm.code
    assert fxblur.changes(twin) == fxblur.changes(gm)
    twin.train()  # the train graph holds every node the changes name (the aux conv's only there)
    gm.train()
    assert fxblur.report(twin, (1, 16, 9, 9)).rows == fxblur.report(gm, (1, 16, 9, 9)).rows


def test_compiled_two_graph_module_follows_mode_switches():
    gm = fxblur.transform(TrainOnlyHead().eval(), verbose=False)
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    x = torch.randn(2, 16, 9, 9)
    for mode in (False, True, False):
        compiled.train(mode)
        got, expected = compiled(x), gm(x)
        assert isinstance(got, tuple) == mode
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
