"""Put a rewritten flat graph back into the module hierarchy it was traced from: plan, then emit.

The passes rewrite one flat graph per mode, where dataflow across modules is visible; the
assembly carries the result back into the modules the tracer went through, so that every
module the original's forward called as a module is still called as a module, at the same
path (FSDP's per-block sharding, activation checkpointing, hooks and regional compilation
all hang on those calls). Each recorded module call (``fxblur.trace.calls``) ends up in
one of three states:

- *original*: nothing in it changed; the module keeps its class and code. Modules it calls
  that did change carry their own rewrite, and so do blurred op modules (most placements
  change nothing but the op module: ``fxblur.ops.blurred``).
- *rewritten*: nodes of its own call changed (a blur node, a functional op moved to
  stride 1); the module gets a forward of its own, the graph of its call, in which the
  modules it calls are still called as modules. It becomes an instance of a subclass of
  both its original class and ``GraphModule`` (a ``Sequential`` stays iterable, an
  ``isinstance`` check on a block still holds). A module called several times must get
  the same graph from every call (one per mode).
- *inlined*: its nodes go into its caller's graph, and the module is no longer called;
  its children are called from there instead. This happens only where a rewrite cannot be
  split along the module's boundary (``fxblur.assemble.regions`` lists why), a module that
  code outside the graph may also call (``frozen``) would have to change, or calls of one
  module would need different code.

It happens in two steps. ``plan_nesting`` decides, as data, which calls are rewritten and
which are inlined, with the reasons: it builds each region's graph and, where one cannot
be split, inlines that call and rebuilds only the regions this changes, until every
region splits. Nothing of the model changes while it plans. ``emit`` then carries the plan
out once: it registers the buffers the regions read and builds the modules.

The root of the trace always gets its own graph (it is the ``GraphModule`` ``transform``
returns), unless the caller asks to keep it when nothing in it changed (a part of a model
rewritten in parts).

Example:
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(16, 16, 3, padding=1)
    ...     def forward(self, x):
    ...         return F.max_pool2d(self.conv(x), 2)
    >>> model = nn.Sequential(Block(), nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)))
    >>> gm = fxblur.transform(model, verbose=False)
    >>> type(gm.get_submodule("1.1")).__name__, type(gm.get_submodule("1")).__name__  # the pool carries its blur
    ('BlurredMaxPool2d', 'Sequential')
    >>> block = gm.get_submodule("0")  # a functional pool in its own forward: it gets a graph of its own
    >>> isinstance(block, Block), isinstance(block, fx.GraphModule), block.code.count("fxblur.max_pool2d")
    (True, True, 1)
    >>> print(fxblur.report(gm).nesting)
    rewritten: (root), 0
    inlined: none
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from fxblur.assemble.hooks import warn_about_hooks
from fxblur.assemble.regions import Buffers, NotSplittable, buffers_read, build_region, root_of
from fxblur.trace.calls import Call


@dataclass(frozen=True)
class Inlined:
    """A module whose code was moved into its caller's graph, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Nesting:
    """Where the rewrite went: the modules that got a forward of their own, those inlined.

    ``rewritten`` holds the paths of submodules; the root, which gets a graph whenever
    ``transform`` returns a GraphModule, is named ``(root)`` when printed.
    """

    rewritten: tuple[str, ...]
    inlined: tuple[Inlined, ...]
    root_rewritten: bool = True

    def __str__(self) -> str:
        rewritten = [*(["(root)"] if self.root_rewritten else []), *self.rewritten]
        inlined = [f"{item.path} ({item.reason})" for item in self.inlined]
        return f"rewritten: {', '.join(rewritten) or 'none'}\ninlined: {', '.join(inlined) or 'none'}"


@dataclass
class ModeGraph:
    """One mode's flat graph after the passes, its call tree, and the calls whose own code changed."""

    graph: fx.Graph
    root: Call
    changed: set[Call]


@dataclass
class NestingPlan:
    """The decision of ``plan_nesting``: the calls inlined (with why) and the graph of every region.

    ``nesting()`` is the decision as a record; ``emit`` carries it out.
    """

    inline: dict[Call, str]
    regions: dict[Call, fx.Graph]
    buffers: Buffers = field(repr=False)

    def nesting(self) -> Nesting:
        inlined: dict[str, Inlined] = {}
        for call, reason in self.inline.items():
            owner = _owner(call, self.inline)
            if owner in self.regions:  # its nodes went into a graph, so its module is no longer called
                inlined.setdefault(call.path, Inlined(call.path, reason))
        rewritten = sorted({call.path for call in self.regions if call.parent is not None})
        root = any(call.parent is None for call in self.regions)
        return Nesting(tuple(rewritten), tuple(inlined[path] for path in sorted(inlined)), root)

    def __str__(self) -> str:
        return str(self.nesting())


def plan_nesting(
    modes: dict[bool, ModeGraph], frozen: frozenset[int], keep_unchanged_root: bool = False
) -> NestingPlan:
    """Decide which module calls of ``modes`` get a graph of their own and which are inlined (module docstring).

    Args:
        modes: the flat graph of each mode (the same object twice for a model whose graph
            does not depend on its mode).
        frozen: ids of modules that must not change (code outside the graphs may call them).
        keep_unchanged_root: leave the root as it is when nothing in its own call changed.
    """
    graphs = list({id(mode.graph): mode for mode in modes.values()}.values())
    mode_of = {call: mode for mode in graphs for call in mode.root.walk()}
    inline: dict[Call, str] = {}
    built: dict[Call, tuple[frozenset[Call], fx.Graph]] = {}
    buffers = Buffers()
    while True:
        try:
            regions = _build_regions(graphs, mode_of, inline, frozen, keep_unchanged_root, built, buffers)
            return NestingPlan(dict(inline), regions, buffers)
        except NotSplittable as failure:
            if failure.call.parent is None:
                raise AssertionError(f"the root call cannot be inlined: {failure.reason}") from failure
            inline[failure.call] = failure.reason


def emit(
    root: nn.Module,
    modes: dict[bool, ModeGraph],
    plan: NestingPlan,
    make_module: Callable[[nn.Module, dict[bool, fx.Graph], bool], nn.Module],
) -> nn.Module:
    """Carry out ``plan``: build the module of every region, children first; the new root (or ``root``).

    Args:
        root: fxblur's copy of the model, holding every module the graphs call (blurred ops
            and blur containers included); re-wired in place.
        modes: the flat graphs the plan was made for.
        plan: what ``plan_nesting`` decided.
        make_module: builds the module that runs a graph per mode over a module's tree, an
            instance of the module's class too unless it is the root
            (``fxblur.assemble.graph_module.graph_module_over``).
    """
    by_module: dict[int, dict[bool, fx.Graph]] = {}
    calls: dict[int, Call] = {}
    for call, graph in plan.regions.items():
        for training, mode in modes.items():
            if mode.root is root_of(call):
                by_module.setdefault(id(call.module), {})[training] = graph
        calls.setdefault(id(call.module), call)
        plan.buffers.register(buffers_read(graph, call.module))
    root_key = id(root)
    depth_first = sorted((key for key in by_module if key != root_key), key=lambda key: -calls[key].path.count("."))
    for key in depth_first:  # children before parents: a parent's copy takes its rewritten children
        module = calls[key].module
        _replace_everywhere(root, module, make_module(module, by_module[key], True))
    result = make_module(root, by_module[root_key], False) if root_key in by_module else root
    inlined = {item.path for item in plan.nesting().inlined}
    warn_about_hooks(call for call in plan.inline if call.path in inlined)
    return result


def _build_regions(
    graphs: list[ModeGraph],
    mode_of: dict[Call, ModeGraph],
    inline: dict[Call, str],
    frozen: frozenset[int],
    keep_unchanged_root: bool,
    built: dict[Call, tuple[frozenset[Call], fx.Graph]],
    buffers: Buffers,
) -> dict[Call, fx.Graph]:
    """The graph of every call that gets one, given the calls inlined so far; raises on the first that cannot.

    A region is rebuilt only when the calls it holds changed since it was last built.
    """
    owners = {call: _owner(call, inline) for mode in graphs for call in mode.root.walk()}
    changed = {owners[call] for mode in graphs for call in mode.changed}
    own = [call for call, owner in owners.items() if owner is call]
    emitted = [call for call in own if call in changed or (call.parent is None and not keep_unchanged_root)]
    # A module runs one graph per mode: every call of a module that gets a graph is built.
    modules = {id(call.module) for call in emitted if call.parent is not None}
    emitted += [call for call in own if call.parent is not None and id(call.module) in modules and call not in emitted]
    for call in emitted:
        if call.parent is not None and id(call.module) in frozen:
            raise NotSplittable(call, "code outside the traced graph also calls it")
    regions = {}
    for call in emitted:
        held = frozenset(each for each, owner in owners.items() if owner is call)
        if call not in built or built[call][0] != held:
            built[call] = (held, build_region(call, mode_of[call].graph, owners, buffers))
        regions[call] = built[call][1]
    _check_one_graph_per_module(regions, mode_of, changed)
    return regions


def _owner(call: Call, inline: dict[Call, str]) -> Call:
    """The call whose graph holds ``call``'s nodes: itself, or for an inlined call its caller's owner."""
    while call in inline and call.parent is not None:
        call = call.parent
    return call


def _check_one_graph_per_module(regions: dict[Call, fx.Graph], mode_of: dict[Call, ModeGraph], changed: set[Call]):
    """A module runs one graph per mode: every call of it in that mode must have the same code."""
    code: dict[tuple[int, int], tuple[Call, str]] = {}
    for call, graph in regions.items():
        if call.parent is None:
            continue
        key = (id(call.module), id(mode_of[call].graph))
        src = graph.python_code("self").src
        if key in code and code[key][1] != src:
            first = code[key][0]
            culprit = first if first in changed and call not in changed else call
            raise NotSplittable(culprit, f"its calls would need different code ({first.path}, {call.path})")
        code.setdefault(key, (call, src))


def _replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` sits in ``root``'s tree (a shared module may sit at several paths)."""
    for module in root.modules():
        for name, child in module._modules.items():
            if child is old:
                module._modules[name] = new
