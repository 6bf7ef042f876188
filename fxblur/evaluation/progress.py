"""A one-line progress bar for long runs, with no dependency: ``label |#####.....| 50/100 3s``.

It is redrawn in place (``\\r``) at most every ``interval`` seconds, and once more with a
newline by ``close()`` (or at the end of a ``with`` block). With ``stream=None`` it draws
nothing, so callers can keep one code path for a terminal and for a pipe.

Example:
    >>> import io
    >>> stream = io.StringIO()
    >>> with ProgressBar(4, "resnet18", stream=stream, width=8) as bar:
    ...     bar.update(1)
    ...     bar.update(3)
    >>> stream.getvalue().split("\\r")[-1]
    'resnet18 |########| 4/4 0s\\n'
"""

from __future__ import annotations

import time
from typing import TextIO


class ProgressBar:
    """Counts up to ``total`` and draws the count on ``stream``.

    Args:
        total: the count at which the bar is full.
        label: printed before the bar.
        stream: where to draw (usually ``sys.stderr``); ``None`` draws nothing.
        width: characters inside the bar.
        interval: least seconds between redraws.
    """

    def __init__(
        self, total: int, label: str = "", *, stream: TextIO | None, width: int = 30, interval: float = 0.1
    ) -> None:
        self.total, self.label, self.stream, self.width, self.interval = total, label, stream, width, interval
        self.done = 0
        self._start = self._drawn = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.done += count
        if time.monotonic() - self._drawn >= self.interval:
            self._draw()

    def close(self) -> None:
        self._draw(end="\n")

    def __enter__(self) -> ProgressBar:
        self._draw()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _draw(self, end: str = "") -> None:
        if self.stream is None:
            return
        self._drawn = time.monotonic()
        filled = self.width * min(self.done, self.total) // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = self._drawn - self._start
        self.stream.write(f"\r{self.label} |{bar}| {self.done}/{self.total} {elapsed:.0f}s{end}")
        self.stream.flush()
