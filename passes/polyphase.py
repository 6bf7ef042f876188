"""Adaptive polyphase sampling as a graph pass: every downsampling op subsamples at a phase chosen per sample.

With ``polyphase=True`` this pass replaces the blur passes. It finds the strided convs and
pools they would (their skip reasons and placements are theirs: ``kinds``), groups the ops
that must share a phase (``fxblur.analysis.phase_groups``), and rewrites each in the
placement the options ask for (``fxblur.ops.polyphase`` holds the ops it inserts):

- ``PHASE_BEFORE`` (``blur_first``): an optional stride-1 blur, the phase chosen on the
  op's input, the input rolled per sample by it, and the op at its own stride. The cheap
  form: the original op plus one norm and one roll.
- ``PHASE_SUBSAMPLE_BEFORE`` (a 1x1 conv without padding, in any placement): the blurred
  input's component at the phase, and the conv at stride 1 on it. With a phase shared from
  its group, the input is rolled to it and blurred by a subsampling blur (the same values
  under circular padding, a quarter of the blur's work).
- ``PHASE_AFTER`` (``blur_first=False``): the op at stride 1, the stride-1 blur, then the
  component with the largest norm (APS as published).
- ``PHASE_PAST_NONLINEARITY``: as ``PHASE_AFTER``, selecting after the per-channel ops that
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

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxblur.analysis.phase_groups import GroupProblem, PhaseGroup, phase_groups
from fxblur.analysis.subsampling import SubsamplingOp, change_of_subsampling, read_subsampling
from fxblur.analysis.window_ops import WindowOp, change_of, read_window_op
from fxblur.ops.along import phase_along, roll_along
from fxblur.ops.polyphase import phase_of, roll_to_phase, select_phase
from fxblur.options import BlurOptions
from fxblur.passes.context import Realization, RewriteContext
from fxblur.passes.edit import add_submodule, insert_after, insert_before, replace_uses
from fxblur.passes.subsampling import BlurSubsampling, blur_node
from fxblur.passes.window_pass import Plan, WindowOpPass
from fxblur.record import Action, Change, PhaseGroupRecord, log_decision, log_phase_group
from fxblur.trace.calls import Call, call_of, nodes_in


@dataclasses.dataclass
class _Member:
    op: WindowOp
    plan: Plan
    kind: WindowOpPass


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
        context = self.context or RewriteContext([graph_module])
        members = []
        subsampling = next((k for k in self.kinds if isinstance(k, BlurSubsampling)), None)
        for node in list(graph_module.graph.nodes):
            op = read_window_op(node, graph_module)
            kind = next((k for k in self.kinds if op is not None and op.kind in k.kinds), None)
            if op is None and subsampling is not None:
                op, kind = read_subsampling(node, graph_module), subsampling
            if op is None or kind is None or not op.downsamples:
                continue
            plan = kind.plan(op, graph_module, context)
            if plan.placement is not None:
                members.append(_Member(op, plan, kind))
            else:
                log_decision(graph_module, _record(op, Action.SKIPPED, plan.reason))
        by_node = {member.op.node: member for member in members}
        for group in phase_groups([member.op for member in members], graph_module):
            self._rewrite_group(graph_module, group, [by_node[op.node] for op in group.members], context)
        if self.context is None:
            context.install(graph_module)
        return PassResult(graph_module, bool(members))

    def _rewrite_group(
        self, gm: fx.GraphModule, group: PhaseGroup, members: list[_Member], context: RewriteContext
    ) -> None:
        for member in members:  # an op whose module cannot run at stride 1 chooses its phase before it
            if member.plan.placement.at_stride_one and not self._may_run_at_stride_one(member, context):
                note = member.kind.why_untouched(member.op, member.plan.placement, context)
                member.plan = Plan(Action.BLUR_BEFORE, note=note)
        order = sorted(members, key=lambda m: _position(gm, m.plan.chain[-1] if m.plan.chain else m.op.node))
        first_selects_after = order[0].plan.placement.selects_after  # then its own phase is every member's
        problem = group.problem if len(members) > 1 else None
        if first_selects_after and problem is GroupProblem.NO_COMMON_SOURCE:
            problem = None  # no source needed
        shared = None
        if len(members) > 1 and problem is None and not first_selects_after:
            shared = self._phase_at_source(gm, group, members)
        note = f"phase group {group.name}: {problem}, so its ops choose their phases apart" if problem else ""
        for member in order:
            change, phase = self._rewrite(gm, member, shared, context)
            if len(members) > 1 and problem is None:
                shared = phase
            log_decision(gm, dataclasses.replace(change, phase_group=group.name, note=member.plan.note or note))
        targets = tuple(member.op.target for member in order)
        log_phase_group(gm, PhaseGroupRecord(group.name, targets, str(problem) if problem else ""))

    def _rewrite(
        self, gm: fx.GraphModule, member: _Member, phase: fx.Node | None, context: RewriteContext
    ) -> tuple[Change, fx.Node]:
        placement = member.plan.placement.polyphase_form()
        if placement in (Action.PHASE_BEFORE, Action.PHASE_SUBSAMPLE_BEFORE):
            return self._phase_before(gm, member, placement, phase, context)
        return self._phase_after(gm, member, placement, phase, context)

    def _phase_before(
        self, gm: fx.GraphModule, member: _Member, placement: Action, phase: fx.Node | None, context: RewriteContext
    ) -> tuple[Change, fx.Node]:
        """Choose the phase on the op's input (or take the group's) and move the input to it, before the op."""
        op = member.op
        source = op.input
        # with a phase shared from its group, the input's preparation is computed where the phase is,
        # if the calls in between only hand the op its input: they are then handed the result
        where = phase if phase is not None and _only_hands_on(op, phase) else op.node
        added: list[fx.Node] = []
        if placement is Action.PHASE_SUBSAMPLE_BEFORE:
            added += member.kind.run_at_stride_one(gm, op, context)
        if placement is Action.PHASE_SUBSAMPLE_BEFORE and phase is not None:
            moved, blur_path = self._subsample_at(gm, op, phase, where, context)
            added += [moved.args[0]] if moved.op == "call_module" else []
        elif isinstance(op, SubsamplingOp):  # along its own axes, of a map of any rank
            blurred, blur_path = self._blur(gm, op, source, op.node, before=True, where=where, context=context)
            added += [blurred] if blurred is not source else []
            if phase is None:
                norm = self.options.polyphase_norm
                phase = insert_before(op.node, phase_along, (blurred, op.axes, list(op.stride), norm), where=where)
                added.append(phase)
            moved = insert_before(op.node, roll_along, (blurred, op.axes, phase), where=where)
        else:
            blurred, blur_path = self._blur(gm, op, source, op.node, before=True, where=where, context=context)
            added += [blurred] if blurred is not source else []
            if phase is None:
                stride, norm = list(op.stride), self.options.polyphase_norm
                phase = insert_before(op.node, phase_of, (blurred, stride, norm), where=where)
                added.append(phase)
            if placement is Action.PHASE_BEFORE:
                moved = insert_before(op.node, roll_to_phase, (blurred, phase), where=where)
            else:
                moved = insert_before(op.node, select_phase, (blurred, phase, list(op.stride)), where=where)
        replace_uses(source, moved, only=[op.node])
        return _record(op, placement, blur=blur_path, input_node=source, added=(*added, moved)), phase

    def _phase_after(
        self, gm: fx.GraphModule, member: _Member, placement: Action, phase: fx.Node | None, context: RewriteContext
    ) -> tuple[Change, fx.Node]:
        """Run the op at stride 1 and select the phase after it (or after its per-channel chain)."""
        op, plan = member.op, member.plan
        source = op.input
        added = list(member.kind.run_at_stride_one(gm, op, context))
        last = plan.chain[-1] if plan.chain else op.node
        blurred, blur_path = self._blur(gm, op, last, last, before=False, context=context)
        anchor = blurred
        if blurred is not last:
            added.append(blurred)
        if phase is None:
            phase = insert_after(anchor, phase_of, (blurred, list(op.stride), self.options.polyphase_norm))
            added.append(phase)
            anchor = phase
        selected = insert_after(anchor, select_phase, (blurred, phase, list(op.stride)), where=last)
        replace_uses(last, selected, keep=[blurred, phase, selected])
        self._replaced[last] = selected
        change = change_of(
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
        context: RewriteContext,
        where: fx.Node | None = None,
        stride: tuple[int, ...] | None = None,
    ) -> tuple[fx.Node, str | None]:
        """``value`` through a blur at ``stride`` (default 1; none for a 1-tap filter), next to ``anchor``.

        The blur belongs to the module call of ``where`` if given, else of ``anchor``.
        """
        taps = self.options.filter_taps(op.stride)
        if all(t == 1 for t in taps):
            return value, None
        if isinstance(op, SubsamplingOp):
            return blur_node(op, value, self.options), None
        blur = self.kinds[0].blur(op, stride or (1,) * op.dims)
        path = add_submodule(gm, where or anchor, op.target, blur, context.frozen)
        insert = insert_before if before else insert_after
        return insert(anchor, path, (value,), where=where), path

    def _subsample_at(
        self, gm: fx.GraphModule, op: WindowOp, phase: fx.Node, where: fx.Node, context: RewriteContext
    ) -> tuple[fx.Node, str | None]:
        """``op``'s input, blurred, at component ``phase``: rolled to it, then through a subsampling blur.

        With circular padding that is the stride-1 blur's component, at a quarter of the blur's
        cost for a stride of 2, and no full-size gradient to scatter into; with a 1-tap filter,
        the input's component itself.
        """
        if all(t == 1 for t in self.options.filter_taps(op.stride)):
            return insert_before(op.node, select_phase, (op.input, phase, list(op.stride)), where=where), None
        rolled = insert_before(op.node, roll_to_phase, (op.input, phase), where=where)
        return self._blur(gm, op, rolled, op.node, before=True, where=where, stride=op.stride, context=context)

    def _phase_at_source(self, gm: fx.GraphModule, group: PhaseGroup, members: list[_Member]) -> fx.Node:
        """The group's phase, chosen once on its source, in the module call that holds all its ops."""
        op, norm = members[0].op, self.options.polyphase_norm
        source = self._replaced.get(group.source, group.source)  # an earlier group may have selected it
        where = [member.op.node for member in members]
        if isinstance(op, SubsamplingOp):
            return insert_after(source, phase_along, (source, op.axes, list(op.stride), norm), where=where)
        return insert_after(source, phase_of, (source, list(op.stride), norm), where=where)

    def _may_run_at_stride_one(self, member: _Member, context: RewriteContext) -> bool:
        op = member.op
        if op.module is None:
            return True
        return member.kind.realization(op, context) in (Realization.STRIDE_ONE, Realization.MODULE)


def _record(op: WindowOp | SubsamplingOp, action: Action, reason: str = "", **found) -> Change:
    if isinstance(op, SubsamplingOp):
        return change_of_subsampling(op, action, reason, blur=found.get("blur"), added=found.get("added", ()))
    return change_of(op, action, reason, **found)


def _only_hands_on(op: WindowOp, phase: fx.Node) -> bool:
    """Whether the calls between ``op``'s and ``phase``'s only hand ``op`` its input.

    Nodes that prepare the input (a blur, a roll by the phase) can then be computed where
    the phase is, and those calls handed the result instead: a ResNet shortcut
    (``Sequential(conv, bn)``) keeps its code, and no call needs inlining. Not so when the
    input is not such an argument, or something else in a call reads it.
    """
    host, call = call_of(phase), call_of(op.node)
    while call is not None and host is not None and call is not host:
        received = set(nodes_in((call.args, call.kwargs)))
        inside = [user for user in op.input.users if _within(user, call)]
        if op.input not in received or inside != [op.node]:
            return False
        call = call.parent
    return call is not None and call is host and call_of(op.node) is not host


def _within(node: fx.Node, call: Call) -> bool:
    owner = call_of(node)
    return owner is not None and any(each is call for each in owner.lineage())


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    return next(i for i, each in enumerate(gm.graph.nodes) if each is node)
