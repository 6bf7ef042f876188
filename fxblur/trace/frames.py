"""Where the model's own code is: the innermost frame or traceback entry outside torch and fxblur.

The tracer names the model line that made a call (site names, ``fxblur.trace.calls``),
reads the check a ``bool()`` of a proxy decides (``fxblur.trace.checks``), and blames the
line that failed to trace (``fxblur.trace.errors``); all three skip the frames of torch and
of fxblur itself (its ops included: a model that calls ``fxblur.blur`` is blamed for its
own line, not for fxblur's).

Example:
    >>> from fxblur.ops import filters
    >>> is_library_file(torch.__file__), is_library_file(filters.__file__), is_library_file("net.py")
    (True, True, False)
"""

from __future__ import annotations

import os
import sys
import traceback
from types import FrameType

import torch

_LIBRARIES = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # fxblur/
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "passes") + os.sep,
)


def is_library_file(filename: str) -> bool:
    """Whether ``filename`` belongs to torch or fxblur (its passes included), or is generated code."""
    return os.path.abspath(filename).startswith(_LIBRARIES) or filename.startswith("<")


def model_frame() -> FrameType | None:
    """The innermost frame of the running stack outside torch and fxblur: the model code running."""
    frame = sys._getframe(1)
    while frame is not None and is_library_file(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def calling_line() -> tuple[str, int] | None:
    """``(file, line)`` of the model code that is making the current call, if any."""
    frame = model_frame()
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


def model_traceback_entry(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost entry of ``error``'s traceback outside torch and fxblur."""
    entries = [entry for entry in traceback.extract_tb(error.__traceback__) if not is_library_file(entry.filename)]
    return entries[-1] if entries else None
