"""Strided ops inside modules the tracer calls whole: rewritten as parts where that is safe, else recorded as skipped.

A module called whole runs code fxblur does not see. For timm's modules registered as not
traceable (cpubone's ``ConvAttention``), a child that code only calls whole (a
``ConvLayer`` holding a strided conv) is rewritten on its own, as ``strict=False``
rewrites a model (``fxblur.assemble.partial``). Not inside the user's ``leaf_modules``,
which mean "leave whole", nor inside a module that shares a submodule with the rest of
the model. Every strided op left inside a leaf gets a skipped record saying why.

Example:
    >>> model = nn.Sequential(nn.Sequential(nn.Conv2d(16, 16, 3, stride=2)))
    >>> [(c.target, c.reason) for c in skipped_inside(model, ["0"])]
    [('0.0', 'inside 0 (Sequential), which is called whole')]
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable

from torch import nn

from fxblur.analysis.window_ops import skipped_module
from fxblur.assemble.partial import Rewrite, in_model, re_rooted, rewrite_parts
from fxblur.record import Change
from fxblur.trace import UntraceableModelError


def rewrite_inside_registered_leaves(
    root: nn.Module, leaves: Iterable[str], leaf_modules: tuple, rewrite: Rewrite
) -> list[Change]:
    """Rewrite the parts of the modules at ``leaves`` that timm registered as not traceable; their decisions."""
    classes = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
    counts = Counter(id(module) for _, module in root.named_modules(remove_duplicate=False))
    found = []
    for leaf in leaves:
        module = root.get_submodule(leaf)
        if leaf in leaf_modules or isinstance(module, classes) or any(counts[id(sub)] > 1 for sub in module.modules()):
            continue
        why = UntraceableModelError(f"inside {leaf} ({type(module).__name__}), which is called whole")
        in_leaf = functools.partial(_in_leaf, rewrite, leaf)
        decisions, _ = rewrite_parts(module, why, in_leaf, re_rooted(leaf_modules, leaf))
        found += [in_model(change, leaf) for change in decisions]
    return found


def _in_leaf(
    rewrite: Rewrite, leaf: str, part: nn.Module, path: str, leaves: tuple, reached: frozenset[int]
) -> nn.Module:
    """``rewrite`` for a part at ``path`` in the module at ``leaf``."""
    return rewrite(part, f"{leaf}.{path}", leaves, reached)


def skipped_inside(root: nn.Module, leaves: Iterable[str]) -> list[Change]:
    """A skipped record for every strided conv or pool in the leaf modules at ``leaves`` (code fxblur does not see)."""
    found = []
    for leaf in leaves:
        why = f"inside {leaf} ({type(root.get_submodule(leaf)).__name__}), which is called whole"
        for path, module in root.get_submodule(leaf).named_modules():
            record = skipped_module(module, f"{leaf}.{path}", why) if path else None
            if record is not None:
                found.append(record)
    return found
