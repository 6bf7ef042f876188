"""The pass API (``fxblur.passes.edit``) and the nesting plan: passes edit the flat graph, the hierarchy follows."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import fxblur
from fxblur.assemble import nesting, regions
from fxblur.assemble.changed import changed_calls, snapshot
from fxblur.assemble.graph_module import graph_module_over, working_module
from fxblur.assemble.nesting import ModeGraph, emit, plan_nesting
from fxblur.passes.edit import insert_after, insert_before, replace_uses
from fxblur.trace import trace
from fxblur.trace.calls import call_of


class Shortcut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.shortcut = Shortcut()

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


def rewrite(model: nn.Module, edit) -> tuple[nn.Module, nesting.Nesting]:
    """Trace ``model``, let ``edit`` change the flat graph through the pass API, and put the result together."""
    traced = trace(model)
    before = snapshot(traced.graph)
    gm = working_module(model, traced.graph)
    edit(gm)
    gm.graph.lint()
    modes = {mode: ModeGraph(traced.graph, traced.root, changed_calls(traced.graph, before)) for mode in (True, False)}
    plan = plan_nesting(modes, frozenset())
    return emit(model, modes, plan, graph_module_over), plan.nesting()


def nodes_of(gm, target):
    return [node for node in gm.graph.nodes if node.op == "call_module" and node.target == target]


def test_a_node_inserted_next_to_another_runs_in_that_nodes_module():
    def double_after_relu(gm):
        (relu,) = nodes_of(gm, "body.1")
        doubled = insert_after(relu, torch.mul, (relu, 2.0))
        replace_uses(relu, doubled, keep=[doubled])

    model = Block().eval()
    x = torch.randn(1, 4, 5, 5)
    expected = 2 * model.body(x) + model.shortcut(x)
    result, where = rewrite(model, double_after_relu)
    # the body (a Sequential) now returns the doubled value: it got its own forward, the block did not change
    assert where.rewritten == ("body",) and where.inlined == ()
    assert isinstance(result.body, nn.Sequential) and "mul" in result.body.code and "mul" not in result.code
    torch.testing.assert_close(result(x), expected)


def test_a_value_computed_in_the_caller_is_handed_to_the_call_that_reads_it():
    def scale_the_shortcut_input_in_the_block(gm):
        (conv,) = nodes_of(gm, "shortcut.conv")
        source = conv.args[0]
        scaled = insert_before(conv, torch.mul, (source, 3.0), where=source)  # in the block's own forward
        replace_uses(source, scaled, only=[conv])

    model = Block().eval()
    x = torch.randn(1, 4, 5, 5)
    expected = model.body(x) + model.shortcut(3 * x)
    calls = []
    result, where = rewrite(model, scale_the_shortcut_input_in_the_block)
    result.shortcut.register_forward_pre_hook(lambda module, args: calls.append(args[0]))
    assert type(result.shortcut) is Shortcut  # its code is unchanged: it is handed the scaled input
    assert where.rewritten == () and where.inlined == ()
    torch.testing.assert_close(result(x), expected)
    torch.testing.assert_close(calls[0], 3 * x)


def test_a_call_that_would_need_a_value_it_does_not_receive_is_inlined_with_the_reason():
    def read_a_block_value_inside_the_body(gm):
        (first,) = nodes_of(gm, "body.0")
        (relu,) = nodes_of(gm, "body.1")
        block_input = first.args[0]
        scaled = insert_before(first, torch.mul, (block_input, 3.0), where=block_input)  # computed in the block
        added = insert_after(relu, torch.add, (relu, scaled))  # read inside the body, which is not handed it
        replace_uses(relu, added, keep=[added])

    model = Block().eval()
    x = torch.randn(1, 4, 5, 5)
    expected = model.body(x) + 3 * x + model.shortcut(x)
    result, where = rewrite(model, read_a_block_value_inside_the_body)
    assert [(item.path, item.reason) for item in where.inlined] == [
        ("body", "it reads mul, which it does not receive as an argument")
    ]
    assert where.rewritten == () and "body_0" in result.code  # the root runs the body's layers itself
    torch.testing.assert_close(result(x), expected)


def test_shufflenet_polyphase_plan_inlines_each_branch_that_reads_its_blocks_phase():
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5().eval()
    gm = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
    plan = fxblur.report(gm).nesting
    assert [item.path for item in plan.inlined] == [f"stage{n}.0.branch2" for n in (2, 3, 4)]
    assert all("phase_of" in item.reason and "does not receive" in item.reason for item in plan.inlined)
    assert str(plan).splitlines()[0] == "rewritten: (root), stage2.0, stage3.0, stage4.0"  # conv1: folded
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(torch.roll(x, (3, -5), (2, 3))), gm(x), rtol=1e-4, atol=1e-5)


def test_planning_builds_each_region_once_for_what_it_holds(monkeypatch):
    built = []
    build = regions.build_region

    def counting(call, flat, owners, buffers):
        held = frozenset(each for each, owner in owners.items() if owner is call)
        built.append((call, held))
        return build(call, flat, owners, buffers)

    monkeypatch.setattr(nesting, "build_region", counting)
    fxblur.transform(torchvision.models.shufflenet_v2_x0_5(), polyphase=True, verbose=False)
    assert len(built) == len(set(built))  # a region is rebuilt only when the calls it holds change


def test_buffers_are_named_while_planning_and_registered_only_for_emitted_graphs():
    module, other = nn.Module(), nn.Module()
    first, second = torch.ones(2), torch.zeros(2)
    buffers = regions.Buffers()
    assert buffers.name(module, first) == "_fxblur_constant0" == buffers.name(module, first)
    assert buffers.name(module, second) == "_fxblur_constant1"
    assert buffers.name(other, second) == "_fxblur_constant0"
    assert not list(module.buffers()) and not list(other.buffers())  # an abandoned plan leaves nothing behind
    buffers.register([(module, "_fxblur_constant1")])
    assert [name for name, _ in module.named_buffers()] == ["_fxblur_constant1"] and not list(other.buffers())
    assert module._fxblur_constant1 is second and "_fxblur_constant1" not in module.state_dict()


def test_every_node_of_a_traced_graph_belongs_to_a_module_call():
    traced = trace(torchvision.models.resnet18())
    assert all(call_of(node) is not None for node in traced.graph.nodes)
