"""``transform``: make a model anti-aliased by rewriting its torch.fx graph."""

from __future__ import annotations

import copy as copy_module
import difflib
import fnmatch
import functools
import inspect
import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

from fxblur.changes import Change, changes, recorded, store, store_flat_graphs, store_obstacles
from fxblur.options import BlurOptions, resolve
from fxblur.passes import (
    BlurAvgPools,
    BlurMaxPools,
    BlurStridedConvs,
    CircularPadding,
    PolyphaseSampling,
    RecordAntiAliasing,
)
from fxblur.passes.window_pass import RewriteContext, skipped_outside_graph
from fxblur.report import report
from fxblur.rewrite.calls import SITE, forget_calls, name_sites
from fxblur.rewrite.cloning import share_tensors
from fxblur.rewrite.graph_module import assemble, graph_module_over, working_module
from fxblur.rewrite.nesting import ModeGraph, changed_calls, nest, snapshot, store_nesting, warn_about_hooks
from fxblur.rewrite.partial import Rewrite, in_model, parts_of, re_rooted, rewrite_parts
from fxblur.rewrite.tracer import Traced, UntraceableModelError, concrete_name, store_specialised, trace


class NoEffectWarning(UserWarning):
    """``transform`` found nothing to blur (like Composer's ``NoEffectWarning``)."""


def transform(
    model: nn.Module,
    *,
    preset: str | None = None,
    replace_convs: bool | None = None,
    replace_maxpools: bool | None = None,
    replace_avgpools: bool | None = None,
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
    replaced by their rewrite, in a copy of the model (see ``fxblur.rewrite.partial``).

    Rewrite options left at ``None`` take the value of ``preset``, else the default shown
    in brackets (``fxblur.options`` explains placements and filters in full).

    Args:
        model: any ``nn.Module`` that torch.fx can trace.
        preset: ``"composer"`` (Composer's BlurPool numerics), ``"zhang2019"`` (the
            antialiased-cnns reference) or ``"aps"`` (the APS ResNets' polyphase sampling);
            options given explicitly override it.
        replace_convs: [True] blur strided convolutions (``nn.Conv1d/2d/3d``, ``F.conv2d``...).
        replace_maxpools: [True] blur strided max pools.
        replace_avgpools: [False] blur strided average pools.
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
            share one phase. ``min_channels`` then defaults to 0 and ``replace_avgpools`` to
            ``True``. See ``fxblur.passes.PolyphaseSampling``.
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
        verbose: print the change report.

    Returns:
        A ``GraphModule`` with the original's ``state_dict()`` keys, mode, device and dtype
        (with ``strict=False`` and an untraceable model: a copy of the model whose
        rewritten parts are GraphModules, with the same guarantees).
        ``fxblur.changes(gm)`` lists what was blurred and what was skipped, and why.

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
    leaf_modules = _check_tracing_options(copy, strict, flatten, leaf_modules, concrete_args, verbose)
    _check_not_wrapped(model)

    root = copy_module.deepcopy(model) if copy else share_tensors(model)
    try:
        result = _rewrite(root, options, leaf_modules, concrete_args, flatten=flatten)
    except UntraceableModelError as error:
        if strict:
            raise

        def rewrite_part(part: nn.Module, path: str, leaves: tuple, reached: frozenset[int]) -> nn.Module:
            return _rewrite(part, options, leaves, None, flatten=flatten, scope=path, reached=reached - {id(part)})

        result = rewrite_parts(root, error, rewrite_part, leaf_modules)
    decisions = changes(result)
    _warn_about_options_that_match_nothing(model, options, leaf_modules, concrete_args, decisions)
    if all(change.action == "skipped" for change in decisions):
        parts = parts_of(result)
        untraced = f"; could not trace {', '.join(u.path for u in parts.untraced)}" if parts and parts.untraced else ""
        warnings.warn(
            f"fxblur found nothing to blur in {type(model).__name__}: no conv or pool with a "
            f"stride above 1 that the options allow ({len(decisions)} considered){untraced}",
            NoEffectWarning,
            stacklevel=2,
        )
    if verbose:
        print(report(result))
    return result


def _rewrite(
    root: nn.Module,
    options: BlurOptions,
    leaf_modules: tuple,
    concrete_args: dict | None,
    flatten: bool = False,
    scope: str = "",
    reached: frozenset[int] = frozenset(),
) -> nn.Module:
    """Trace ``root`` (fxblur's own copy, re-wired in place), run the passes, put the result together.

    ``scope``: the path of ``root`` in the user's model, when it is one of its parts; a part
    whose own code needs no change keeps its class. ``reached``: ids of modules that code
    outside the trace also uses; like those inside leaf modules, they must not change.
    """
    traces = _trace_each_mode(root, leaf_modules, concrete_args, specialise_defaults=not scope)
    unique = list({id(traced): traced for traced in (traces[root.training], traces[not root.training])}.values())
    working = {id(traced): working_module(root, traced.graph) for traced in unique}
    before = {id(traced): snapshot(traced.graph) for traced in unique}
    leaves = sorted({path for traced in unique for path in traced.leaves})  # modules called whole
    frozen = _frozen_modules(root, leaves) | reached
    context = RewriteContext(working.values(), frozen, scope)
    kinds = (
        (options.replace_convs, BlurStridedConvs),
        (options.replace_maxpools, BlurMaxPools),
        (options.replace_avgpools, BlurAvgPools),
    )
    passes = [make(options, context) for wanted, make in kinds if wanted]
    if options.polyphase:
        passes = [PolyphaseSampling(options, context, passes)]
    passes.append(RecordAntiAliasing())
    for gm in working.values():  # the current mode's graph first
        try:
            PassManager(passes)(gm)
        except Exception as error:  # PassManager wraps what a pass raised: hand the user the pass's own error
            raise error.__cause__ or error from None
        gm.graph.lint()
    context.install(root)  # only now: every graph had to see the original modules
    obstacles = _pad_circularly(working.values(), frozen) if options.circular_padding else {}

    def rewrite_part(part: nn.Module, path: str, leaves: tuple, reached: frozenset[int]) -> nn.Module:
        return _rewrite(part, options, leaves, None, flatten=flatten, scope=_joined(scope, path), reached=reached)

    inside = _rewrite_in_registered_leaves(root, leaves, leaf_modules, rewrite_part)
    done = {change.target for change in inside}
    decisions = _decisions(list(working.values())) + inside
    decisions += [change for change in _inside_leaves(root, leaves) if change.target not in done]
    if options.polyphase or options.circular_padding:
        obstacles = {**_equivariance_obstacles(options, decisions, working.values()), **obstacles}
    if flatten:
        warn_about_hooks(call for traced in unique for call in traced.root.walk())
        result = assemble(root, traces[True].graph, traces[False].graph)
    else:
        modes = {
            mode: ModeGraph(traced.graph, traced.root, changed_calls(traced.graph, before[id(traced)]))
            for mode, traced in traces.items()
        }
        result, nesting = nest(root, modes, frozen, graph_module_over, keep_unchanged_root=bool(scope))
        store_nesting(result, nesting)
    store(result, decisions)
    store_specialised(result, traces[root.training].specialised)
    if options.polyphase or options.circular_padding:
        store_obstacles(result, obstacles)
    for traced in unique:
        forget_calls(traced.graph)
    store_flat_graphs(result, {mode: traced.graph for mode, traced in traces.items()})
    return result


def _pad_circularly(graph_modules: Iterable[fx.GraphModule], frozen: frozenset[int]) -> dict[str, str]:
    """Make every graph's convs and pools pad circularly; what could not, and why."""
    circular = CircularPadding(frozen)
    for gm in graph_modules:
        PassManager([circular])(gm)
        gm.graph.lint()
    circular.finish()
    return circular.obstacles


def _equivariance_obstacles(
    options: BlurOptions, decisions: list[Change], graph_modules: Iterable[fx.GraphModule]
) -> dict[str, str]:
    """What keeps a polyphase rewrite from exact invariance, besides padding: fixed phases, zeros, local heads."""
    found: dict[str, str] = {}
    for change in decisions:
        if change.action == "skipped" or (options.polyphase and not change.action.startswith("phase")):
            found[change.target] = f"subsamples at a fixed phase ({change.reason or change.action})"
        elif change.note.startswith("phase group"):
            found[change.target] = change.note
    if options.polyphase and not options.circular_padding:
        found["(padding)"] = "convs, pools and blurs pad with zeros or by reflection: pass circular_padding=True"
    for gm in graph_modules:
        for node in gm.graph.nodes:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, _ADAPTIVE_POOLS) and _not_global(module.output_size):
                found[node.target] = f"pools to {module.output_size}, not to one value per channel"
    return found


_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d)


def _not_global(output_size: Any) -> bool:
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
    return any(size not in (1, None) for size in sizes)


def _decisions(graph_modules: list[fx.GraphModule]) -> list[Change]:
    """Every graph's decisions, one per call site (a call in both graphs is one), in the first graph's order."""
    decisions: dict[str, Change] = {}
    for gm in graph_modules:
        nodes = {node.name: node for node in gm.graph.nodes}
        for change in recorded(gm):
            decisions.setdefault(nodes[change.node].meta.get(SITE, change.node), change)
    order = {node.name: i for i, node in enumerate(graph_modules[0].graph.nodes)}
    return sorted(decisions.values(), key=lambda change: order.get(change.node, len(order)))


def _frozen_modules(root: nn.Module, leaves: Iterable[str]) -> frozenset[int]:
    """The modules inside the leaf modules at ``leaves``: their code calls them, so they must not change."""
    return frozenset(id(sub) for path in leaves for sub in root.get_submodule(path).modules())


def _rewrite_in_registered_leaves(
    root: nn.Module, leaves: Iterable[str], leaf_modules: tuple, rewrite: Rewrite
) -> list[Change]:
    """Rewrite the parts of the modules timm registers as not traceable, as ``strict=False`` rewrites a model.

    timm's module (``ConvAttention``) is called whole, and its code runs as it is; a child
    that code only calls whole (a ``ConvLayer`` holding a strided conv) is rewritten on its
    own (``fxblur.rewrite.partial``). Not inside the user's ``leaf_modules``, which mean
    "leave whole", nor inside a module that shares a submodule with the rest of the model.
    """
    classes = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
    counts = Counter(id(module) for _, module in root.named_modules(remove_duplicate=False))
    found = []
    for leaf in leaves:
        module = root.get_submodule(leaf)
        if leaf in leaf_modules or isinstance(module, classes) or any(counts[id(sub)] > 1 for sub in module.modules()):
            continue
        why = UntraceableModelError(f"inside {leaf} ({type(module).__name__}), which is called whole")
        in_leaf = functools.partial(_in_leaf, rewrite, leaf)
        rewrite_parts(module, why, in_leaf, re_rooted(leaf_modules, leaf))
        found += [in_model(change, leaf) for change in changes(module)]
    return found


def _in_leaf(
    rewrite: Rewrite, leaf: str, part: nn.Module, path: str, leaves: tuple, reached: frozenset[int]
) -> nn.Module:
    """``rewrite`` for a part at ``path`` in the module at ``leaf``."""
    return rewrite(part, f"{leaf}.{path}", leaves, reached)


def _joined(scope: str, path: str) -> str:
    return f"{scope}.{path}" if scope else path


def _inside_leaves(root: nn.Module, leaves: Iterable[str]) -> list[Change]:
    """A skipped record for every strided conv or pool in the leaf modules at ``leaves`` (code fxblur does not see)."""
    found = []
    for leaf in leaves:
        why = f"inside {leaf} ({type(root.get_submodule(leaf)).__name__}), which is called whole"
        for path, module in root.get_submodule(leaf).named_modules():
            record = skipped_outside_graph(module, f"{leaf}.{path}", why) if path else None
            if record is not None:
                found.append(record)
    return found


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


def _warn_about_options_that_match_nothing(
    model: nn.Module, options: BlurOptions, leaf_modules: tuple, concrete_args: dict | None, decisions: list[Change]
) -> None:
    """A ``UserWarning`` for each ``exclude`` pattern, leaf module or concrete argument that had no effect."""
    unmatched = [p for p in options.exclude if not any(fnmatch.fnmatchcase(c.target, p) for c in decisions)]
    paths = dict(model.named_modules())
    problems = [f"exclude pattern {pattern!r} matches no strided conv or pool" for pattern in unmatched]
    for leaf in leaf_modules:
        if isinstance(leaf, str) and leaf not in paths:
            close = difflib.get_close_matches(leaf, paths, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"leaf_modules path {leaf!r} names no module{hint}")
        elif isinstance(leaf, type) and not any(isinstance(m, leaf) for m in paths.values()):
            problems.append(f"leaf_modules class {leaf.__name__} has no instance in the model")
    parameters = list(inspect.signature(type(model).forward).parameters.values())
    names = {concrete_name(p): p for p in parameters}
    for name in (name for name in concrete_args or {} if name not in names):
        variadic = next((n for n, p in names.items() if p.name == name), None)  # torch.fx spells them *args, **kwargs
        problems.append(
            f"concrete_args names {name!r}, which forward does not take" + (f" (say {variadic!r})" if variadic else "")
        )
    for problem in problems:
        warnings.warn(f"{problem}; it has no effect", UserWarning, stacklevel=3)


def _check_not_wrapped(model: nn.Module) -> None:
    """``TypeError`` for a compiled, scripted or data-parallel wrapper: fxblur rewrites the model inside."""
    wrappers = {
        "torch.compile": (torch._dynamo.eval_frame.OptimizedModule, "model._orig_mod", "compile the result again"),
        "torch.jit": (torch.jit.ScriptModule, "the model before scripting", "script the result again"),
        "DataParallel": (nn.DataParallel, "model.module", "wrap the result again"),
        "DistributedDataParallel": (
            nn.parallel.DistributedDataParallel,
            "model.module",
            "wrap the result again",
        ),
    }
    for name, (cls, inner, then) in wrappers.items():
        if isinstance(model, cls):
            raise TypeError(
                f"transform got a {name} wrapper ({type(model).__name__}); torch.fx cannot trace it. "
                f"Pass {inner} instead, and {then}: fxblur.transform(model) first, then wrap."
            )


def _check_tracing_options(
    copy: Any, strict: Any, flatten: Any, leaf_modules: Any, concrete_args: Any, verbose: Any
) -> tuple:
    for name, value in (("copy", copy), ("strict", strict), ("flatten", flatten), ("verbose", verbose)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    try:
        leaf_modules = tuple(leaf_modules)
    except TypeError:
        raise ValueError(f"leaf_modules must be nn.Module classes or module paths, got {leaf_modules!r}") from None
    for leaf in leaf_modules:
        if not (isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
            raise ValueError(f"leaf_modules must hold nn.Module classes or module paths, got {leaf!r}")
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise ValueError(f"concrete_args must be a dict of argument name to value, got {concrete_args!r}")
    return leaf_modules
