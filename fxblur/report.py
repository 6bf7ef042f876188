"""The change report: what a rewrite blurred, what it skipped and why, and what it costs.

Every row is one strided conv or pool the rewrite considered, taken from the decisions the
passes recorded (``fxblur.changes``). Given an example input shape, the rewritten graph is
run on fake tensors (no compute, no memory) and each row gains its feature-map sizes and
the multiply-adds and activation memory the rewrite adds in a forward pass; the summary
gains the model's MACs before and after.

The costs come from the nodes each decision names: every inserted node (the blur,
padding) counts in full, and every node that now runs at full resolution (an op moved to
stride 1) counts by how much it grew compared with the output it stands for.

A model with one graph per mode (``TrainEvalGraphModule``) is measured in its current
mode: an op it runs only in the other mode (a train-only auxiliary head) gets no sizes,
and the summary says "in train mode" where it counts one (published MAC counts are of
eval mode, which runs no auxiliary head).

For a model rewritten in parts (``transform(model, strict=False)``) the report lists the
decisions of every part under their full paths, and its summary names the parts that
were rewritten and the modules that could not be traced (``Report.parts``). Sizes and
costs need one graph: ask for them part by part, ``report(model.backbone, input_shape)``.

Example:
    >>> gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
    >>> r = report(gm, input_shape=(1, 3, 224, 224))
    >>> row = r.rows[2]
    >>> row.target, row.input_size, row.output_size, row.extra_macs
    ('layer2.0.conv1', (56, 56), (28, 28), 1204224)
    >>> r.summary().splitlines()[0]
    'ResNet: 7 blurred, 1 skipped'
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
from tabulate import tabulate, tabulate_formats
from torch import nn

from fxblur.analysis.equivariance import Verdict, example_for
from fxblur.assemble.nesting import Nesting
from fxblur.assemble.partial import Parts
from fxblur.costs import blurred_op_extra, node_bytes, node_macs, output_of, propagate_shapes
from fxblur.record import Action, Change, require_record

FORMATS = (*tabulate_formats, "json")


@dataclass(frozen=True)
class Row:
    """One strided op in the report; sizes and costs are ``None`` without an input shape."""

    target: str
    op: str
    kernel_size: tuple[int, ...] | None
    stride: tuple[int, ...]
    in_channels: int | None
    out_channels: int | None
    action: Action
    reason: str
    note: str = ""
    phase_group: str | None = None
    input_size: tuple[int, ...] | None = None
    output_size: tuple[int, ...] | None = None
    extra_macs: int | None = None
    extra_bytes: int | None = None


@dataclass(frozen=True)
class Report:
    """The decisions and costs of one rewrite: print it, or read ``rows`` / ``records()``.

    ``parts`` is set for a model rewritten in parts: which submodules were rewritten, and
    which modules could not be traced and run as before. ``nesting`` says which modules got
    a forward of their own and which were inlined into their callers (their hooks no
    longer fire); it is ``None`` for a flat result (``transform(flatten=True)``).
    ``specialised``: the ``forward`` arguments the trace fixed to their defaults (the result
    accepts no other value for them; ``fxblur.trace.signature.default_arguments``).
    ``verdict``: with polyphase sampling or circular padding, what the equivariance analysis
    proved (``fxblur.analysis.equivariance.Verdict``) at ``input_shape``, or at the example
    input ``transform`` analysed; ``None`` when neither was asked. ``training``: the mode
    sizes and costs were measured in (the model's own).
    """

    model: str
    rows: tuple[Row, ...]
    input_shape: tuple[int, ...] | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    parts: Parts | None = None
    nesting: Nesting | None = None
    verdict: Verdict | None = None
    specialised: dict[str, Any] = dataclasses.field(default_factory=dict)
    training: bool = False  # the mode sizes and costs were measured in

    @property
    def blurred(self) -> int:
        return sum(row.action is not Action.SKIPPED for row in self.rows)

    @property
    def skipped(self) -> int:
        return len(self.rows) - self.blurred

    @property
    def overhead(self) -> float | None:
        """Extra MACs of the rewrite as a fraction of the model's MACs before it."""
        if not self.macs_before:
            return None
        return (self.macs_after - self.macs_before) / self.macs_before

    def records(self) -> list[dict[str, Any]]:
        """One plain dict per row (tuples as lists, as in JSON)."""
        return json.loads(json.dumps([asdict(row) for row in self.rows]))

    def summary(self) -> str:
        lines = [f"{self.model}: {self.blurred} blurred, {self.skipped} skipped"]
        if not self.rows:
            lines[0] = f"{self.model}: no strided conv or pool of the kinds the options blur, nothing to blur"
        elif not self.blurred:
            reasons = sorted({row.reason for row in self.rows})
            lines[0] += f" - nothing blurred ({'; '.join(reasons)})"
        if self.verdict is not None:
            lines.append(f"shift {self.verdict.property_name}: {self.verdict.line()}")
        if self.specialised:
            fixed = ", ".join(f"{name}={value!r}" for name, value in self.specialised.items())
            lines.append(f"forward arguments fixed to their defaults: {fixed}")
        if self.nesting is not None and self.nesting.inlined:
            inlined = ", ".join(f"{item.path} ({item.reason})" for item in self.nesting.inlined)
            lines.append(f"inlined into their callers, no longer called as modules: {inlined}")
        if self.parts is not None:
            lines.append(f"rewritten parts: {', '.join(self.parts.rewritten) or 'none'}")
            if self.parts.untraced:
                untraced = ", ".join(f"{u.path} ({u.module})" for u in self.parts.untraced)
                lines.append(f"not traced, run as before: {untraced}")
        if self.macs_before is not None:
            size = "x".join(map(str, self.input_shape))
            mode = " in train mode" if self.training else ""
            lines.append(
                f"MACs at {size}{mode}: {_count(self.macs_before)} -> {_count(self.macs_after)} "
                f"({self.overhead:+.2%}); extra activations {_bytes(sum(r.extra_bytes or 0 for r in self.rows))}"
            )
        return "\n".join(lines)

    def table(self, tablefmt: str = "simple") -> str:
        """The rows as a table in any ``tabulate`` format."""
        sized = self.input_shape is not None
        grouped = any(row.phase_group for row in self.rows)
        headers = ["target", "op", "kernel", "stride", "channels", "action"] + (["phase group"] if grouped else [])
        headers += ["in -> out", "extra MACs", "extra memory"] if sized else []
        table = []
        for row in self.rows:
            cells = [
                row.target,
                row.op,
                _size(row.kernel_size),
                _size(row.stride),
                "" if row.in_channels is None else f"{row.in_channels}->{row.out_channels}",
                _action(row),
                *([row.phase_group or ""] if grouped else []),
            ]
            if sized and row.output_size is None:
                cells += [f"not run in {'train' if self.training else 'eval'} mode", "", ""]
            elif sized:
                cells += [
                    f"{_size(row.input_size)} -> {_size(row.output_size)}",
                    _count(row.extra_macs) if row.action is not Action.SKIPPED else "",
                    _bytes(row.extra_bytes) if row.action is not Action.SKIPPED else "",
                ]
            table.append(cells)
        return tabulate(table, headers, tablefmt=tablefmt, disable_numparse=True)

    def json(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "input_shape": self.input_shape,
                "blurred": self.blurred,
                "skipped": self.skipped,
                "macs_before": self.macs_before,
                "macs_after": self.macs_after,
                "overhead": self.overhead,
                "records": self.records(),
                "parts": None if self.parts is None else asdict(self.parts),
                "nesting": None if self.nesting is None else asdict(self.nesting),
                "verdict": None if self.verdict is None else asdict(self.verdict),
                "specialised": self.specialised,
            },
            indent=2,
        )

    def render(self, format: str = "simple") -> str:
        """``json()`` for ``"json"``, else the table in that tabulate format and the summary."""
        if format == "json":
            return self.json()
        if not self.rows:
            return self.summary()
        return f"{self.table(format)}\n{self.summary()}"

    def __str__(self) -> str:
        return self.render()


def report(gm: nn.Module, input_shape: Sequence[int] | torch.Tensor | None = None) -> Report:
    """The change report of a model returned by ``fxblur.transform``.

    Args:
        gm: the rewritten model: a GraphModule, or a model rewritten in parts.
        input_shape: an example input shape such as ``(1, 3, 224, 224)`` (or a tensor, whose
            shape, dtype and device are used). With it, rows gain feature-map sizes and costs.

    Raises:
        ValueError: ``gm`` was not returned by ``transform``, or ``input_shape`` was given
            for a model rewritten in parts.
    """
    record = require_record(gm)
    decisions = record.decisions
    model = type(gm).__name__
    parts = record.parts
    if parts is not None and input_shape is not None:
        raise ValueError(
            f"{model} was rewritten in parts ({', '.join(parts.rewritten) or 'none'}): sizes and costs need "
            "one graph; pass each part with its own input shape, e.g. report(model.<part>, input_shape)"
        )
    nesting, verdict, specialised = record.nesting, record.verdict, dict(record.specialised)
    if input_shape is None:
        rows = tuple(_row(change) for change in decisions)
        return Report(model, rows, parts=parts, nesting=nesting, verdict=verdict, specialised=specialised)
    flat = record.flat_graph(gm.training)
    example = input_shape if isinstance(input_shape, torch.Tensor) else example_for(gm, input_shape)
    if verdict is not None:  # proved anew at this shape
        verdict = record.verdict_at(tuple(example.shape))
    try:
        propagate_shapes(flat, example)
    except ValueError as error:  # BatchNorm in train mode refuses one value per channel
        if not gm.training:
            raise
        first = str(error).splitlines()[0]
        raise ValueError(
            f"{model} does not run in train mode on an input of {tuple(example.shape)}: {first}. The report "
            "measures the mode the model is in: call .eval() on it first, or give a larger batch"
        ) from error
    nodes = {node.name: node for node in flat.graph.nodes}
    rows = tuple(_row(change, nodes, flat) for change in decisions)
    macs_after = sum(node_macs(node, flat) for node in flat.graph.nodes)
    macs_before = macs_after - sum(row.extra_macs or 0 for row in rows)
    return Report(
        model,
        rows,
        tuple(example.shape),
        macs_before,
        macs_after,
        nesting=nesting,
        verdict=verdict,
        specialised=specialised,
        training=gm.training,
    )


def _row(change: Change, nodes: dict[str, fx.Node] | None = None, gm: fx.GraphModule | None = None) -> Row:
    row = Row(
        target=change.target,
        op=change.op,
        kernel_size=change.kernel_size,
        stride=change.stride,
        in_channels=change.in_channels,
        out_channels=change.out_channels,
        action=change.action,
        reason=change.reason,
        note=change.note,
        phase_group=change.phase_group,
    )
    named = (change.node, change.input_node, change.output_node, *change.added_nodes, *change.enlarged_nodes)
    if nodes is None or not all(name in nodes for name in named):
        return row  # no input shape, or an op the model does not run in its current mode
    spatial = len(change.stride)
    before, after = output_of(nodes[change.input_node]), output_of(nodes[change.output_node])
    extra_macs = extra_bytes = 0
    for name in change.added_nodes:
        extra_macs += node_macs(nodes[name], gm)
        extra_bytes += node_bytes(nodes[name])
    for name in change.enlarged_nodes:
        growth = 1 - after.numel() / output_of(nodes[name]).numel()  # what it adds over what it stands for
        extra_macs += round(node_macs(nodes[name], gm) * growth)
        extra_bytes += round(node_bytes(nodes[name]) * growth)
    if change.blurred_module:
        macs, memory = blurred_op_extra(nodes[change.node], gm)
        extra_macs += macs
        extra_bytes += memory
    return dataclasses.replace(
        row,
        input_size=tuple(before.shape[-spatial:]),
        output_size=tuple(after.shape[-spatial:]),
        extra_macs=extra_macs,
        extra_bytes=extra_bytes,
    )


def _action(row: Row) -> str:
    if row.action is Action.SKIPPED:
        return f"skipped: {row.reason}"
    return f"{row.action} ({row.note})" if row.note else str(row.action)


def _size(values: Sequence[int] | None) -> str:
    return "?" if values is None else "x".join(map(str, values))


def _count(value: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def _bytes(value: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"
