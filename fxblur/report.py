"""The change report: what a rewrite blurred, what it skipped and why, as a table or data.

Example:
    >>> gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
    >>> report(gm).summary()
    'ResNet: 7 blurred, 1 skipped'
    >>> report(gm).records()[0]["reason"]
    'in_channels 3 < min_channels 16'
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from tabulate import tabulate

from fxblur.changes import Change, changes


@dataclass(frozen=True)
class Report:
    """The decisions of one rewrite, ready to print (``str(report)``) or to process."""

    model: str
    changes: tuple[Change, ...]

    def records(self) -> list[dict[str, Any]]:
        """One plain dict per strided op considered."""
        return [change.as_dict() for change in self.changes]

    def summary(self) -> str:
        counts = Counter("skipped" if c.action == "skipped" else "blurred" for c in self.changes)
        return f"{self.model}: {counts['blurred']} blurred, {counts['skipped']} skipped"

    def table(self, tablefmt: str = "simple") -> str:
        rows = [
            [
                c.target,
                c.op,
                _size(c.kernel_size),
                _size(c.stride),
                _channels(c),
                c.action if c.action != "skipped" else f"skipped: {c.reason}",
            ]
            for c in self.changes
        ]
        headers = ["target", "op", "kernel", "stride", "channels", "action"]
        return tabulate(rows, headers, tablefmt=tablefmt)

    def json(self) -> str:
        return json.dumps({"model": self.model, "summary": self.summary(), "records": self.records()}, indent=2)

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"


def report(gm: fx.GraphModule) -> Report:
    """The change report of a GraphModule returned by ``fxblur.transform``."""
    return Report(model=type(gm).__name__, changes=tuple(changes(gm)))


def _size(values: tuple[int, ...] | None) -> str:
    return "?" if values is None else "x".join(map(str, values))


def _channels(change: Change) -> str:
    if change.in_channels is None:
        return ""
    return f"{change.in_channels}->{change.out_channels}"
