"""Input checks traced as passing: ``if ...: raise`` and ``assert`` kept in the graph as assertions.

A forward that checks its input (``if x.shape[1] != self.channels: raise ValueError(...)``,
as Hugging Face's embeddings do, or ``assert x.dim() == 4``) asks ``bool()`` of a proxy,
which torch.fx cannot answer. When the code asking is such a check, the tracer answers
with the value that lets it pass, and keeps the test in the graph as a ``torch._assert``:
an input that fails it still fails. ``passing_value`` reads the check from the source of
the model's frame:

- the operands ``bool()`` is called on are the test's leaves: ``if a != b or not c: raise``
  passes with ``a != b`` false and ``c`` true; where the leaves on one line need different
  values, or a chained comparison may be decided by either side, there is no answer;
- a membership test against a literal (``x.shape[1] not in (16, 32)``) calls ``bool()`` on
  ``element == x`` for the elements in turn: each gets what lets the membership pass (true
  for the first if it must hold, false for all if it must not), and the graph keeps the
  membership itself, ``x in (16, 32)``, as the assertion.

Example:
    >>> import ast
    >>> operand_values(ast.parse("a != b or c", mode="eval").body, False)  # both operands false
    {False}
    >>> operand_values(ast.parse("a != b or not c", mode="eval").body, False)  # no one answer
    {False, True}
    >>> membership_of(ast.parse("x.shape[1] not in (16, 32)", mode="eval").body, passing=False)
    Membership(elements=(16, 32), holds=True)
"""

from __future__ import annotations

import ast
import inspect
import linecache
import textwrap
from dataclasses import dataclass
from types import FrameType
from typing import Any


@dataclass(frozen=True)
class Membership:
    """A test ``x in elements`` (or ``not in``) that must come out as ``holds`` for its check to pass."""

    elements: tuple
    holds: bool


@dataclass(frozen=True)
class Check:
    """The check a frame is deciding: what each plain operand must be, its memberships, and where it is.

    ``value`` is ``None`` where the plain operands need different values.
    """

    value: bool | None
    memberships: tuple[Membership, ...]
    where: str


def check_in(frame: FrameType | None) -> Check | None:
    """The ``if ...: raise`` or ``assert`` whose test ``frame`` is deciding, or ``None``."""
    if frame is None:
        return None
    try:
        lines, first = inspect.getsourcelines(frame.f_code)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return None
    line = frame.f_lineno - first + 1
    checks = [
        (node.test, isinstance(node, ast.Assert))
        for node in ast.walk(tree)
        if (isinstance(node, ast.Assert) or (isinstance(node, ast.If) and [type(s) for s in node.body] == [ast.Raise]))
        and node.test.lineno <= line <= node.test.end_lineno
    ]
    if not checks:
        return None
    test, passing = min(checks, key=lambda check: check[0].end_lineno - check[0].lineno)
    memberships: list[Membership] = []
    values = operand_values(test, passing, memberships)
    source = linecache.getline(frame.f_code.co_filename, test.lineno + first - 1).strip()
    where = f"{frame.f_code.co_filename}:{test.lineno + first - 1} (`{source}`)"
    return Check(values.pop() if len(values) == 1 else None, tuple(memberships), where)


def operand_values(test: ast.expr, value: bool, memberships: list[Membership] | None = None) -> set[bool]:
    """The values the plain operands of ``test`` (what ``bool()`` is called on) take when ``test`` is ``value``.

    Membership tests against a literal are collected in ``memberships`` (when given) instead.
    """
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return operand_values(test.operand, not value, memberships)
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or if not value else ast.And):
        return {found for operand in test.values for found in operand_values(operand, value, memberships)}
    membership = membership_of(test, value)
    if membership is not None and memberships is not None:
        memberships.append(membership)
        return set()
    if isinstance(test, ast.BoolOp) or (isinstance(test, ast.Compare) and len(test.ops) > 1) or membership:
        return {True, False}  # either operand may decide it, or a chained comparison
    return {value}


def membership_of(test: ast.expr, passing: bool) -> Membership | None:
    """``test`` as a membership against a literal collection, with the outcome that passes; else ``None``."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.In, ast.NotIn))):
        return None
    try:
        elements = ast.literal_eval(test.comparators[0])
    except ValueError:
        return None
    if not isinstance(elements, (tuple, list, set, frozenset)):
        return None
    holds = passing if isinstance(test.ops[0], ast.In) else not passing
    return Membership(tuple(elements), holds)


def membership_compared(check: Check, constant: Any) -> Membership | None:
    """The membership of ``check`` whose element ``constant`` is being compared with the tested value, if any."""
    return next((m for m in check.memberships if any(constant == e for e in m.elements)), None)
