"""What ``transform`` checks of its arguments before any work, and warns about after.

Example:
    >>> check_tracing_options(False, True, False, "layer4", None, True)
    ('layer4',)
    >>> check_tracing_options(False, True, False, 5, None, True)
    Traceback (most recent call last):
    ...
    ValueError: leaf_modules must be nn.Module classes or module paths, got 5
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any

import torch
from torch import nn

from fxblur._compat import compiled_module_class
from fxblur.options import BlurOptions
from fxblur.record import Change
from fxblur.trace.signature import concrete_name


def check_tracing_options(
    copy: Any, strict: Any, flatten: Any, leaf_modules: Any, concrete_args: Any, verbose: Any
) -> tuple:
    """``ValueError`` for a tracing option of the wrong kind; ``leaf_modules`` as a tuple."""
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


def check_not_wrapped(model: nn.Module) -> None:
    """``TypeError`` for a compiled, scripted or data-parallel wrapper: fxblur rewrites the model inside."""
    wrappers = {
        "torch.compile": (compiled_module_class(), "model._orig_mod", "compile the result again"),
        "torch.jit": (torch.jit.ScriptModule, "the model before scripting", "script the result again"),
        "DataParallel": (nn.DataParallel, "model.module", "wrap the result again"),
        "DistributedDataParallel": (nn.parallel.DistributedDataParallel, "model.module", "wrap the result again"),
    }
    for name, (cls, inner, then) in wrappers.items():
        if isinstance(model, cls):
            raise TypeError(
                f"transform got a {name} wrapper ({type(model).__name__}); torch.fx cannot trace it. "
                f"Pass {inner} instead, and {then}: fxblur.transform(model) first, then wrap."
            )


def options_that_match_nothing(
    model: nn.Module, options: BlurOptions, leaf_modules: tuple, concrete_args: dict | None, decisions: list[Change]
) -> list[str]:
    """Each ``exclude`` pattern, leaf module or concrete argument that had no effect, said in words."""
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
    return [f"{problem}; it has no effect" for problem in problems]
