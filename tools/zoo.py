"""How far fxblur reaches: transform one model per timm model file (and the torchvision zoo) and check each.

For every model and placement the survey builds the model with random weights (nothing is
downloaded; on the ``meta`` device when its constructor allows it, so only shapes are
computed), rewrites it with ``fxblur.transform(model, strict=False)``, and runs the original
and the result at the model's default input size and at one a pixel larger (an even and an
odd size; a model whose original only runs at its one size is checked at that size). Forward
hooks on both record the output shape of every module call, keyed by module path and call
number: the result keeps the original's module hierarchy, so the same paths are called and
must return the same shapes. Only the calls a rewrite moved to full resolution may grow (an
op run at stride 1 before the blur that subsamples, and the BatchNorm/activation chain the
blur moved past: ``Change.enlarged_nodes``), the modules that return their very output, and
modules that compute such an op in their own forward (timm's GammaAct).

Each model and placement gets one status:

    rewritten        every strided conv/pool with >= 16 input channels blurred (or already
                     anti-aliased: timm's BlurPool2d, ...), every shape kept
    nothing to blur  no strided conv or pool, or only ones with < 16 input channels (an RGB
                     stem, a patchify conv) or that anti-alias already
    partial          torch.fx cannot trace the model whole; strict=False rewrote its traceable
                     parts (notes: the modules left untraced, from fxblur.report(result).parts)
    skipped ops      strided ops with >= 16 channels left alone (notes: the reasons, from
                     fxblur.changes)
    failed           an exception (notes: its first line), a module output whose shape
                     changed (the first such path), or a blur added inside a layer that
                     already anti-aliases (timm's BlurPool2d, ...)
    timeout          the model took longer than --timeout seconds

timm models: the first model each file under timm/models/ registers (timm's registry keeps
them in registration order), except where that one is very large (OVERRIDES); --list shows
the choice. Torchvision models (--torchvision): classification, segmentation and video;
--files picks timm files and torchvision tasks alike (--files resnet video).

Examples:
    python tools/zoo.py                                   # every timm file, default + blur_after
    python tools/zoo.py --list                            # which model stands for each file
    python tools/zoo.py --files resnet convnext --placements default past_nonlinearity polyphase
    python tools/zoo.py --models resnetblur50 tf_efficientnet_b0 resnet50 --json
    python tools/zoo.py --torchvision --limit 10 --timeout 60
    python tools/zoo.py --json-out survey.json > survey.txt

--json prints {"summary": {placement: {status: count}}, "results": [...]}, one result per model
and placement: source (timm/<file> or torchvision/<task>), model, placement, status, blurred,
skipped, notes, device (meta or cpu), sizes, seconds, and details: skipped_ops (target, op,
in_channels, reason), untraced (path, module, reason), trace_error (why torch.fx cannot trace
it whole), timm_fx (whether timm's own fx registrations would), inlined, error.

In Python, ``survey(case, placements)`` checks one model (a ``Case``: any factory and input
size) and returns one ``Result`` per placement; it reports every exception, never raises.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import re
import signal
import sys
import threading
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn
from torch.utils._pytree import tree_leaves

import fxblur
from fxblur.models import build, suggestions, timm_available, torchvision_names
from fxblur.record import flat_graph_module
from fxblur.trace.calls import SITE

PLACEMENTS: dict[str, dict[str, Any]] = {
    "default": {},
    "blur_after": {"blur_first": False},
    "past_nonlinearity": {"past_nonlinearity": True, "blur_first": False},
    "polyphase": {"polyphase": True},
}
STATUSES = ("rewritten", "nothing to blur", "partial", "skipped ops", "failed", "timeout")
MIN_CHANNELS = 16  # fxblur's default: ops reading fewer channels (an RGB stem) may stay as they are
TORCHVISION_TASKS = ("classification", "segmentation", "video")
VIDEO_INPUT = (3, 16, 224, 224)

# timm files whose first registered model is very large: a smaller one of the same file.
OVERRIDES = {"eva": "eva02_tiny_patch14_224"}

# Layers that already anti-alias: fxblur must never blur inside them (DESIGN.md).
ANTI_ALIASING = re.compile(r"BlurPool|BlurMaxPool|BlurConv")


@dataclass(frozen=True)
class Case:
    """One model to survey.

    Attributes:
        source: where it comes from: ``timm/<file>``, ``torchvision/<task>``, or anything.
        name: the model's name.
        make: builds the model with random weights, in eval mode, given a device (``None``:
            ``meta`` when its constructor allows it, else CPU).
        input_size: one input without the batch axis, ``(C, H, W)`` or ``(C, T, H, W)``.
    """

    source: str
    name: str
    make: Callable[[str | None], nn.Module]
    input_size: tuple[int, ...]


@dataclass
class Result:
    """The outcome of one model in one placement (``details`` carries the data behind ``notes``)."""

    source: str
    model: str
    placement: str
    status: str
    blurred: int = 0
    skipped: int = 0
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    sizes: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0


class TimedOut(BaseException):
    """Raised by the --timeout alarm; a BaseException, so that no ``except Exception`` swallows it."""


# ---------------------------------------------------------------- which models


def timm_first_models() -> dict[str, str]:
    """timm model file -> the model that stands for it: the first it registers (or OVERRIDES)."""
    import timm
    from timm.models import _registry

    order = {name: i for i, name in enumerate(_registry._model_entrypoints)}  # registration order
    firsts = {}
    for module in timm.list_modules():
        names = sorted(timm.list_models(module=module), key=lambda n: order.get(n, len(order)))
        if names:
            firsts[module] = OVERRIDES.get(module, names[0])
    return firsts


def timm_case(name: str) -> Case:
    import timm
    from timm.models import _registry

    cfg = timm.get_pretrained_cfg(name)
    size = tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
    source = f"timm/{_registry._model_to_module.get(name, '?')}"
    return Case(source, name, lambda device: build(f"timm:{name}", device), size)


def torchvision_case(name: str, task: str) -> Case:
    size = VIDEO_INPUT if task == "video" else (3, 224, 224)
    return Case(f"torchvision/{task}", name, lambda device: build(name, device), size)


def select_cases(
    files: Iterable[str] | None = None,
    models: Iterable[str] | None = None,
    torchvision: bool = False,
    timm: bool | None = None,
) -> list[Case]:
    """The cases to survey: ``models`` by name (timm or torchvision), else one per timm file.

    ``torchvision`` surveys the torchvision zoo instead of the timm files, or as well with
    ``timm=True``. ``files`` keeps only the named timm files (``resnet``) and torchvision
    tasks (``classification``, ``segmentation``, ``video``; naming one implies ``torchvision``).

    Raises:
        ValueError: an unknown model, file or task.
    """
    tv_task = {name: task for task in TORCHVISION_TASKS for name in torchvision_names()[task]}
    if models:
        unknown = [name for name in models if name not in tv_task and not is_timm_model(name)]
        if unknown:
            hints = {
                hint.removeprefix("timm:")
                for name in unknown
                for hint in suggestions(f"timm:{name}") + suggestions(name)
            }
            raise ValueError(
                f"unknown model {', '.join(unknown)}" + (f"; close: {', '.join(sorted(hints))}" if hints else "")
            )
        return [torchvision_case(name, tv_task[name]) if name in tv_task else timm_case(name) for name in models]
    files = set(files or ())
    firsts = timm_first_models() if timm_available() else {}
    unknown = files - firsts.keys() - set(TORCHVISION_TASKS)
    if unknown:
        raise ValueError(f"no timm model file or torchvision task named {', '.join(sorted(unknown))} (see --list)")
    torchvision = torchvision or bool(files & set(TORCHVISION_TASKS))
    with_timm = (not torchvision or bool(files - set(TORCHVISION_TASKS))) if timm is None else timm
    cases = [timm_case(name) for module, name in firsts.items() if with_timm and (not files or module in files)]
    if torchvision:
        cases += [torchvision_case(name, task) for name, task in tv_task.items() if not files or task in files]
    return cases


def is_timm_model(name: str) -> bool:
    if not timm_available():
        return False
    import timm

    return timm.is_model(name)


# ---------------------------------------------------------------- running a model


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ``TimedOut`` in this block after ``seconds`` (main thread with SIGALRM only; else no limit)."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def alarm(signum, frame):
        raise TimedOut(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    tensor = next(iter(model.buffers()), None) if tensor is None else tensor
    return torch.device("cpu") if tensor is None else tensor.device


Shapes = dict[str, list[Any]]


def module_shapes(
    model: nn.Module, x: torch.Tensor, paths: Iterable[str] | None = None, full: FullResolution | None = None
) -> Shapes:
    """Output shape of every module call, per module path, in order of first call.

    A call that returns one tensor gives its shape, one that returns several a tuple of
    shapes, one that returns no tensor ``None``. ``paths`` limits the hooks to those modules.

    With ``full`` (what the rewrite moved to full resolution), the calls that carry such a
    map on are added to ``full.calls``: a call that returns the very tensor one of them
    computed (a ``Sequential`` whose last module runs at stride 1, an in-place activation),
    and a call of one of ``full.makers`` that maps such a tensor to one of the same shape.
    """
    shapes: Shapes = {}
    carried: list[weakref.ref] = []
    modules = dict(model.named_modules())
    wanted = modules if paths is None else {path: modules[path] for path in paths if path in modules}

    def is_carried(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and any(ref() is value for ref in carried)

    def hook(module, args, output, path):
        if isinstance(output, torch.Tensor):
            shape = tuple(output.shape)
        else:
            leaves = [tuple(leaf.shape) for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]
            shape = tuple(leaves) if leaves else None
        call = (path, len(shapes.setdefault(path, [])))
        shapes[path].append(shape)
        if full is None or not isinstance(output, torch.Tensor):
            return
        same_map = bool(args) and is_carried(args[0]) and args[0].shape == output.shape
        if call in full.calls or is_carried(output) or (path in full.makers and same_map):
            full.calls.add(call)
            carried.append(weakref.ref(output))

    handles = [m.register_forward_hook(lambda m, a, o, path=path: hook(m, a, o, path)) for path, m in wanted.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def odd_neighbour(size: tuple[int, ...]) -> tuple[int, ...]:
    """``size`` one larger along every axis after the channels: even sizes become odd and odd even."""
    return (size[0], *(d + 1 for d in size[1:]))


@dataclass
class Original:
    """The original model where it runs, and its module output shapes at each input size it accepts."""

    model: nn.Module
    device: torch.device
    shapes: dict[tuple[int, ...], Shapes]
    notes: list[str]
    untraceable: dict[str, str] | None = None  # filled by why_untraceable


def run_original(case: Case) -> Original:
    """Build the model and run it at its default size and its odd neighbour, on ``meta`` if it can.

    A model built on CPU (its constructor computes with tensors) is moved to ``meta``; one
    whose forward needs real tensors is rebuilt and run on CPU. A model that only runs at
    its default size is checked at that size only.
    """
    notes = []
    model = case.make(None)
    if device_of(model).type != "meta":
        notes.append("built on cpu")
        model = model.to("meta")
    default = (1, *case.input_size)
    try:
        shapes = {default: module_shapes(model, torch.empty(default, device="meta"))}
    except Exception as error:
        notes.append(f"runs on cpu (meta: {first_line(error)})")
        model = case.make("cpu").eval()
        shapes = {default: module_shapes(model, torch.zeros(default))}
    device = device_of(model)
    odd = (1, *odd_neighbour(case.input_size))
    try:
        shapes[odd] = module_shapes(model, torch.zeros(odd, device=device))
    except Exception:
        notes.append(f"fixed size {'x'.join(map(str, default[2:]))}")
    return Original(model, device, shapes, notes)


# ---------------------------------------------------------------- checking a rewrite


@dataclass
class FullResolution:
    """What a rewrite moved to full resolution, as module calls.

    Attributes:
        calls: (module path, call number) of the module calls that may return a larger map:
            an op run at stride 1 and the BatchNorm/activation modules the blur moved past.
        makers: paths of modules whose own forward computes such an op functionally (timm's
            ``GammaAct`` calls ``F.gelu``): they may grow when they map a full-resolution
            input to an output of the same shape.
    """

    calls: set[tuple[str, int]] = field(default_factory=set)
    makers: set[str] = field(default_factory=set)


def full_resolution(result: nn.Module) -> FullResolution:
    """The module calls a rewrite moved to full resolution (``Change.enlarged_nodes``).

    Decisions name nodes of the flat graph of the part they were made in (the whole model,
    or each part rewritten by ``strict=False``); ``call_module`` nodes there are module calls
    in execution order, and a functional node's site names the module whose forward made it.
    """
    parts = fxblur.report(result).parts
    roots = [""] if parts is None else list(parts.rewritten)
    calls: dict[str, tuple[str, int]] = {}
    makers: dict[str, str] = {}
    for root in roots:
        flat = flat_graph_module(result.get_submodule(root))
        if flat is None:
            continue
        seen: Counter[str] = Counter()
        for node in flat.graph.nodes:
            if node.op == "call_module":
                path = f"{root}.{node.target}" if root else node.target
                calls[f"{root}/{node.name}"] = (path, seen[path])
                seen[path] += 1
            elif node.op == "call_function" and SITE in node.meta:
                maker = node.meta[SITE].rpartition(".")[0]
                makers[f"{root}/{node.name}"] = f"{root}.{maker}".strip(".")
    found = FullResolution()
    for change in fxblur.changes(result):
        root = next((r for r in roots if not r or change.target.startswith(f"{r}.")), "")
        names = [f"{root}/{n}" for n in change.enlarged_nodes]
        found.calls |= {calls[n] for n in names if n in calls}
        found.makers |= {makers[n] for n in names if n in makers}
    return found


def inlined_modules(result: nn.Module) -> dict[str, str]:
    """Module path -> why, for the modules the rewrite inlined into their callers (no longer called)."""
    nesting = fxblur.report(result).nesting
    return {} if nesting is None else {item.path: item.reason for item in nesting.inlined}


def grew(expected: Any, got: Any) -> bool:
    """``got`` is ``expected`` at full resolution: same batch and channels, larger along the spatial axes."""
    if not (isinstance(expected, tuple) and isinstance(got, tuple) and len(expected) == len(got) > 2):
        return False
    if not all(isinstance(d, int) for d in expected + got):
        return False
    spatial = list(zip(expected[2:], got[2:], strict=True))
    return expected[:2] == got[:2] and all(g >= e for e, g in spatial) and any(g > e for e, g in spatial)


def first_difference(
    expected: Shapes, got: Shapes, enlarged: set[tuple[str, int]], inlined: Iterable[str] = ()
) -> str | None:
    """The first module call (in order of the original's calls) whose output shape changed, described.

    Modules the rewrite ``inlined`` into their callers (``fxblur.report(result).nesting``) are
    no longer called; their absence is not a difference.
    """
    for path, shapes in expected.items():
        calls = got.get(path, [])
        name = path or "(model output)"
        if not calls and path in inlined:
            continue
        if len(calls) != len(shapes):
            return f"{name}: called {len(calls)} times, not {len(shapes)}"
        for call, (before, after) in enumerate(zip(shapes, calls, strict=True)):
            if before != after and not ((path, call) in enlarged and grew(before, after)):
                return f"{name} (call {call}): {before} -> {after}"
    return None


def reblurred(result: nn.Module, original: nn.Module) -> list[str]:
    """Blurs added inside a layer that already anti-aliases (it must stay a leaf)."""
    found = []
    modules = dict(original.named_modules())
    for change in fxblur.changes(result):
        if change.action == "skipped":
            continue
        parts = change.target.split(".")
        for i in range(len(parts), 0, -1):
            module = modules.get(".".join(parts[:i]))
            if module is not None and ANTI_ALIASING.search(type(module).__name__):
                found.append(f"{'.'.join(parts[:i])} ({type(module).__name__})")
                break
    return sorted(set(found))


def count_reasons(reasons: Iterable[str]) -> str:
    return "; ".join(f"{n}x {reason}" if n > 1 else reason for reason, n in Counter(reasons).most_common())


class _RegisteredLeavesTracer(fx.Tracer):
    """A plain torch.fx tracer with the leaf modules and autowrapped functions a library registered."""

    def __init__(self, leaves: tuple[type, ...], functions: tuple[Callable, ...]) -> None:
        super().__init__(autowrap_functions=functions)
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def timm_fx_verdict(model: nn.Module) -> str:
    """Whether timm's own torch.fx registrations trace ``model`` whole.

    Those are the leaf modules and autowrapped functions timm registers for its feature
    extraction (``timm.layers.get_notrace_modules``, ``get_notrace_functions``).
    """
    from timm.layers import get_notrace_functions, get_notrace_modules

    leaves = tuple(get_notrace_modules())
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    used = sorted({type(m).__name__ for m in model.modules() if isinstance(m, leaves)})
    error: Exception | None = None
    for label, wrapped in (("leaf modules", ()), ("leaf modules and autowrapped functions", functions)):
        try:
            _RegisteredLeavesTracer(leaves, wrapped).trace(copy.deepcopy(model))
        except Exception as failure:
            error = failure
            continue
        return f"traces whole with timm's registered {label}" + (f" (leaves here: {', '.join(used)})" if used else "")
    return f"timm's registrations do not make it traceable: {short_paths(first_line(error))}"


def short_paths(text: str) -> str:
    """``text`` with installed-package paths cut to the package: ``.../site-packages/timm/x.py`` -> ``timm/x.py``."""
    return re.sub(r"/\S*?/(site|dist)-packages/", "", text)


def why_untraceable(original: Original) -> dict[str, str]:
    """Why torch.fx cannot trace the model whole (fxblur's strict error) and what timm's own tracer makes of it."""
    if original.untraceable is None:
        found = {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fxblur.transform(original.model, verbose=False)
        except Exception as error:
            found["trace_error"] = short_paths(str(error).splitlines()[0]).replace("fxblur could not trace ", "")
        if timm_available() and any(type(m).__module__.startswith("timm.") for m in original.model.modules()):
            found["timm_fx"] = timm_fx_verdict(original.model)
        original.untraceable = found
    return original.untraceable


def classify(result: nn.Module, original: Original, mismatch: str | None) -> tuple[str, str, dict[str, Any]]:
    """(status, notes, details) of a rewrite whose every shape was checked (``mismatch``: the first difference)."""
    decisions = fxblur.changes(result)
    parts = fxblur.report(result).parts
    small = [
        c for c in decisions if c.action == "skipped" and c.in_channels is not None and c.in_channels < MIN_CHANNELS
    ]
    anti_aliased = [c for c in decisions if c.action == "skipped" and already_anti_aliased(c)]
    skipped = [c for c in decisions if c.action == "skipped" and c not in small and c not in anti_aliased]
    details: dict[str, Any] = {
        "skipped_ops": [
            {"target": c.target, "op": c.op, "in_channels": c.in_channels, "reason": c.reason} for c in skipped
        ],
        "untraced": [] if parts is None else [dataclasses.asdict(u) for u in parts.untraced],
        "rewritten_parts": None if parts is None else list(parts.rewritten),
    }
    twice = reblurred(result, original.model)
    if mismatch or twice:
        details["error"] = f"shape mismatch at {mismatch}" if mismatch else f"blurred again inside {', '.join(twice)}"
        return "failed", details["error"], details
    notes = []
    if parts is not None:
        details.update(why_untraceable(original))
        if parts.untraced:
            notes.append("untraced: " + ", ".join(f"{u.path or '(root)'} ({u.module})" for u in parts.untraced))
        notes += [
            f"untraceable: {details['trace_error']}" if "trace_error" in details else "",
            details.get("timm_fx", ""),
        ]
    if skipped:
        notes.append("skipped: " + count_reasons(c.reason for c in skipped))
    if parts is not None:
        return "partial", "; ".join(filter(None, notes)), details
    if skipped:
        return "skipped ops", "; ".join(notes), details
    done = f"already anti-aliased: {count_reasons(c.op for c in anti_aliased)}" if anti_aliased else ""
    if all(c.action == "skipped" for c in decisions):
        why = [
            "" if decisions else "no strided conv or pool",
            "only ops with < 16 channels: " + ", ".join(f"{c.target} ({c.in_channels} ch)" for c in small)
            if small
            else "",
            done,
        ]
        return "nothing to blur", "; ".join(filter(None, why)), details
    return "rewritten", done, details


def already_anti_aliased(change: fxblur.Change) -> bool:
    """A layer that anti-aliases already (timm's BlurPool2d, ...), which fxblur leaves alone on purpose."""
    return bool(ANTI_ALIASING.search(change.op)) or change.reason.startswith("already anti-aliased")


def check_placement(case: Case, original: Original, placement: str) -> Result:
    """Rewrite ``original.model`` in ``placement`` and compare every module output shape."""
    start = time.monotonic()
    result = Result(case.source, case.name, placement, "failed", device=original.device.type)
    result.sizes = [list(size) for size in original.shapes]
    stage = "transform"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rewritten = fxblur.transform(original.model, strict=False, verbose=False, **PLACEMENTS[placement])
        decisions = fxblur.changes(rewritten)
        result.blurred = sum(c.action != "skipped" for c in decisions)
        result.skipped = len(decisions) - result.blurred
        stage = "run"
        full = full_resolution(rewritten)
        inlined = inlined_modules(rewritten)
        mismatch = None
        for size, expected in original.shapes.items():
            got = module_shapes(rewritten, torch.zeros(size, device=original.device), expected, full)
            difference = first_difference(expected, got, full.calls, inlined)
            if difference:
                mismatch = f"{difference} at input {'x'.join(map(str, size[2:]))}"
                break
        result.status, notes, result.details = classify(rewritten, original, mismatch)
        if inlined:
            result.details["inlined"] = inlined
            notes += ("; " if notes else "") + "inlined: " + ", ".join(f"{p} ({why})" for p, why in inlined.items())
        result.notes = "; ".join(filter(None, [notes, *original.notes]))
    except Exception as error:
        result.notes = result.details["error"] = f"{stage}: {first_line(error)}"
    result.seconds = round(time.monotonic() - start, 2)
    return result


def survey(
    case: Case, placements: Iterable[str] = ("default", "blur_after"), timeout: float | None = None
) -> list[Result]:
    """One ``Result`` per placement for ``case``; every exception and timeout is reported, not raised."""
    placements = list(placements)
    results: list[Result] = []
    start = time.monotonic()
    try:
        with time_limit(timeout):
            original = run_original(case)
            for placement in placements:
                results.append(check_placement(case, original, placement))
    except TimedOut as error:
        for placement in placements[len(results) :]:
            results.append(Result(case.source, case.name, placement, "timeout", notes=str(error)))
    except Exception as error:  # the original cannot be built or run
        stage = "original" if "original" in locals() else "build/run original"
        for placement in placements[len(results) :]:
            message = f"{stage}: {first_line(error)}"
            results.append(
                Result(case.source, case.name, placement, "failed", notes=message, details={"error": message})
            )
    if not results:
        return results
    results[0].seconds = round(time.monotonic() - start - sum(r.seconds for r in results[1:]), 2)
    return results


# ---------------------------------------------------------------- output


def table(results: list[Result], width: int = 110) -> str:
    rows = [
        (
            r.source,
            r.model,
            r.placement,
            r.status,
            r.blurred,
            r.skipped,
            r.notes[:width] + ("..." if len(r.notes) > width else ""),
        )
        for r in results
    ]
    return tabulate(
        rows, ["file", "model", "placement", "status", "blurred", "skipped", "notes"], disable_numparse=True
    )


def summary(results: list[Result]) -> dict[str, dict[str, int]]:
    """placement -> status -> number of models."""
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        counts.setdefault(r.placement, dict.fromkeys(STATUSES, 0))[r.status] += 1
    return counts


def summary_table(results: list[Result]) -> str:
    counts = summary(results)
    rows = [[status, *(counts[p][status] for p in counts)] for status in STATUSES]
    rows.append(["total", *(sum(counts[p].values()) for p in counts)])
    return tabulate(rows, ["status", *counts], disable_numparse=True)


def as_json(results: list[Result]) -> str:
    return json.dumps({"summary": summary(results), "results": [dataclasses.asdict(r) for r in results]}, indent=2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/zoo.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models", nargs="+", metavar="NAME", help="timm or torchvision model names (instead of one per file)"
    )
    p.add_argument(
        "--files", nargs="+", metavar="FILE", help="timm model files (resnet convnext) or torchvision tasks (video)"
    )
    p.add_argument("--torchvision", action="store_true", help="survey the torchvision zoo instead of the timm files")
    p.add_argument("--timm", action="store_true", help="with --torchvision: survey the timm files as well")
    p.add_argument(
        "--placements",
        nargs="+",
        choices=PLACEMENTS,
        default=["default", "blur_after"],
        metavar="PLACEMENT",
        help=f"any of {', '.join(PLACEMENTS)} (default: default blur_after)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the first N models")
    p.add_argument("--timeout", type=float, default=300, metavar="S", help="seconds per model (default 300; 0: none)")
    p.add_argument("--list", action="store_true", help="only show which model each file stands for")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    p.add_argument("--json-out", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cases = select_cases(args.files, args.models, args.torchvision, args.timm or None)[: args.limit]
    except ValueError as error:
        parser().error(str(error))
    if args.list:
        print(
            tabulate([(c.source, c.name, "x".join(map(str, c.input_size))) for c in cases], ["file", "model", "input"])
        )
        return 0
    results = []
    for i, case in enumerate(cases, 1):
        batch = survey(case, args.placements, args.timeout or None)
        results += batch
        statuses = ", ".join(f"{r.placement}: {r.status}" for r in batch)
        print(f"[{i}/{len(cases)}] {case.name} ({sum(r.seconds for r in batch):.1f} s) {statuses}", file=sys.stderr)
        gc.collect()
    if args.json_out:
        args.json_out.write_text(as_json(results) + "\n")
    print(as_json(results) if args.json else f"{table(results)}\n\n{summary_table(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
