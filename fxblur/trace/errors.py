"""``UntraceableModelError``: where tracing failed, and what to try.

The message names the module and the model's source line that failed, the error torch.fx
raised, and a hint: call the failing module whole (``leaf_modules``), fix the non-tensor
inputs that drive its control flow (``concrete_args``), or, for a model whose own forward
cannot be traced (a detector), rewrite its traceable parts with ``strict=False``. The parts
are also attributes, so code never needs to read the message.

Example:
    >>> error = explain(nn.Sequential(), "0", nn.Identity, RuntimeError("boom"))
    >>> error.summary
    'fxblur could not trace Sequential in module `0` (Identity): RuntimeError: boom'
    >>> error.hint.startswith("call the failing module as a whole")
    True
"""

from __future__ import annotations

import linecache

from torch import nn
from torch.fx.proxy import TraceError

from fxblur.trace.frames import model_traceback_entry


class UntraceableModelError(TraceError):
    """torch.fx could not trace the model; the message says where and what to try.

    Attributes:
        summary: the first line: the model, the module and source line that failed, and the error.
        hint: what to try.
        module_path: the path of the innermost module that failed (``""`` for the root,
            ``None`` if no module was being traced).
    """

    def __init__(self, summary: str, hint: str = "", module_path: str | None = None) -> None:
        super().__init__(f"{summary}\nHint: {hint}" if hint else summary)
        self.summary = summary
        self.hint = hint
        self.module_path = module_path


def explain(root: nn.Module, path: str | None, cls: type | None, error: BaseException) -> UntraceableModelError:
    """The error for a trace of ``root`` that failed with ``error`` in the module at ``path`` (of class ``cls``)."""
    model = type(root).__name__
    where = "" if path is None else f" in module `{path or '(root)'}` ({cls.__name__})"
    line = _model_line(error)
    if line:
        where += f" at {line}"
    if path:
        hint = (
            f"call the failing module as a whole with transform(model, leaf_modules=[{cls.__name__}]) "
            "(strided ops inside it are then left alone), or fix the non-tensor inputs that drive its control "
            "flow with concrete_args={...}."
        )
    else:
        hint = (
            f"{model}.forward itself cannot be traced: fix the non-tensor inputs that drive its control flow "
            "with concrete_args={...}, or rewrite its traceable parts (such as its backbone) with "
            "transform(model, strict=False)."
        )
    return UntraceableModelError(f"fxblur could not trace {model}{where}: {type(error).__name__}: {error}", hint, path)


def _model_line(error: BaseException) -> str | None:
    """``file:line (`source`)`` of the innermost traceback entry in the model's code."""
    entry = model_traceback_entry(error)
    if entry is None:
        return None
    source = (entry.line or linecache.getline(entry.filename, entry.lineno)).strip()
    return f"{entry.filename}:{entry.lineno} (`{source}`)"
