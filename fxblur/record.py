"""The one record of a rewrite: what ``transform`` was asked, what it decided, where the rewrite went.

``transform`` writes one frozen ``RewriteRecord`` on the module it returns, under one key;
``fxblur.changes``, ``fxblur.report`` and ``python -m fxblur.inspect`` read only it. It
holds the options used (``record.options`` and ``record.tracing``: a checkpointed run can
be reproduced with ``fxblur.transform(model, **record.transform_arguments())``), one
``Change`` per strided op considered, the phase groups of polyphase sampling, where the
rewrite went in the module tree (``nesting``), the parts of a model rewritten in parts,
the ``forward`` arguments fixed to their defaults, the equivariance analysis's verdict
(``fxblur.analysis.equivariance``), and the flat
rewritten graph of each mode (which the decisions' node names refer to).

While a rewrite runs, passes log each decision on the graph module they rewrite as they
make it (``log_decision``); ``transform`` gathers the logs into the record. Nothing
re-derives a decision afterwards.

Example:
    >>> import torchvision
    >>> gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
    >>> first = changes(gm)[0]
    >>> first.target, first.op, first.action is Action.SKIPPED, first.reason
    ('conv1', 'conv2d', True, 'in_channels 3 < min_channels 16')
    >>> record_of(gm).options.blur_first, record_of(gm).transform_arguments()["min_channels"]
    (True, 16)
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

if TYPE_CHECKING:
    from fxblur.analysis.equivariance import Verdict
    from fxblur.assemble.nesting import Nesting
    from fxblur.assemble.partial import Parts
    from fxblur.options import BlurOptions

_RECORD_KEY = "fxblur.record"
_LOG_KEY = "fxblur.log"


class Action(str, enum.Enum):
    """What a rewrite did to one strided op: a placement (see ``fxblur.passes``), or ``SKIPPED``."""

    BLUR_BEFORE = "blur_before"
    SUBSAMPLE_BEFORE = "subsample_before"
    BLUR_AFTER = "blur_after"
    BLUR_PAST_NONLINEARITY = "blur_past_nonlinearity"
    PHASE_BEFORE = "phase_before"
    PHASE_SUBSAMPLE_BEFORE = "phase_subsample_before"
    PHASE_AFTER = "phase_after"
    PHASE_PAST_NONLINEARITY = "phase_past_nonlinearity"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def polyphase(self) -> bool:
        """Whether the op subsamples at a phase chosen per sample."""
        return self.value.startswith("phase_")

    @property
    def at_stride_one(self) -> bool:
        """Whether the op itself runs at stride 1 (a blur or selection after it, or before it, subsamples)."""
        return self in _AT_STRIDE_ONE

    @property
    def selects_after(self) -> bool:
        """Whether the op's phase is chosen on its own output, after it."""
        return self in (Action.BLUR_AFTER, Action.BLUR_PAST_NONLINEARITY, Action.PHASE_AFTER,
                        Action.PHASE_PAST_NONLINEARITY)  # fmt: skip

    def polyphase_form(self) -> Action:
        """The polyphase placement of a blur placement (``BLUR_BEFORE`` -> ``PHASE_BEFORE``)."""
        return _POLYPHASE_FORMS[self]


_AT_STRIDE_ONE = frozenset({Action.SUBSAMPLE_BEFORE, Action.BLUR_AFTER, Action.BLUR_PAST_NONLINEARITY})
_POLYPHASE_FORMS = {
    Action.BLUR_BEFORE: Action.PHASE_BEFORE,
    Action.SUBSAMPLE_BEFORE: Action.PHASE_SUBSAMPLE_BEFORE,
    Action.BLUR_AFTER: Action.PHASE_AFTER,
    Action.BLUR_PAST_NONLINEARITY: Action.PHASE_PAST_NONLINEARITY,
}


@dataclass(frozen=True)
class Change:
    """What happened to one strided conv or pool.

    Attributes:
        target: module path for a module call (``"layer2.0.conv2"``); for a functional
            call, the module whose ``forward`` makes it and the function
            (``"Mixed_6a.max_pool2d"``).
        op: ``"conv2d"``, ``"max_pool2d"``, ...
        action: the placement taken (``Action``), or ``Action.SKIPPED``.
        reason: why it was skipped; empty otherwise.
        kernel_size, stride: the op's geometry as it was before the rewrite (``()``: an op
            without a window, such as a strided slice).
        in_channels, out_channels: for convs whose weight is known, else ``None``.
        blur: path of the ``Blur`` module the rewrite inserted, if any.
        blurred_module: the op's module was replaced by a blurred version of itself that
            carries the blur (``fxblur.ops.blurred``): no graph around it changed.
        note: for an op blurred in another way than the options asked, why.
        phase_group: with polyphase sampling, the group of ops that share the op's phase,
            named by its first op's target (``fxblur.analysis.phase_groups``).
        node: the op's node in the rewritten graph.
        input_node: the node that fed the op before the rewrite.
        output_node: the node whose output now stands for the op's original output.
        added_nodes: nodes the rewrite inserted (the blur, padding).
        enlarged_nodes: nodes that now compute at full resolution (an op run at stride 1,
            and the BatchNorm and activations past which the blur moved).

    Node names refer to the flat graph of the mode the model was in when it was transformed.
    """

    target: str
    op: str
    action: Action
    reason: str
    kernel_size: tuple[int, ...] | None
    stride: tuple[int, ...]
    in_channels: int | None
    out_channels: int | None
    blur: str | None
    node: str
    input_node: str
    output_node: str
    added_nodes: tuple[str, ...] = ()
    enlarged_nodes: tuple[str, ...] = ()
    blurred_module: bool = False
    note: str = ""
    phase_group: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action(self.action))


@dataclass(frozen=True)
class PhaseGroupRecord:
    """A phase group as decided: its ops, and why they could not share one phase (``""`` if they do)."""

    name: str
    members: tuple[str, ...]
    problem: str = ""


@dataclass(frozen=True)
class RewriteRecord:
    """Everything one ``transform`` call asked for and decided (see the module docstring).

    Attributes:
        model: the class name of the model rewritten.
        options: the rewrite options, after presets and defaults (``fxblur.options.BlurOptions``).
        tracing: the other arguments of ``transform``: ``copy``, ``strict``, ``flatten``,
            ``leaf_modules`` (paths, and classes by qualified name) and the names in
            ``concrete_args``.
        decisions: one ``Change`` per strided conv or pool considered, in graph order.
        phase_groups: with polyphase sampling, the groups of ops that share a phase.
        nesting: which modules got a forward of their own, and which were inlined
            (``None`` for a flat result, and for a model rewritten in parts).
        parts: for a model rewritten in parts, which parts and which modules could not be traced.
        specialised: the ``forward`` arguments fixed to their defaults, as (name, value) pairs.
        example_shape: the input shape the rewrite's claims are proved at by default (224 px
            for images; ``fxblur.analysis.equivariance.example_shape``).
        flat_graphs: the flat rewritten graph of each mode, train then eval, over the
            result's modules (the same object twice when the modes share one): ``flat_graph``
            gives a mode's GraphModule, ``flat_graphs[i].graph`` its graph without building one.
    """

    model: str
    options: BlurOptions
    tracing: tuple[tuple[str, Any], ...]
    decisions: tuple[Change, ...]
    phase_groups: tuple[PhaseGroupRecord, ...] = ()
    nesting: Nesting | None = None
    parts: Parts | None = None
    specialised: tuple[tuple[str, Any], ...] = ()
    example_shape: tuple[int, ...] | None = None
    flat_graphs: tuple[FlatGraph, ...] | None = dataclasses.field(default=None, compare=False, repr=False)
    _verdicts: dict[tuple[int, ...], Verdict] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def verdict(self) -> Verdict | None:
        """With polyphase sampling or circular padding, what the equivariance analysis proves at ``example_shape``.

        ``None`` when neither was asked (nothing is claimed), or for a model rewritten in parts.
        """
        if not (self.options.polyphase or self.options.circular_padding) or self.example_shape is None:
            return None
        return self.verdict_at(self.example_shape)

    def verdict_at(self, shape: tuple[int, ...]) -> Verdict:
        """What the equivariance analysis proves of the eval-mode graph at input ``shape`` (computed once per shape)."""
        from fxblur.analysis.equivariance import analyse, example_for  # the analysis reads records' types

        shape = tuple(shape)
        if shape not in self._verdicts:
            graph = self.flat_graph(False)
            self._verdicts[shape] = analyse(graph, example_for(graph, shape))
        return self._verdicts[shape]

    def flat_graph(self, training: bool) -> fx.GraphModule | None:
        """The flat rewritten graph of a mode (``None`` for a model rewritten in parts)."""
        return None if self.flat_graphs is None else self.flat_graphs[0 if training else 1].module()

    def transform_arguments(self) -> dict[str, Any]:
        """The keyword arguments that make ``fxblur.transform`` repeat this rewrite.

        ``leaf_modules`` classes come back as their qualified names: pass the classes themselves.
        """
        tracing = dict(self.tracing)
        return {**dataclasses.asdict(self.options), **tracing, "concrete_args": dict(tracing["concrete_args"])}


class FlatGraph:
    """A rewritten graph and the modules and tensors it names; its GraphModule is built when first asked for.

    Building a GraphModule generates and compiles its code (a fifth of a rewrite's time on
    large models), which most rewrites never need; the modules are looked up at once, as
    they are when the rewrite is made.

    Example:
        >>> traced = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
        >>> flat = FlatGraph(traced, traced.graph)
        >>> [node.op for node in flat.module().graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """

    def __init__(self, root: nn.Module, graph: fx.Graph) -> None:
        targets = {node.target for node in graph.nodes if node.op in ("call_module", "get_attr")}
        self._named = {target: _attribute(root, target) for target in targets}
        self._graph: fx.Graph | None = graph
        self._training = root.training
        self._module: fx.GraphModule | None = None

    @property
    def graph(self) -> fx.Graph:
        """The graph alone, without building its GraphModule."""
        return self._graph if self._module is None else self._module.graph

    def module(self) -> fx.GraphModule:
        """The graph as a GraphModule over the modules it names (built once)."""
        if self._module is None:
            self._module = fx.GraphModule(self._named, self._graph)
            self._module.training = self._training
            self._graph = self._named = None
        return self._module

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles carry the GraphModule, which knows how
        return {"_module": self.module(), "_graph": None, "_named": None, "_training": self._training}


def _attribute(root: nn.Module, target: str) -> Any:
    found = root
    for atom in target.split("."):
        found = getattr(found, atom)
    return found


def store_record(module: nn.Module, record: RewriteRecord) -> None:
    """Keep ``record`` on ``module``: a GraphModule's ``meta``, else a plain attribute (out of ``state_dict``)."""
    if isinstance(module, fx.GraphModule):
        module.meta[_RECORD_KEY] = record
    else:
        module.__dict__[_RECORD_KEY] = record


def record_of(module: nn.Module) -> RewriteRecord | None:
    """The record ``transform`` left on ``module``, or ``None`` for a module it did not return."""
    if isinstance(module, fx.GraphModule):
        return module.meta.get(_RECORD_KEY)
    return module.__dict__.get(_RECORD_KEY) if isinstance(module, nn.Module) else None


def changes(gm: nn.Module) -> list[Change]:
    """The decisions ``fxblur.transform`` made for ``gm``, in graph order.

    ``gm`` is what ``transform`` returned: a GraphModule, or, from ``strict=False`` on a
    model torch.fx cannot trace whole, the model with its traceable parts rewritten. The
    decisions of each part come in module order, their ``target`` and ``blur`` as full
    paths in the model (``"backbone.body.layer2.0.conv2"``); their node names are those
    of the part's own graph.

    Raises:
        ValueError: ``gm`` was not returned by ``fxblur.transform``.
    """
    return list(require_record(gm).decisions)


def require_record(module: Any) -> RewriteRecord:
    """``record_of(module)``; ``ValueError`` for a module ``transform`` did not return."""
    found = record_of(module)
    if found is None:
        raise ValueError(
            f"{type(module).__name__} was not returned by fxblur.transform; "
            "call fxblur.transform(model) and pass its result"
        )
    return found


def flat_graph_module(module: nn.Module) -> fx.GraphModule | None:
    """The flat rewritten graph of ``module``'s current mode, over its modules; ``None`` if there is none."""
    found = record_of(module)
    return None if found is None else found.flat_graph(module.training)


def log_decision(gm: fx.GraphModule, change: Change) -> None:
    """For passes: log ``change`` on the graph module being rewritten, as the decision is made."""
    _log(gm)["decisions"].append(change)


def log_phase_group(gm: fx.GraphModule, group: PhaseGroupRecord) -> None:
    """For passes: log a phase group as decided."""
    _log(gm)["phase_groups"].append(group)


def logged(gm: fx.GraphModule, kind: str) -> list:
    """What passes logged on ``gm``: ``"decisions"`` or ``"phase_groups"``."""
    return list(_log(gm)[kind])


def _log(gm: fx.GraphModule) -> dict[str, list]:
    return gm.meta.setdefault(_LOG_KEY, {"decisions": [], "phase_groups": []})
