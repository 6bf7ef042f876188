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

Where the rewrite is carried out is decided per module, over every call of it in every
graph (``RewriteContext``): when all of a conv or pool module's calls get the same
placement, and it is one of the first three, the module is replaced by a blurred version
of itself that carries the blur (``fxblur.ops.blurred``), and no caller changes. Otherwise
the graph gets blur nodes, placed in the module call where the op happens
(``fxblur.rewrite.calls``); an op module that must run at stride 1 is then replaced by a
stride-1 copy, which every one of its calls must want. A module that code outside the
graph may call (one inside a ``leaf_modules`` module) is never replaced: its ops are
blurred before, in the graph, whatever the placement asked, and the record says why.

Subclasses name the kind of op, choose the placement and add their own reasons to skip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxblur.changes import Change, record
from fxblur.ops.blur_module import Blur
from fxblur.ops.blurred import BLURRED, BlurredOp, make_blurred
from fxblur.ops.polyphase import roll_to_phase, select_phase
from fxblur.options import BlurOptions
from fxblur.rewrite.calls import STRIDED_AS, call_of, place, redirect
from fxblur.rewrite.cloning import share_tensors
from fxblur.rewrite.known_layers import anti_aliasing, trusts_forward
from fxblur.rewrite.window_ops import MODULES, WindowOp, expand_to_axes, read_window_op, set_call_argument

BLUR_CONTAINER = "fxblur"

# Placements a blurred op module carries whole, and those that run the op at stride 1.
IN_MODULE = ("blur_before", "subsample_before", "blur_after")
AT_STRIDE_ONE = ("subsample_before", "blur_after", "blur_past_nonlinearity")


class Blurs(nn.ModuleDict):
    """The container, ``fxblur`` in a module, of the blur modules a rewrite calls from its graph."""


@dataclass(frozen=True)
class Plan:
    """What to do with one call of an op: a placement, or the reason to leave it alone."""

    placement: str = ""
    reason: str = ""
    chain: tuple[fx.Node, ...] = ()  # the per-channel ops a blur past the nonlinearity moves past
    note: str = ""  # why the placement is not the one the options asked for


class RewriteContext:
    """What the passes of one rewrite share across the graphs of a model (one per mode).

    Args:
        graph_modules: every graph of the model, each over the model's own module tree.
        frozen: ids of modules that code outside the graphs may call; they never change.
        scope: the path of the rewritten module in the model the user passed, when that is
            a submodule (``transform(strict=False)``): ``exclude`` patterns match full paths.
    """

    def __init__(self, graph_modules: Iterable[fx.GraphModule], frozen: frozenset[int] = frozenset(), scope: str = ""):
        self.frozen = frozen
        self.scope = scope
        self.calls: dict[int, list[tuple[fx.GraphModule, fx.Node]]] = {}
        for gm in graph_modules:
            for node in gm.graph.nodes:
                if node.op == "call_module":
                    self.calls.setdefault(id(gm.get_submodule(node.target)), []).append((gm, node))
        self.realization: dict[int, str] = {}
        self.replacements: dict[str, nn.Module] = {}
        self._made: dict[int, nn.Module] = {}

    def replace(self, target: str, module: nn.Module, make: Callable[[], nn.Module]) -> nn.Module:
        """Replace ``module`` at ``target`` (once every graph is rewritten) by what ``make`` builds.

        Every call of the same module gets the same replacement, built on the first call.
        """
        if id(module) not in self._made:
            self._made[id(module)] = make()
        self.replacements[target] = self._made[id(module)]
        return self._made[id(module)]

    def install(self, root: nn.Module) -> None:
        """Put the replacements into ``root``: only once every graph has seen the original modules."""
        for target, module in self.replacements.items():
            owner, _, name = target.rpartition(".")
            root.get_submodule(owner)._modules[name] = module


class WindowOpPass(PassBase):
    """Blur every downsampling op of ``kind`` (``"conv"``, ``"max_pool"``, ...) in a graph.

    Args:
        options: the rewrite options.
        context: shared by the passes over every graph of one model; a pass run on a
            single GraphModule on its own makes one for it.
    """

    kind: str

    def __init__(self, options: BlurOptions, context: RewriteContext | None = None) -> None:
        self.options = options
        self.context = context

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        own_context = self.context is None
        context = RewriteContext([graph_module]) if own_context else self.context
        modified = False
        for node in list(graph_module.graph.nodes):
            op = read_window_op(node, graph_module)
            if op is None or op.kind != self.kind or not op.downsamples:
                continue
            plan = self.plan(op, graph_module)
            if not plan.placement:
                record(graph_module, change_record(op, "skipped", plan.reason))
                continue
            change = self._rewrite(graph_module, op, plan, context)
            record(graph_module, dataclasses.replace(change, note=plan.note or change.note))
            modified = True
        if own_context:
            context.install(graph_module)
        return PassResult(graph_module, modified)

    def plan(self, op: WindowOp, gm: fx.GraphModule) -> Plan:
        """Skip ``op`` (with the reason) or choose its placement.

        An op whose module has a ``forward`` of its own that fxblur does not know to honour
        its ``stride`` is blurred before (that needs nothing from its ``forward``).
        """
        reason = self.skip_reason(op, gm)
        if reason:
            return Plan(reason=reason)
        placement = self.placement(op)
        if placement != "blur_before" and op.custom_forward and not trusts_forward(type(op.module)):
            name = type(op.module).__name__
            why = f"{name} has a forward of its own; fxblur.trust_forward({name}) allows {placement}"
            return Plan("blur_before", note=why)
        return Plan(placement)

    def placement(self, op: WindowOp) -> str:
        """The rewrite for ``op``: the name of one of this pass's rewrite methods."""
        return "blur_before" if self.options.pools_blur_first else "blur_after"

    def skip_reason(self, op: WindowOp, gm: fx.GraphModule) -> str:
        """Why ``op`` must be left alone, or ``""``. Subclasses add their own reasons."""
        scope = self.context.scope if self.context else ""
        pattern = self.options.excluded(f"{scope}.{op.target}" if scope else op.target)
        if pattern is not None:
            return f"excluded by {pattern!r}"
        if isinstance(op.module, BlurredOp) or _is_blurred_before(op, gm):
            return "already blurred"
        if op.input.op == "call_function" and op.input.target in (roll_to_phase, select_phase):
            return "already subsampled by polyphase sampling"
        layer = _anti_aliasing_before(op, gm)
        if layer:
            return f"already anti-aliased by {layer}"
        return ""

    def blur(self, op: WindowOp, stride: tuple[int, ...]) -> Blur:
        """The blur for ``op``, subsampling by ``stride``."""
        return Blur(self.options.filter_taps(op.stride), stride, self.options.padding_mode, op.dims)

    def _rewrite(self, gm: fx.GraphModule, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        if op.module is None:
            return getattr(self, plan.placement)(gm, op, plan, context)
        realization = self._realization(op, context)
        if realization == "module":
            return self._blur_in_module(op, plan, context)
        if realization == "untouched" and plan.placement != "blur_before":
            change = self.blur_before(gm, op, plan, context)
            why = (
                "its module is also called from outside the graph"
                if id(op.module) in context.frozen
                else ("its other calls need the module as it is")
            )
            return dataclasses.replace(change, note=f"{plan.placement} would change {op.target}, but {why}")
        return getattr(self, plan.placement)(gm, op, plan, context)

    def _realization(self, op: WindowOp, context: RewriteContext) -> str:
        """How the op's module takes part: ``"module"`` (a blurred op module), ``"stride_one"`` (a stride-1
        copy, blurs in the graph) or ``"untouched"`` (blurs in the graph, before it)."""
        key = id(op.module)
        if key not in context.realization:
            plans = [self.plan(read_window_op(node, gm), gm) for gm, node in context.calls[key]]
            placements = {plan.placement for plan in plans}
            if key in context.frozen or "" in placements:
                context.realization[key] = "untouched"
            elif (
                len(placements) == 1
                and placements <= set(IN_MODULE)
                and type(op.module) in BLURRED
                and not (self.options.circular_padding and _pads_outside(op, placements.pop()))
            ):
                context.realization[key] = "module"
            elif placements <= set(AT_STRIDE_ONE):
                context.realization[key] = "stride_one"
            else:
                context.realization[key] = "untouched"
        return context.realization[key]

    def _blur_in_module(self, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        blur_input = plan.placement != "blur_after"
        stride_one = plan.placement != "blur_before"
        stride = op.stride if stride_one else (1,) * op.dims

        def blurred() -> nn.Module:
            return make_blurred(share_tensors(op.module), self.blur(op, stride), blur_input, stride_one)

        context.replace(op.target, op.module, blurred)
        return change_record(op, plan.placement, blur=f"{op.target}.{BLUR_CONTAINER}", blurred_module=True)

    def blur_before(self, gm: fx.GraphModule, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        """Blur the op's input at stride 1; the op keeps its stride."""
        return self._blur_input(gm, op, "blur_before", (1,) * op.dims, (), context)

    def subsample_before(self, gm: fx.GraphModule, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        """Blur and subsample the op's input; the op runs at stride 1 on what is left."""
        added = self.run_at_stride_one(gm, op, context)
        return self._blur_input(gm, op, "subsample_before", op.stride, added, context)

    def blur_after(self, gm: fx.GraphModule, op: WindowOp, plan: Plan, context: RewriteContext) -> Change:
        """Run the op at stride 1 and subsample its output with a blur."""
        source = op.input
        added = self.run_at_stride_one(gm, op, context)
        return self._blur_output(gm, op, "blur_after", source, added, (), context)

    def run_at_stride_one(self, gm: fx.GraphModule, op: WindowOp, context: RewriteContext) -> tuple[fx.Node, ...]:
        """Make ``op`` compute every window; return the nodes this needed to insert.

        At stride 1 a pool's ``ceil_mode`` has no effect, so it is switched off. The node
        remembers the stride it had (``STRIDED_AS``), for passes that pad around it.
        """
        ones = (1,) * op.dims
        op.node.meta[STRIDED_AS] = (op.stride, op.ceil_mode)
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

        context.replace(op.target, op.module, stride_one_copy)
        return ()

    def _blur_input(
        self,
        gm: fx.GraphModule,
        op: WindowOp,
        action: str,
        stride: tuple[int, ...],
        added: tuple[fx.Node, ...],
        context: RewriteContext,
    ) -> Change:
        source = op.input
        path = add_blur(gm, op.node, op.target, self.blur(op, stride), context.frozen)
        with gm.graph.inserting_before(op.node):
            blurred = place(gm.graph.call_module(path, (source,)), op.node)
        op.replace_input(blurred)
        return change_record(op, action, blur=path, input_node=source, added=(*added, blurred))

    def _blur_output(
        self,
        gm: fx.GraphModule,
        op: WindowOp,
        action: str,
        source: fx.Node,
        added: tuple[fx.Node, ...],
        chain: tuple[fx.Node, ...],
        context: RewriteContext,
    ) -> Change:
        """Subsample with a blur after the op, or after the per-channel ``chain`` that follows it."""
        last = chain[-1] if chain else op.node
        path = add_blur(gm, last, op.target, self.blur(op, op.stride), context.frozen)
        with gm.graph.inserting_after(last):
            blurred = place(gm.graph.call_module(path, (last,)), last)
        redirect(last, blurred, keep=[blurred])
        return change_record(
            op,
            action,
            blur=path,
            input_node=source,
            output_node=blurred,
            added=(*added, blurred),
            enlarged=(op.node, *chain),
        )


def add_blur(gm: fx.GraphModule, at: fx.Node, name: str, blur: Blur, frozen: frozenset[int] = frozenset()) -> str:
    """Install ``blur`` in the module whose call ``at`` belongs to, and return its path.

    It goes into that module's ``fxblur`` container (the nearest module that may change,
    if that one may not), named ``name`` with dots turned into underscores; an equal blur
    already there is reused, a different one gets a numbered name.
    """
    call = call_of(at)
    lineage = [] if call is None else list(call.lineage())
    owner_path = next((c.path for c in lineage if id(c.module) not in frozen), "")
    owner = gm.get_submodule(owner_path)
    container = owner._modules.get(BLUR_CONTAINER)
    taken = hasattr(owner, BLUR_CONTAINER) if container is None else type(container) is not Blurs
    if taken:
        raise ValueError(
            f"the module {owner_path or '(root)'} ({type(owner).__name__}) has an attribute named "
            f"{BLUR_CONTAINER!r}, which fxblur needs for the blurs its graph calls: rename it"
        )
    if container is None:
        container = Blurs()
        owner.add_module(BLUR_CONTAINER, container)
    prefix = f"{owner_path}.{BLUR_CONTAINER}" if owner_path else BLUR_CONTAINER
    base = (name[len(owner_path) + 1 :] if owner_path and name.startswith(f"{owner_path}.") else name).replace(".", "_")
    for key in chain([base], (f"{base}_{i}" for i in range(1, len(container) + 2))):
        if key not in container:
            container[key] = blur.to(_device_of(gm))
            return f"{prefix}.{key}"
        if container[key].spec == blur.spec:
            return f"{prefix}.{key}"
    raise AssertionError("unreachable: a free name always exists")


def _pads_outside(op: WindowOp, placement: str) -> bool:
    """Whether circular padding would put a padding node before ``op`` (a blurred op module cannot hold it).

    A conv pads inside, circularly, when its padding makes up for its kernel (or, keeping
    its stride, when it needs none); a pool with padding or ceil-mode windows never does.
    """
    if op.kind != "conv":
        return bool(op.ceil_mode or any(op.padding))
    if isinstance(op.padding, str):
        return True
    spans = [d * (k - 1) for k, d in zip(op.kernel_size, op.dilation, strict=True)]
    if placement == "blur_before":
        return any(p and 2 * p != span for p, span in zip(op.padding, spans, strict=True))
    return any(2 * p != span for p, span in zip(op.padding, spans, strict=True))


def _anti_aliasing_before(op: WindowOp, gm: fx.GraphModule) -> str | None:
    """The known anti-aliasing layer that feeds ``op`` without subsampling (a blur at stride 1), if any."""
    source = op.input
    if source.op != "call_module":
        return None
    layer = gm.get_submodule(source.target)
    stride = getattr(layer, "stride", None)
    strides = stride if isinstance(stride, (tuple, list)) else (stride,)
    return anti_aliasing(layer) if all(s == 1 for s in strides) else None


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


def change_record(
    op: WindowOp,
    action: str,
    reason: str = "",
    blur: str | None = None,
    input_node: fx.Node | None = None,
    output_node: fx.Node | None = None,
    added: tuple[fx.Node, ...] = (),
    enlarged: tuple[fx.Node, ...] = (),
    blurred_module: bool = False,
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
        blurred_module=blurred_module,
    )


def skipped_outside_graph(module: nn.Module, target: str, reason: str) -> Change | None:
    """The record of a strided conv or pool module no graph calls (it runs inside a leaf module), or ``None``."""
    base = next((cls for cls in MODULES if isinstance(module, cls)), None)
    if base is None:
        return None
    kind, dims = MODULES[base]
    stride = expand_to_axes(module.stride, dims)
    if not any(s > 1 for s in stride):
        return None
    return Change(
        target=target,
        op=f"{kind}{dims}d",
        action="skipped",
        reason=reason,
        kernel_size=expand_to_axes(module.kernel_size, dims),
        stride=stride,
        in_channels=getattr(module, "in_channels", None),
        out_channels=getattr(module, "out_channels", None),
        blur=None,
        node="",
        input_node="",
        output_node="",
    )
