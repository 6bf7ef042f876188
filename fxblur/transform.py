"""``transform``: make a model anti-aliased by rewriting its torch.fx graph.

The data flows one way (``docs/architecture.md``):

1. *trace* (``fxblur.trace``): the model is copied without its tensors and traced into one
   flat graph per mode, recording every module call it goes through;
2. *passes* (``fxblur.passes``): the blur or polyphase passes, then circular padding,
   decide on and rewrite each graph, reading ops through ``fxblur.analysis`` and editing
   through ``fxblur.passes.edit``, and log each decision;
3. *assemble* (``fxblur.assemble``): the rewritten graphs go back into the module tree
   (a nesting plan, then its modules), or, for a model that cannot be traced whole, its
   parts are rewritten one by one;
4. *record* (``fxblur.record``): one ``RewriteRecord`` of what was asked and decided is
   stored on the result, which ``fxblur.report`` renders.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from fxblur._compat import run_passes
from fxblur.analysis.equivariance import example_shape
from fxblur.arguments import check_not_wrapped, check_tracing_options, options_that_match_nothing
from fxblur.assemble.changed import changed_calls, snapshot
from fxblur.assemble.fold import fold_into_layers
from fxblur.assemble.graph_module import assemble, graph_module_over, working_module
from fxblur.assemble.hooks import warn_about_hooks
from fxblur.assemble.leaf_parts import rewrite_inside_registered_leaves, skipped_inside
from fxblur.assemble.nesting import ModeGraph, emit, plan_nesting
from fxblur.assemble.partial import rewrite_parts
from fxblur.options import BlurOptions, resolve
from fxblur.passes import (
    BlurAvgPools,
    BlurMaxPools,
    BlurStridedConvs,
    BlurSubsampling,
    CircularPadding,
    PolyphaseSampling,
    RecordAntiAliasing,
    RewriteContext,
)
from fxblur.publish import publish
from fxblur.record import Change, FlatGraph, RewriteRecord, logged, record_of, store_record
from fxblur.report import report
from fxblur.trace import Traced, UntraceableModelError, trace
from fxblur.trace.calls import SITE, forget_calls, name_sites
from fxblur.trace.cloning import share_tensors

_ALREADY = ("already blurred", "already anti-aliased", "already subsampled by polyphase sampling")


class NoEffectWarning(UserWarning):
    """``transform`` found nothing to blur (like Composer's ``NoEffectWarning``)."""


def transform(
    model: nn.Module,
    *,
    preset: str | None = None,
    replace_convs: bool | None = None,
    replace_maxpools: bool | None = None,
    replace_avgpools: bool | None = None,
    replace_subsampling: bool | None = None,
    blur_first: bool | None = None,
    past_nonlinearity: bool | None = None,
    pool_blur_first: bool | None = None,
    min_channels: int | None = None,
    filter_size: int | None = None,
    adaptive_filter: bool | None = None,
    padding_mode: str | None = None,
    exclude: str | Iterable[str] | None = None,
    polyphase: bool | None = None,
    polyphase_norm: str | None = None,
    circular_padding: bool | None = None,
    copy: bool = False,
    strict: bool = True,
    flatten: bool = False,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Return an anti-aliased (BlurPool) version of ``model`` as a ``torch.fx.GraphModule``.

    The model is traced, every conv and max pool with a stride above 1 gets a binomial
    low-pass filter, and the result is compiled into a new module. The original model is
    not modified in any way.

    With ``strict=False``, a model torch.fx cannot trace whole (a detector) is rewritten
    in parts instead: its largest traceable submodules with something to blur are
    replaced by their rewrite, in a copy of the model (see ``fxblur.assemble.partial``).

    Rewrite options left at ``None`` take the value of ``preset``, else the default shown
    in brackets (``fxblur.options`` explains placements and filters in full).

    Args:
        model: any ``nn.Module`` that torch.fx can trace.
        preset: ``"composer"`` (Composer's BlurPool numerics), ``"zhang2019"`` (the
            antialiased-cnns reference) or ``"aps"`` (the APS ResNets' polyphase sampling);
            options given explicitly override it.
        replace_convs: [True] blur strided convolutions (``nn.Conv1d/2d/3d``, ``F.conv2d``...).
        replace_maxpools: [True] blur strided max pools.
        replace_avgpools: [False] blur strided average pools (and LP pools).
        replace_subsampling: [False] blur the other downsamplers: strided slices
            (``x[..., ::2, ::2]``, patch merging), ``pixel_unshuffle`` and interpolation by a
            scale below 1 (``fxblur.passes.BlurSubsampling``).
        blur_first: [True] ``True`` blurs at stride 1 before the op, which keeps its
            stride (cheapest); ``False`` runs the op at stride 1 and lets the blur subsample.
        past_nonlinearity: [False] strided convs run at stride 1 and the subsampling blur
            goes past the BatchNorm/activation/dropout chain that follows them (the paper);
            takes precedence over ``blur_first`` for convs.
        pool_blur_first: [``blur_first``] placement for pools: ``False`` gives MaxBlurPool
            (the pool at stride 1, then a subsampling blur).
        min_channels: [16] leave convs with fewer input channels alone (e.g. an RGB stem).
        filter_size: [3] taps of the binomial filter, 1 to 7.
        adaptive_filter: [True] filter only along subsampled axes and widen the filter for
            strides above 2; ``False`` uses ``filter_size`` taps on every axis.
        padding_mode: ["reflect"] how the blur pads: ``"reflect"``, ``"replicate"``,
            ``"zeros"`` or ``"circular"``.
        exclude: [()] glob patterns over targets (module paths such as ``"layer4.*"``, or
            functional calls named by the module that makes them, ``"Mixed_6a.max_pool2d"``)
            to leave alone.
        polyphase: [False] subsample every downsampling op by adaptive polyphase sampling
            instead of at a fixed phase, in the placement the options ask for (the blur
            becomes optional: ``filter_size=1`` is APS without one); ops whose results meet
            share one phase. ``min_channels`` then defaults to 0, ``replace_avgpools`` and
            ``replace_subsampling`` to ``True``. See ``fxblur.passes.PolyphaseSampling``.
        polyphase_norm: ["l2"] the norm that picks the phase: ``"l2"``, ``"l1"`` or ``"linf"``.
        circular_padding: [False] convs, pools and blurs pad circularly (keeping every
            size): with ``polyphase``, what exact invariance to circular shifts needs.
        copy: give the result its own copy of the parameters; by default it shares the
            original's Parameter objects, so an optimizer built earlier keeps working.
        strict: raise ``UntraceableModelError`` when the model cannot be traced whole;
            ``False`` rewrites its traceable parts instead and returns the model (of its
            own class) with those parts replaced. ``fxblur.report`` names the parts
            rewritten and the modules that could not be traced.
        flatten: return one flat graph over the whole model, as torch.fx does: the
            modules the trace went through are no longer called (their hooks no longer
            fire; they become bare containers).
        leaf_modules: module classes or paths to call as a whole instead of tracing into
            (for code torch.fx cannot trace; strided ops inside them are not blurred).
        concrete_args: fixed values for non-tensor ``forward`` arguments, as in
            ``torch.fx.symbolic_trace``. Arguments after the input that it does not name
            are fixed at their defaults where those are ``None``, a bool, int, float or
            str, and ``*args`` / ``**kwargs`` at none (``fxblur.report`` lists them): the
            result computes what the model does when called with the input alone, and
            raises an ``AssertionError`` naming the argument if called with another
            value. ``{"mask": torch.fx.PH}`` keeps an argument an input.
        verbose: print the change report (on rank 0 only under ``torch.distributed``); it is
            logged to the ``fxblur`` logger at ``INFO`` as well (``fxblur.publish``).

    Returns:
        A ``GraphModule`` with the original's ``state_dict()`` keys, mode, device and dtype
        (with ``strict=False`` and an untraceable model: a copy of the model whose
        rewritten parts are GraphModules, with the same guarantees).
        ``fxblur.changes(gm)`` lists what was blurred and what was skipped, and why;
        ``fxblur.record.record_of(gm)`` holds everything the rewrite was asked and decided.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an option is invalid (raised before any work is done).
        fxblur.UntraceableModelError: torch.fx cannot trace the model (and ``strict`` is
            set); the message names the module and line, and what to try.

    Example:
        >>> model = torchvision.models.resnet50()
        >>> gm = fxblur.transform(model, verbose=False)
        >>> gm(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
        >>> sorted(gm.state_dict()) == sorted(model.state_dict())
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"transform expects an nn.Module, got {type(model).__name__}")
    options = resolve(
        preset,
        replace_convs=replace_convs,
        replace_maxpools=replace_maxpools,
        replace_avgpools=replace_avgpools,
        replace_subsampling=replace_subsampling,
        blur_first=blur_first,
        past_nonlinearity=past_nonlinearity,
        pool_blur_first=pool_blur_first,
        min_channels=min_channels,
        filter_size=filter_size,
        adaptive_filter=adaptive_filter,
        padding_mode=padding_mode,
        exclude=exclude,
        polyphase=polyphase,
        polyphase_norm=polyphase_norm,
        circular_padding=circular_padding,
    )
    leaf_modules = check_tracing_options(copy, strict, flatten, leaf_modules, concrete_args, verbose)
    check_not_wrapped(model)
    tracing = (
        ("copy", copy),
        ("strict", strict),
        ("flatten", flatten),
        ("leaf_modules", tuple(_leaf_name(leaf) for leaf in leaf_modules)),
        ("concrete_args", tuple((concrete_args or {}).items())),
    )
    rewrite = _Rewrite(options, tracing, flatten)
    root = copy_module.deepcopy(model) if copy else share_tensors(model)
    try:
        result = rewrite(root, leaf_modules, concrete_args)
    except UntraceableModelError as error:
        if strict:
            raise
        decisions, parts = rewrite_parts(root, error, rewrite.part, leaf_modules)
        store_record(root, RewriteRecord(type(root).__name__, options, tracing, tuple(decisions), parts=parts))
        result = root
    decisions = record_of(result).decisions
    for problem in options_that_match_nothing(model, options, leaf_modules, concrete_args, list(decisions)):
        warnings.warn(problem, UserWarning, stacklevel=2)
    if all(change.action == "skipped" for change in decisions):
        warnings.warn(_no_effect(model, result, decisions), NoEffectWarning, stacklevel=2)
    publish(lambda: str(report(result)), verbose)
    return result


class _Rewrite:
    """One rewrite of a model, or of each of its parts: trace, passes, assembly, record."""

    def __init__(self, options: BlurOptions, tracing: tuple, flatten: bool) -> None:
        self.options = options
        self.tracing = tracing
        self.flatten = flatten

    def part(self, part: nn.Module, path: str, leaves: tuple, reached: frozenset[int]) -> nn.Module:
        """Rewrite ``part``, the module at ``path`` of a model rewritten in parts (``fxblur.assemble.partial``)."""
        return self(part, leaves, None, scope=path, reached=reached - {id(part)})

    def __call__(
        self,
        root: nn.Module,
        leaf_modules: tuple,
        concrete_args: dict | None,
        scope: str = "",
        reached: frozenset[int] = frozenset(),
    ) -> nn.Module:
        """Trace ``root`` (fxblur's own copy, re-wired in place), run the passes, put the result together.

        ``scope``: the path of ``root`` in the user's model, when it is one of its parts; a part
        whose own code needs no change keeps its class. ``reached``: ids of modules that code
        outside the trace also uses; like those inside leaf modules, they must not change.
        """
        options = self.options
        traces = _trace_each_mode(root, leaf_modules, concrete_args, specialise_defaults=not scope)
        unique = list({id(traced): traced for traced in (traces[root.training], traces[not root.training])}.values())
        working = {id(traced): working_module(root, traced.graph) for traced in unique}
        before = {id(traced): snapshot(traced.graph) for traced in unique}
        leaves = sorted({path for traced in unique for path in traced.leaves})  # modules called whole
        frozen = frozenset(id(sub) for path in leaves for sub in root.get_submodule(path).modules()) | reached
        _run_passes(list(working.values()), options, frozen, scope, root)

        def rewrite_part(part: nn.Module, path: str, leaves: tuple, reached: frozenset[int]) -> nn.Module:
            return self(part, leaves, None, scope=f"{scope}.{path}" if scope else path, reached=reached)

        inside = rewrite_inside_registered_leaves(root, leaves, leaf_modules, rewrite_part)
        done = {change.target for change in inside}
        decisions = _decisions(list(working.values())) + inside
        decisions += [change for change in skipped_inside(root, leaves) if change.target not in done]
        groups = tuple(group for gm in working.values() for group in logged(gm, "phase_groups"))
        flat = {id(traced): _flat_graph(root, traced.graph) for traced in unique}  # as the passes left it
        nesting = None
        if self.flatten:
            warn_about_hooks(call for traced in unique for call in traced.root.walk())
            result = assemble(root, traces[True].graph, traces[False].graph)
        else:
            moved = fold_into_layers([t.graph for t in unique], [t.root for t in unique], root, frozen)
            decisions = [dataclasses.replace(c, blur=moved.get(c.blur, c.blur)) for c in decisions]
            modes = {
                mode: ModeGraph(traced.graph, traced.root, changed_calls(traced.graph, before[id(traced)]))
                for mode, traced in traces.items()
            }
            plan = plan_nesting(modes, frozen, keep_unchanged_root=bool(scope))
            result = emit(root, modes, plan, graph_module_over)
            nesting = plan.nesting()
        for traced in unique:
            forget_calls(traced.graph)
        record = RewriteRecord(
            model=type(root).__name__,
            options=options,
            tracing=self.tracing,
            decisions=tuple(decisions),
            phase_groups=groups,
            nesting=nesting,
            specialised=tuple(traces[root.training].specialised.items()),
            example_shape=example_shape(result),
            flat_graphs=(flat[id(traces[True])], flat[id(traces[False])]),
        )
        store_record(result, record)
        return result


def _run_passes(
    working: list[fx.GraphModule], options: BlurOptions, frozen: frozenset[int], scope: str, root: nn.Module
) -> None:
    """The blur or polyphase passes on every graph (the current mode's first), then circular padding."""
    context = RewriteContext(working, frozen, scope)
    kinds = (
        (options.replace_convs, BlurStridedConvs),
        (options.replace_maxpools, BlurMaxPools),
        (options.replace_avgpools, BlurAvgPools),
        (options.replace_subsampling, BlurSubsampling),
    )
    passes = [make(options, context) for wanted, make in kinds if wanted]
    if options.polyphase:
        passes = [PolyphaseSampling(options, context, passes)]
    passes.append(RecordAntiAliasing())
    for gm in working:
        run_passes(passes, gm)
        gm.graph.lint()
    context.install(root)  # only now: every graph had to see the original modules
    if options.circular_padding:
        padding = RewriteContext(working, frozen, scope)
        for gm in working:
            run_passes([CircularPadding(padding)], gm)
            gm.graph.lint()
        padding.install(root)


def _flat_graph(root: nn.Module, graph: fx.Graph) -> FlatGraph:
    """A copy of ``graph`` over ``root``'s modules, without tracer state: the record's flat graph."""
    copy = fx.Graph()
    output = next(node for node in graph.nodes if node.op == "output")
    copy.output(copy.graph_copy(graph, {}), type_expr=output.type)
    forget_calls(copy)
    return FlatGraph(root, copy)


def _decisions(graph_modules: list[fx.GraphModule]) -> list[Change]:
    """Every graph's decisions, one per call site (a call in both graphs is one), in the first graph's order."""
    decisions: dict[str, Change] = {}
    for gm in graph_modules:
        nodes = {node.name: node for node in gm.graph.nodes}
        for change in logged(gm, "decisions"):
            decisions.setdefault(nodes[change.node].meta.get(SITE, change.node), change)
    order = {node.name: i for i, node in enumerate(graph_modules[0].graph.nodes)}
    return sorted(decisions.values(), key=lambda change: order.get(change.node, len(order)))


def _trace_each_mode(
    root: nn.Module, leaf_modules: tuple, concrete_args: dict | None, specialise_defaults: bool
) -> dict[bool, Traced]:
    """Trace ``root`` as it is, then in the other mode; one trace for both if they are the same.

    Per-module modes are restored afterwards (``root`` is fxblur's own copy, but a model
    in train mode with frozen BatchNorms in eval should come back exactly so).
    ``specialise_defaults``: fix ``forward``'s constant defaults (not for a part of a model
    that untraced code calls with arguments fxblur does not see).
    """
    modes = {module: module.training for module in root.modules()}
    current = root.training
    try:
        traces = {current: trace(root, leaf_modules, concrete_args, specialise_defaults)}
        root.train(not current)
        traces[not current] = trace(root, leaf_modules, concrete_args, specialise_defaults)
    finally:
        root.train(current)  # lets a TrainEvalGraphModule switch back to its graph
        for module, training in modes.items():
            module.training = training
    if traces[True].graph.python_code("self").src == traces[False].graph.python_code("self").src:
        traces[not current] = traces[current]
    name_sites(traced.graph for traced in traces.values())
    return traces


def check_options(**options: Any) -> None:
    """Raise ``ValueError`` now for an option ``transform`` would reject, without a model to rewrite.

    For integrations that rewrite later (a Trainer's setup): ``transform`` checks every
    option before it traces, so a dry run on ``nn.Identity`` finds a bad one; tracing itself
    may fail (``concrete_args`` name the real network's inputs), which is not an option error.

    Example:
        >>> check_options(filter_size=0)
        Traceback (most recent call last):
        ...
        ValueError: filter_size must be an int from 1 to 7, got 0
    """
    with warnings.catch_warnings(), contextlib.suppress(UntraceableModelError):
        warnings.simplefilter("ignore", NoEffectWarning)
        transform(nn.Identity(), **{**options, "verbose": False})


def _no_effect(model: nn.Module, result: nn.Module, decisions: tuple[Change, ...]) -> str:
    """What ``NoEffectWarning`` says: the model is anti-aliased already, or had nothing the options allow."""
    name = type(model).__name__
    done = [change for change in decisions if change.reason.startswith(_ALREADY)]
    if record_of(model) is not None:
        return f"{name} is anti-aliased already: it is a result of fxblur.transform, so nothing changed"
    if done:
        rest = sorted({change.reason for change in decisions if change not in done})
        left = f"; the others are left alone ({'; '.join(rest)})" if rest else ""
        return f"{name} is anti-aliased already: its {len(done)} strided ops are, so nothing changed{left}"
    parts = record_of(result).parts
    untraced = f"; could not trace {', '.join(u.path for u in parts.untraced)}" if parts and parts.untraced else ""
    return (
        f"fxblur found nothing to blur in {name}: no conv or pool with a stride above 1 that the options allow "
        f"({len(decisions)} considered){untraced}"
    )


def _leaf_name(leaf: type | str) -> str:
    return leaf if isinstance(leaf, str) else f"{leaf.__module__}.{leaf.__qualname__}"
