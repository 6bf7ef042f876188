"""The shared shape of every blur pass: find strided ops of one kind, skip or blur each.

A pass walks ``graph.nodes`` once. For every op of its kind that downsamples, it either
records why it leaves the op alone, or rewrites it in one of these ways and records which:

- ``blur_before``: a stride-1 blur feeds the op, which keeps its stride;
- ``subsample_before``: a blur of the op's stride feeds the op, which runs at stride 1
  (for ops that commute with the blur, such as 1x1 convs);
- ``blur_after``: the op runs at stride 1 and a blur of the op's stride subsamples its
  output, to exactly the size the op produced before;
- ``blur_past_nonlinearity`` (convs): as ``blur_after``, with the blur moved past the
  per-channel ops that follow the conv.

Subclasses name the kind of op, choose the placement and add their own reasons to skip.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxblur.changes import Change, record
from fxblur.ops.blur_module import Blur
from fxblur.options import BlurOptions
from fxblur.rewrite.cloning import share_tensors
from fxblur.rewrite.window_ops import WindowOp, read_window_op, set_call_argument

BLUR_CONTAINER = "fxblur"


class Blurs(nn.ModuleDict):
    """The container, at ``gm.fxblur``, of the blur modules a rewrite adds."""


class WindowOpPass(PassBase):
    """Blur every downsampling op of ``kind`` (``"conv"``, ``"max_pool"``, ...) in a graph.

    One instance may run over several graphs of the same model (its train and eval
    graphs): a module that must run at stride 1 is replaced by the same stride-1 copy in
    every graph, after every call of it has been rewritten.

    ``scope`` is the path of the rewritten module in the model the user passed, when that
    is a submodule (``transform(strict=False)``): ``exclude`` patterns match full paths.
    """

    kind: str

    def __init__(self, options: BlurOptions, scope: str = "") -> None:
        self.options = options
        self.scope = scope
        self._stride_one: dict[int, nn.Module] = {}
        self._replacements: dict[str, nn.Module] = {}

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(graph_module.graph.nodes):
            op = read_window_op(node, graph_module)
            if op is None or op.kind != self.kind or not op.downsamples:
                continue
            reason = self.skip_reason(op, graph_module)
            if reason:
                record(graph_module, _change(op, "skipped", reason))
                continue
            rewrite = getattr(self, self.placement(op))
            record(graph_module, rewrite(graph_module, op))
            modified = True
        # Modules change only now: a module called at several places must look the same,
        # strided, to every one of its call sites while the walk rewrites them.
        for target, module in self._replacements.items():
            owner, _, name = target.rpartition(".")
            setattr(graph_module.get_submodule(owner), name, module)
        self._replacements.clear()
        return PassResult(graph_module, modified)

    def placement(self, op: WindowOp) -> str:
        """The rewrite for ``op``: the name of one of this pass's rewrite methods."""
        return "blur_before" if self.options.pools_blur_first else "blur_after"

    def skip_reason(self, op: WindowOp, gm: fx.GraphModule) -> str:
        """Why ``op`` must be left alone, or ``""``. Subclasses add their own reasons."""
        pattern = self.options.excluded(f"{self.scope}.{op.target}" if self.scope else op.target)
        if pattern is not None:
            return f"excluded by {pattern!r}"
        if op.custom_forward:
            return f"{type(op.module).__name__} overrides forward"
        if _is_blurred_before(op, gm):
            return "already blurred"
        return ""

    def blur(self, op: WindowOp, stride: tuple[int, ...]) -> Blur:
        """The blur for ``op``, subsampling by ``stride``."""
        return Blur(self.options.filter_taps(op.stride), stride, self.options.padding_mode, op.dims)

    def blur_before(self, gm: fx.GraphModule, op: WindowOp) -> Change:
        """Blur the op's input at stride 1; the op keeps its stride."""
        return self._blur_input(gm, op, "blur_before", (1,) * op.dims, ())

    def subsample_before(self, gm: fx.GraphModule, op: WindowOp) -> Change:
        """Blur and subsample the op's input; the op runs at stride 1 on what is left."""
        return self._blur_input(gm, op, "subsample_before", op.stride, self.run_at_stride_one(gm, op))

    def blur_after(self, gm: fx.GraphModule, op: WindowOp) -> Change:
        """Run the op at stride 1 and subsample its output with a blur."""
        source = op.input
        added = self.run_at_stride_one(gm, op)
        return self._blur_output(gm, op, "blur_after", source, added, ())

    def run_at_stride_one(self, gm: fx.GraphModule, op: WindowOp) -> tuple[fx.Node, ...]:
        """Make ``op`` compute every window; return the nodes this needed to insert.

        At stride 1 a pool's ``ceil_mode`` has no effect, so it is switched off.
        """
        ones = (1,) * op.dims
        if op.module is None:
            set_call_argument(op.node, "stride", ones)
            if op.ceil_mode:
                set_call_argument(op.node, "ceil_mode", False)
            return ()

        def stride_one_copy() -> nn.Module:
            module = share_tensors(op.module)
            module.stride = ones
            if hasattr(module, "ceil_mode"):
                module.ceil_mode = False
            return module

        self.replace_module(op, stride_one_copy)
        return ()

    def replace_module(self, op: WindowOp, make: Callable[[], nn.Module]) -> None:
        """Replace the module ``op`` calls, once the walk is done, by the one ``make`` builds.

        Every call of the same module gets the same replacement, built on the first call.
        """
        if id(op.module) not in self._stride_one:
            self._stride_one[id(op.module)] = make()
        self._replacements[op.target] = self._stride_one[id(op.module)]

    def _blur_input(
        self, gm: fx.GraphModule, op: WindowOp, action: str, stride: tuple[int, ...], added: tuple[fx.Node, ...]
    ) -> Change:
        path = add_blur(gm, op.target, self.blur(op, stride))
        source = op.input
        with gm.graph.inserting_before(op.node):
            blurred = gm.graph.call_module(path, (source,))
        op.replace_input(blurred)
        return _change(op, action, blur=path, input_node=source, added=(*added, blurred))

    def _blur_output(
        self,
        gm: fx.GraphModule,
        op: WindowOp,
        action: str,
        source: fx.Node,
        added: tuple[fx.Node, ...],
        chain: tuple[fx.Node, ...],
    ) -> Change:
        """Subsample with a blur after the op, or after the per-channel ``chain`` that follows it."""
        last = chain[-1] if chain else op.node
        path = add_blur(gm, op.target, self.blur(op, op.stride))
        with gm.graph.inserting_after(last):
            blurred = gm.graph.call_module(path, (last,))
        last.replace_all_uses_with(blurred, delete_user_cb=lambda user: user is not blurred)
        return _change(
            op,
            action,
            blur=path,
            input_node=source,
            output_node=blurred,
            added=(*added, blurred),
            enlarged=(op.node, *chain),
        )


def add_blur(gm: fx.GraphModule, name: str, blur: Blur) -> str:
    """Install ``blur`` under ``gm.fxblur`` and return its path.

    The name is ``name`` with dots turned into underscores; an equal blur already there
    is reused, a different one gets a numbered name.
    """
    container = getattr(gm, BLUR_CONTAINER, None)
    if container is None:
        container = Blurs()
        gm.add_module(BLUR_CONTAINER, container)
    elif not isinstance(container, Blurs):
        raise ValueError(f"the model already has an attribute named {BLUR_CONTAINER!r}; fxblur needs that name")
    base = name.replace(".", "_")
    for key in chain([base], (f"{base}_{i}" for i in range(1, len(container) + 2))):
        if key not in container:
            container[key] = blur.to(_device_of(gm))
            return f"{BLUR_CONTAINER}.{key}"
        if container[key].spec == blur.spec:
            return f"{BLUR_CONTAINER}.{key}"
    raise AssertionError("unreachable: a free name always exists")


def _is_blurred_before(op: WindowOp, gm: fx.GraphModule) -> bool:
    source = op.input
    if source.op != "call_module" or not isinstance(gm.get_submodule(source.target), Blur):
        return False
    blur = gm.get_submodule(source.target)
    return all(s == 1 for s in blur.stride) and all(
        k > 1 for k, s in zip(blur.filter_size, op.stride, strict=True) if s > 1
    )


def _device_of(gm: fx.GraphModule) -> torch.device:
    tensor = next(chain(gm.parameters(), gm.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _change(
    op: WindowOp,
    action: str,
    reason: str = "",
    blur: str | None = None,
    input_node: fx.Node | None = None,
    output_node: fx.Node | None = None,
    added: tuple[fx.Node, ...] = (),
    enlarged: tuple[fx.Node, ...] = (),
) -> Change:
    return Change(
        target=op.target,
        op=op.op,
        action=action,
        reason=reason,
        kernel_size=op.kernel_size,
        stride=op.stride,
        in_channels=op.in_channels,
        out_channels=op.out_channels,
        blur=blur,
        node=op.node.name,
        input_node=(input_node or op.input).name,
        output_node=(output_node or op.node).name,
        added_nodes=tuple(n.name for n in added),
        enlarged_nodes=tuple(n.name for n in enlarged),
    )
