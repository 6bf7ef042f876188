"""The private PyTorch and timm internals fxblur relies on (``fxblur._compat``): one test each, pinning what it needs.

When a torch or timm upgrade breaks one of these, the failing test names the entry.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxblur import _compat
from fxblur.ops.polyphase import phase_of


def test_opaque_calls_stay_calls_when_a_graph_module_is_retraced():
    for opaque in (False, True):
        graph = fx.Graph()
        call = graph.call_function(phase_of, (graph.placeholder("x"), [2, 2]))
        graph.output(_compat.keep_opaque_when_retraced(call) if opaque else call)
        gm = fx.GraphModule(nn.Module(), graph)
        if opaque:  # as when torch.fx unpickles a GraphModule: it traces the generated code
            again = fx.symbolic_trace(gm)
            assert [node.op for node in again.graph.nodes] == ["placeholder", "call_function", "output"]
        else:
            with pytest.raises(torch.fx.proxy.TraceError):
                fx.symbolic_trace(gm)


def test_root_function_hook_decides_the_signature_traced():
    class Tracer(_compat.RootFunctionTracer):
        def root_function(self, fn, concrete_args):
            def forward(self, x, scale):
                return fn(self, x) * scale

            return forward

    class Net(nn.Module):
        def forward(self, x):
            return x + 1

    graph = Tracer().trace(Net())
    assert [node.target for node in graph.nodes if node.op == "placeholder"] == ["x", "scale"]


def test_the_none_check_of_an_argument_traced_as_none_is_recognised():
    class Net(nn.Module):
        def forward(self, x, mask=None):
            return x if mask is None else x * mask

    graph = fx.Tracer().trace(Net(), concrete_args={"mask": None})
    checks = [node for node in graph.nodes if _compat.is_none_check(node)]
    assert len(checks) == 1 and isinstance(checks[0].args[1], str)


def test_a_graph_module_keeps_its_graph_in_the_named_attribute_and_gets_a_class_of_its_own():
    gm = fx.symbolic_trace(nn.ReLU())
    assert gm.__dict__[_compat.GRAPH_ATTRIBUTE] is gm.graph
    empty = _compat.new_graph_module_of_class(type(gm))
    assert isinstance(empty, fx.GraphModule) and type(empty) is not type(gm)


def test_refill_after_apply_runs_after_every_move_and_conversion():
    class Counting(_compat.RefillAfterApply):
        def __init__(self):
            super().__init__()
            self.register_buffer("value", torch.zeros(2), persistent=False)
            self.refills = 0

        def refill(self):
            self.refills += 1

    module = Counting()
    module.to(torch.float64)
    module.half()
    module.to_empty(device="cpu")
    assert module.refills == 3 and module.value.dtype == torch.float16


def test_wrapped_hooks_and_handles_are_retargeted_to_a_copy():
    module, clone = nn.Linear(2, 2), nn.Linear(2, 2)
    module.register_load_state_dict_pre_hook(lambda m, *args: None)  # a _WrappedHook holding the module
    (wrapped,) = module._load_state_dict_pre_hooks.values()
    rebound = _compat.rebind_wrapped_hook(wrapped, lambda hook: ("rebound", hook), module, clone)
    assert rebound.module() is clone and rebound.hook == ("rebound", wrapped.hook) and wrapped.module() is module
    plain = object()
    assert _compat.rebind_wrapped_hook(plain, lambda hook: None, module, clone) is plain
    handle = module.register_forward_pre_hook(lambda m, args: None)
    clone._forward_pre_hooks.update(module._forward_pre_hooks)
    _compat.retarget_handle(handle, {id(module._forward_pre_hooks): clone._forward_pre_hooks}).remove()
    assert len(clone._forward_pre_hooks) == 0 and len(module._forward_pre_hooks) == 1


def test_functorch_transforms_are_seen_while_they_run():
    seen = []

    def probe(x):
        seen.append(_compat.functorch_transforms_active())
        return x.sum()

    probe(torch.ones(2))
    torch.func.grad(probe)(torch.ones(2))
    assert seen == [False, True]


def test_run_passes_raises_what_the_pass_raised():
    def failing(gm):
        raise KeyError("from the pass")

    with pytest.raises(KeyError, match="from the pass"):
        _compat.run_passes([failing], fx.symbolic_trace(nn.ReLU()))


def test_fake_tensors_propagate_quietly_and_take_real_parameters():
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2)))
    mode = _compat.fake_tensor_mode()
    with _compat.quiet_fake_tensor_logs():
        FakeTensorProp(gm, mode).propagate(mode.from_tensor(torch.empty(4, 3)))
    assert [tuple(node.meta["val"].shape) for node in gm.graph.nodes if node.op == "call_module"] == [(4, 2)]


def test_compiled_modules_have_the_wrapper_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(nn.ReLU())
    assert isinstance(compiled, _compat.compiled_module_class())


def test_torch_nn_private_bases_cover_convs_pools_and_batch_norms():
    assert isinstance(nn.Conv3d(1, 1, 1), _compat.CONV_BASE)
    assert isinstance(nn.MaxPool1d(2), _compat.MAX_POOL_BASE) and isinstance(nn.AvgPool3d(2), _compat.AVG_POOL_BASE)
    assert isinstance(nn.SyncBatchNorm(2), _compat.BATCH_NORM_BASE)


def test_max_pool_builtins_with_indices_are_those_functional_calls_reach():
    x = torch.randn(1, 1, 4, 4)
    out, indices = _compat.WITH_INDICES_BUILTINS[1](x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    expected, expected_indices = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, expected) and torch.equal(indices, expected_indices)


def test_node_arguments_use_the_immutable_collections():
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.cat, ([x, x],), {"dim": 1})
    assert type(node.args[0]) is _compat.IMMUTABLE_LIST and type(node.kwargs) is _compat.IMMUTABLE_DICT


def test_timm_registrations_are_read_only_where_timm_is_loaded():
    timm = pytest.importorskip("timm")
    modules, functions = _compat.timm_fx_registrations()
    assert timm.layers.BlurPool2d not in modules  # an ordinary module
    assert any(getattr(f, "__name__", "") for f in functions)
    assert all(isinstance(cls, type) for cls in modules)
    pickle.dumps(functions)  # plain module-level functions
