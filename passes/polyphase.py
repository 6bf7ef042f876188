"""Adaptive polyphase sampling as a graph pass: every downsampling op subsamples at a phase chosen per sample.

With ``polyphase=True`` this pass replaces the blur passes. It finds the strided convs and
pools they would (their skip reasons and placements are theirs: ``kinds``), groups the ops
that must share a phase (``fxblur.rewrite.phase_groups``), and rewrites each in the
placement the options ask for (``fxblur.ops.polyphase`` holds the ops it inserts):

- ``phase_before`` (``blur_first``): an optional stride-1 blur, the phase chosen on the
  op's input, the input rolled per sample by it, and the op at its own stride. The cheap
  form: the original op plus one norm and one roll.
- ``phase_subsample_before`` (a 1x1 conv without padding, in any placement): the blurred
  input's component at the phase, and the conv at stride 1 on it. With a phase shared from
  its group, the input is rolled to it and blurred by a subsampling blur (the same values
  under circular padding, a quarter of the blur's work).
- ``phase_after`` (``blur_first=False``): the op at stride 1, the stride-1 blur, then the
  component with the largest norm (APS as published).
- ``phase_past_nonlinearity``: as ``phase_after``, selecting after the per-channel ops that
  follow the conv (the APS ResNets).

A group of several ops shares one phase. When its first op (in graph order) selects after
itself, the phase that op chooses on its own output is every member's (a ResNet block's
main branch's, its shortcut selecting with it, as in the APS ResNets); when it chooses before
itself, the phase is chosen once on the group's source, the tensor all members read through
stride-1 ops (the block's input). A group whose phase cannot be shared (ops of different
strides, or outputs that meet without a common source) lets each member choose its own, and
its records say why invariance is lost there.

Example:
    >>> from torch.fx.passes.infra.pass_manager import PassManager
    >>> from fxblur.passes import BlurStridedConvs
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, stride=2)))
    >>> options = BlurOptions(polyphase=True)
    >>> PassManager([PolyphaseSampling(options, kinds=[BlurStridedConvs(options)])])(gm).modified
    True
    >>> [node.target.__name__ for node in gm.graph.nodes if node.op == "call_function"]
    ['phase_of', 'roll_to_phase']
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxblur.changes import Change, record
from fxblur.ops.polyphase import phase_of, roll_to_phase, select_phase
from fxblur.options import BlurOptions
from fxblur.passes.window_pass import AT_STRIDE_ONE, Plan, RewriteContext, WindowOpPass, add_blur, change_record
from fxblur.rewrite.calls import CALL, Call, call_of, map_nodes, nodes_in, place, redirect
from fxblur.rewrite.phase_groups import PhaseGroup, phase_groups
from fxblur.rewrite.window_ops import WindowOp, read_window_op

_PLACEMENTS = {
    "blur_before": "phase_before",
    "subsample_before": "phase_subsample_before",
    "blur_after": "phase_after",
    "blur_past_nonlinearity": "phase_past_nonlinearity",
}


@dataclasses.dataclass
class _Member:
    op: WindowOp
    plan: Plan
    kind: WindowOpPass

    @property
    def selects_after(self) -> bool:
        return self.plan.placement in ("blur_after", "blur_past_nonlinearity")


class PolyphaseSampling(PassBase):
    """Subsample every downsampling op of ``kinds`` by adaptive polyphase sampling (see the module docstring).

    Args:
        options: the rewrite options (``polyphase_norm``, ``filter_size``, placements).
        context: shared by the passes over every graph of one model.
        kinds: the blur passes whose ops to take, for their skip reasons, placements and
            stride-1 conversions.
    """

    def __init__(
        self, options: BlurOptions, context: RewriteContext | None = None, kinds: list[WindowOpPass] = ()
    ) -> None:
        self.options = options
        self.context = context
        self.kinds = list(kinds)
        self._replaced: dict[fx.Node, fx.Node] = {}  # a value now read through the selection after it

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        own_context = self.context is None
        context = RewriteContext([graph_module]) if own_context else self.context
        for kind in self.kinds:
            kind.context = context
        members = []
        for node in list(graph_module.graph.nodes):
            op = read_window_op(node, graph_module)
            kind = next((k for k in self.kinds if op is not None and k.kind == op.kind), None)
            if kind is None or not op.downsamples:
                continue
            plan = kind.plan(op, graph_module)
            if plan.placement:
                members.append(_Member(op, plan, kind))
            else:
                record(graph_module, change_record(op, "skipped", plan.reason))
        by_node = {member.op.node: member for member in members}
        for group in phase_groups([member.op for member in members], graph_module):
            self._rewrite_group(graph_module, group, [by_node[op.node] for op in group.members], context)
        if own_context:
            context.install(graph_module)
        return PassResult(graph_module, bool(members))

    def _rewrite_group(self, gm: fx.GraphModule, group: PhaseGroup, members: list[_Member], context) -> None:
        for member in members:  # an op whose module cannot run at stride 1 chooses its phase before it
            if member.plan.placement in AT_STRIDE_ONE and not self._may_run_at_stride_one(member, context):
                member.plan = Plan("blur_before", note=self._why_not_stride_one(member, context))
        order = sorted(members, key=lambda m: _position(gm, m.plan.chain[-1] if m.plan.chain else m.op.node))
        first_selects_after = order[0].selects_after  # then its own phase, chosen after it, is every member's
        problem = group.problem if len(members) > 1 else ""
        if first_selects_after and problem and not problem.startswith("its ops subsample"):
            problem = ""  # no source needed
        shared = None
        if len(members) > 1 and not problem and not first_selects_after:
            shared = self._phase_at_source(gm, group, members)
        note = f"phase group {group.name}: {problem}, so its ops choose their phases apart" if problem else ""
        for member in order:
            change, phase = self._rewrite(gm, member, shared, context)
            if len(members) > 1 and not problem:
                shared = phase
            record(gm, dataclasses.replace(change, phase_group=group.name, note=member.plan.note or note))

    def _rewrite(
        self, gm: fx.GraphModule, member: _Member, phase: fx.Node | None, context: RewriteContext
    ) -> tuple[Change, fx.Node]:
        op, plan = member.op, member.plan
        placement = _PLACEMENTS[plan.placement]
        if placement in ("phase_before", "phase_subsample_before"):
            source = op.input
            passed = _passed_through(op, phase) if phase is not None else []
            added: list[fx.Node] = []
            if placement == "phase_subsample_before":
                added += member.kind.run_at_stride_one(gm, op, context)
            if placement == "phase_subsample_before" and phase is not None:
                moved, blur_path = self._subsample_at(gm, op, phase, host=passed and phase)
                added += [moved.args[0]] if moved.op == "call_module" else []
            else:
                blurred, blur_path = self._blur(gm, op, op.input, op.node, before=True, host=passed and phase)
                added += [blurred] if blurred is not source else []
                if phase is None:
                    norm = self.options.polyphase_norm
                    phase = self._insert_before(gm, op.node, phase_of, (blurred, list(op.stride), norm))
                    added.append(phase)
                if placement == "phase_before":
                    moved = self._insert_before(gm, op.node, roll_to_phase, (blurred, phase))
                else:
                    moved = self._insert_before(gm, op.node, select_phase, (blurred, phase, list(op.stride)))
            op.replace_input(moved)
            for node in (*added, moved) if passed else ():  # computed in the call that holds the phase
                node.meta[CALL] = call_of(phase)
            for call in passed:  # which now hands the op's input down, ready
                call.args, call.kwargs = map_nodes((call.args, call.kwargs), lambda n: moved if n is source else n)
            change = change_record(op, placement, blur=blur_path, input_node=source, added=(*added, moved))
            return change, phase
        source = op.input
        added = list(member.kind.run_at_stride_one(gm, op, context))
        last = plan.chain[-1] if plan.chain else op.node
        blurred, blur_path = self._blur(gm, op, last, last, before=False)
        anchor = blurred
        if blurred is not last:
            added.append(blurred)
        if phase is None:
            phase = _insert_after(gm, anchor, phase_of, (blurred, list(op.stride), self.options.polyphase_norm))
            added.append(phase)
            anchor = phase
        selected = _insert_after(gm, anchor, select_phase, (blurred, phase, list(op.stride)), like=last)
        redirect(last, selected, keep=[blurred, phase, selected])
        self._replaced[last] = selected
        change = change_record(
            op, placement, blur=blur_path, input_node=source, output_node=selected, added=(*added, selected),
            enlarged=(op.node, *plan.chain),
        )  # fmt: skip
        return change, phase

    def _blur(
        self,
        gm: fx.GraphModule,
        op: WindowOp,
        value: fx.Node,
        anchor: fx.Node,
        before: bool,
        host: Any = None,
        stride: tuple[int, ...] | None = None,
    ) -> tuple[fx.Node, str | None]:
        """``value`` through a blur at ``stride`` (default 1; none for a 1-tap filter), next to ``anchor``.

        The blur module goes into the module of ``host``'s call if given, else ``anchor``'s.
        """
        taps = self.options.filter_taps(op.stride)
        if all(t == 1 for t in taps):
            return value, None
        blur = self.kinds[0].blur(op, stride or (1,) * op.dims)
        path = add_blur(gm, host or anchor, op.target, blur, self.context.frozen if self.context else frozenset())
        with gm.graph.inserting_before(anchor) if before else gm.graph.inserting_after(anchor):
            node = place(gm.graph.call_module(path, (value,)), anchor)
        return node, path

    def _subsample_at(self, gm: fx.GraphModule, op: WindowOp, phase: fx.Node, host: Any) -> tuple[fx.Node, str | None]:
        """``op``'s input, blurred, at component ``phase``: rolled to it, then through a subsampling blur.

        With circular padding that is the stride-1 blur's component, at a quarter of the blur's
        cost for a stride of 2, and no full-size gradient to scatter into; with a 1-tap filter,
        the input's component itself.
        """
        if all(t == 1 for t in self.options.filter_taps(op.stride)):
            return self._insert_before(gm, op.node, select_phase, (op.input, phase, list(op.stride))), None
        rolled = self._insert_before(gm, op.node, roll_to_phase, (op.input, phase))
        return self._blur(gm, op, rolled, op.node, before=True, host=host, stride=op.stride)

    def _insert_before(self, gm: fx.GraphModule, anchor: fx.Node, function, args: tuple) -> fx.Node:
        with gm.graph.inserting_before(anchor):
            node = place(gm.graph.call_function(function, args), anchor)
        node.meta["is_wrapped"] = True  # the generated code re-registers torch.fx.wrap
        return node

    def _phase_at_source(self, gm: fx.GraphModule, group: PhaseGroup, members: list[_Member]) -> fx.Node:
        """The group's phase, chosen once on its source, in the module call that holds all its ops."""
        stride = list(members[0].op.stride)
        source = self._replaced.get(group.source, group.source)  # an earlier group may have selected it
        node = _insert_after(gm, source, phase_of, (source, stride, self.options.polyphase_norm))
        holder = _common_call([call_of(member.op.node) for member in members])
        if holder is not None:
            node.meta[CALL] = holder
        return node

    def _may_run_at_stride_one(self, member: _Member, context: RewriteContext) -> bool:
        op = member.op
        if op.module is None:
            return True
        return member.kind._realization(op, context) in ("stride_one", "module")

    def _why_not_stride_one(self, member: _Member, context: RewriteContext) -> str:
        op = member.op
        why = (
            "its module is also called from outside the graph"
            if id(op.module) in context.frozen
            else ("its other calls need the module as it is")
        )
        return f"{member.plan.placement} would change {op.target}, but {why}"


def _insert_after(gm: fx.GraphModule, anchor: fx.Node, function, args: tuple, like: fx.Node | None = None) -> fx.Node:
    with gm.graph.inserting_after(anchor):
        node = place(gm.graph.call_function(function, args), like or anchor)
    node.meta["is_wrapped"] = True
    return node


def _passed_through(op: WindowOp, phase: fx.Node) -> list[Call]:
    """The calls between ``op``'s and ``phase``'s that only hand ``op`` its input, innermost first.

    Nodes that prepare the input (a blur, a roll by the phase) can then be computed where
    the phase is, and those calls handed the result instead: a ResNet shortcut
    (``Sequential(conv, bn)``) keeps its code, and no call needs inlining. Empty when the
    input is not such an argument, or something else in a call reads it.
    """
    host, call = call_of(phase), call_of(op.node)
    chain: list[Call] = []
    while call is not None and host is not None and call is not host:
        received = set(nodes_in((call.args, call.kwargs)))
        inside = [user for user in op.input.users if any(c is call for c in call_of(user).lineage())]
        if op.input not in received or inside != [op.node]:
            return []
        chain.append(call)
        call = call.parent
    return chain if call is host else []


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    return next(i for i, each in enumerate(gm.graph.nodes) if each is node)


def _common_call(calls: list[Call | None]) -> Call | None:
    """The innermost call that every call of ``calls`` happened in (or is)."""
    if any(call is None for call in calls):
        return None
    lineages = [list(call.lineage()) for call in calls]
    return next((call for call in lineages[0] if all(any(c is call for c in other) for other in lineages[1:])), None)
