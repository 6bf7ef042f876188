"""The module hierarchy survives: blocks stay modules, so hooks, activation checkpointing and regional compile work.

FSDP2 on two processes is in tests/test_distributed.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torchvision.models.resnet import BasicBlock, Bottleneck

import fxblur
from fxblur import HookWarning

PLACEMENTS = {"blur_first": {}, "blur_after": {"blur_first": False}, "past_nonlinearity": {"past_nonlinearity": True}}


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_module_call_of_the_original_is_a_module_call_of_the_result(placement):
    model = torchvision.models.resnet18().eval()
    gm = fxblur.transform(model, verbose=False, **PLACEMENTS[placement])
    x = torch.randn(1, 3, 64, 64)
    assert called_paths(gm, x) >= called_paths(model, x)
    for path, module in model.named_modules():
        if not path:
            continue  # the root is a GraphModule named after the model's class
        rewritten = gm.get_submodule(path)
        assert isinstance(rewritten, type(module)), path  # a Sequential stays one, a block stays a BasicBlock
    assert len(gm.layer2) == 2 and isinstance(gm.layer2[0], BasicBlock)


def called_paths(model: nn.Module, x: torch.Tensor) -> set[str]:
    called: set[str] = set()
    handles = [
        module.register_forward_pre_hook(lambda m, args, path=path: called.add(path))
        for path, module in model.named_modules()
        if path
    ]
    model(x)
    for handle in handles:
        handle.remove()
    return called


class PickFirst(nn.Module):
    def forward(self, xs: list) -> torch.Tensor:
        return xs[0]  # makes no graph node: the tracer sees a Python list indexed


class ModulesWithoutNodes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.split = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.pick = PickFirst()
        self.same = nn.Identity()
        self.head = nn.Sequential(nn.Identity(), nn.Conv2d(16, 8, 1), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.split(x)
        halves = [y[:, :16], y[:, 16:]]
        y = self.same(F.relu(self.pick(halves)))
        return self.head(y) + self.same(halves[1]).mean()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_modules_that_make_no_graph_node_are_still_called(placement):
    model = ModulesWithoutNodes().eval()
    gm = fxblur.transform(model, filter_size=1, verbose=False, **PLACEMENTS[placement])  # same function
    x = torch.randn(2, 16, 9, 9)
    assert called_paths(gm, x) >= called_paths(model, x)
    calls = []
    gm.same.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    torch.testing.assert_close(gm(x), model(x))
    assert calls == [(2, 16, 5, 5)] * 2
    assert fxblur.report(gm).nesting.inlined == ()


class Shifted(nn.Module):
    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return x + offset


class PassesAPlainTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.arange(16.0).view(1, 16, 1, 1)  # a plain attribute: the trace sees its value
        self.block = Shifted()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.block(x, offset=self.table * 2))


def test_a_tensor_computed_outside_the_graph_is_handed_to_the_module_that_reads_it():
    model = PassesAPlainTensor()
    gm = fxblur.transform(model, filter_size=1, verbose=False)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(gm(x), model(x))
    assert fxblur.report(gm).nesting.inlined == () and "block" in called_paths(gm, x)
    assert gm.state_dict().keys() == model.state_dict().keys()


def test_only_modules_with_something_to_rewrite_change():
    model = torchvision.models.resnet18()
    gm = fxblur.transform(model, verbose=False)  # every blur fits in its op's module
    changed = {path for path, module in model.named_modules() if type(gm.get_submodule(path)) is not type(module)}
    assert changed == {"", "maxpool"} | {f"layer{i}.0.{name}" for i in (2, 3, 4) for name in ("conv1", "downsample.0")}
    paper = fxblur.transform(model, past_nonlinearity=True, verbose=False)  # blurs past BatchNorm and ReLU
    assert isinstance(paper.layer2[0], torch.fx.GraphModule) and not isinstance(paper.layer2[1], torch.fx.GraphModule)
    assert fxblur.report(paper).nesting.rewritten == ("layer2.0", "layer3.0", "layer4.0")


def test_hooks_of_the_original_are_carried_and_never_run_while_tracing():
    model = torchvision.models.resnet18().eval()
    seen: list[object] = []
    model.layer3.register_forward_hook(lambda m, args, out: seen.append(out))
    model.register_forward_pre_hook(lambda m, args: (args[0] * 255,))  # input scaling on the root
    model.layer2[0].register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0]), with_kwargs=True)
    for options in ({}, {"past_nonlinearity": True}):
        # a 1-tap filter: the result computes what the model does (the 1x1 shortcuts would round differently)
        gm = fxblur.transform(model, verbose=False, filter_size=1, exclude="*.downsample.0", **options)
        assert seen == []  # nothing ran on proxies
        x = torch.randn(1, 3, 32, 32)
        expected = model(x)  # past the nonlinearity, convs run at stride 1 and round differently
        torch.testing.assert_close(gm(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
        assert len(seen) == 4 and all(isinstance(value, torch.Tensor) for value in seen)
        torch.testing.assert_close(seen[0], seen[2])  # the block's input, through the root's pre-hook
        scale = seen[1].abs().max().item()  # layer3's output, to the rounding of stride-1 convs
        torch.testing.assert_close(seen[1], seen[3], rtol=1e-4, atol=1e-5 * scale)
        seen.clear()


@pytest.mark.parametrize(
    "options",
    [{"blur_first": False}, {"polyphase": True, "blur_first": False}, {"polyphase": True, "circular_padding": True}],
)
def test_hooks_of_replaced_op_modules_still_fire(options):
    # a max pool run at stride 1 and a conv padding circularly are replaced by modules of fxblur's classes
    model = torchvision.models.resnet18().eval()
    seen: list[str] = []
    model.maxpool.register_forward_hook(lambda m, args, out: seen.append("maxpool"))
    model.conv1.register_forward_pre_hook(lambda m, args: seen.append("conv1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookWarning)
        gm = fxblur.transform(model, verbose=False, **options)
    assert type(gm.maxpool) is not nn.MaxPool2d or type(gm.conv1) is not nn.Conv2d  # something was replaced
    gm(torch.randn(1, 3, 64, 64))
    assert seen == ["conv1", "maxpool"]


def test_hooks_registered_on_the_result_fire():
    gm = fxblur.transform(torchvision.models.resnet18().eval(), past_nonlinearity=True, verbose=False)
    shapes: list[tuple] = []
    gm.layer2.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    gm.layer2[0].register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    gm(torch.randn(1, 3, 64, 64))
    assert shapes == [(1, 128, 8, 8), (1, 128, 8, 8)]


def test_flatten_gives_one_graph_and_names_the_hooks_it_drops():
    model = torchvision.models.resnet18().eval()
    model.layer2.register_forward_hook(lambda *args: None)
    with pytest.warns(HookWarning, match="layer2"):
        flat = fxblur.transform(model, flatten=True, verbose=False)
    called = {node.target for node in flat.graph.nodes if node.op == "call_module"}
    assert "layer2.0.conv1" in called and "layer2" not in called and "layer2.0" not in called
    with pytest.raises(NotImplementedError):
        flat.layer2(torch.randn(1, 64, 16, 16))  # a bare container: its forward would skip the rewrite
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(flat(x), fxblur.transform(model, verbose=False)(x))


def saved_activations(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Elements autograd keeps for backward, and the parameters' gradients."""
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, nn.Parameter):
            saved[0] += tensor.numel()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    wrapper = "._checkpoint_wrapped_module"  # checkpoint wrappers add a level to the names
    return saved[0], {name.replace(wrapper, ""): p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("placement", ["blur_first", "past_nonlinearity"])
def test_activation_checkpointing_of_the_blocks_saves_as_much_as_on_the_plain_model(placement):
    model = torchvision.models.resnet50(num_classes=4).eval()  # eval: BatchNorm statistics stay put
    x = torch.randn(2, 3, 64, 64)
    reductions = []
    for candidate in (model, fxblur.transform(model, copy=True, verbose=False, **PLACEMENTS[placement])):
        before, expected = saved_activations(candidate, x)
        apply_activation_checkpointing(candidate, check_fn=lambda m: isinstance(m, Bottleneck))
        after, got = saved_activations(candidate, x)
        assert after < before / 3
        reductions.append(after / before)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad)
    assert reductions[1] == pytest.approx(reductions[0], rel=0.35)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_regional_compilation_of_the_blocks(placement):
    gm = fxblur.transform(torchvision.models.resnet18().eval(), verbose=False, **PLACEMENTS[placement])
    x = torch.randn(1, 3, 64, 64)
    expected = gm(x)
    torch._dynamo.reset()
    for block in gm.layer2:
        block.compile(backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(gm(x), expected)
    assert all(block._compiled_call_impl is not None for block in gm.layer2)


@pytest.mark.parametrize(
    "options", [{"polyphase": True}, {"polyphase": True, "circular_padding": True}, {"past_nonlinearity": True}]
)
def test_a_sequential_keeps_its_layers_their_count_and_what_they_compute_one_by_one(options):
    # nodes a rewrite puts between a Sequential's layers (a phase before a pool, a blur past an activation) go
    # into those layers: perceptual losses that run vgg.features layer by layer, or slice it, still work
    model = torchvision.models.vgg11(num_classes=10).eval()
    gm = fxblur.transform(model, verbose=False, **options)
    features = gm.features
    assert type(features) is nn.Sequential and len(features) == len(model.features)
    assert [name for name, _ in features.named_children()] == [name for name, _ in model.features.named_children()]
    x = torch.randn(1, 3, 64, 64)
    y = x
    for layer in features:
        y = layer(y)
    torch.testing.assert_close(y, features(x))
    torch.testing.assert_close(features[:6](x), features[5](features[4](features[3](features[:3](x)))))
    assert fxblur.report(gm).nesting.rewritten == ()
    assert sorted(gm.state_dict()) == sorted(model.state_dict())


def test_a_conv_norm_activation_block_keeps_its_three_layers_past_the_nonlinearity():
    model = torchvision.models.mobilenet_v3_small().eval()
    gm = fxblur.transform(model, past_nonlinearity=True, verbose=False)
    block = gm.features[1].block[0]  # a strided depthwise Conv2dNormActivation (a Sequential)
    assert len(block) == 3 and type(block[2]).__name__ == "Folded[ReLU]" and isinstance(block[2], nn.ReLU)
    x = torch.randn(1, 16, 32, 32)
    torch.testing.assert_close(block(x), block[2](block[1](block[0](x))))
    assert block(x).shape == model.features[1].block[0](x).shape
