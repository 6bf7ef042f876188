"""How code that cannot be traced uses a module's children: the callers a partial rewrite must respect.

``transform(strict=False)`` rewrites the traceable parts of a model whose own forward
cannot be traced, and leaves that forward as it is. A part may only be replaced where
every caller goes through it: if the untraced forward calls ``self.enc.pool(self.enc.conv(x))``,
``enc``'s own forward never runs, so rewriting ``enc`` would claim blurs that never happen
(or, run at stride 1, change sizes). ``uses`` reads the source of the untraced methods
and tells, for each child, how that code uses it:

- ``self.child(...)`` (or ``self.child.forward(...)``): called as a whole, so it can be
  a part;
- ``self.child.grandchild(...)``, ``self.child.method(...)``: reached into; the child is
  not a part, and what it holds is judged by these uses (and by the methods called);
- ``for layer in self.child: x = layer(x)`` or ``self.child[i](x)``: each of its children
  is called as a whole;
- anything else (passed to a function, stored, iterated and reached into, code whose
  source cannot be read, ``getattr(self, name)``): unknown, so the child's whole subtree is
  left as it is, and the reason says why.

Reading parameters, buffers or plain attributes of a child (``self.fc.in_features``) does
not count: a rewrite never changes them.

Example:
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.enc = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    ...         self.head = nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         y = self.enc[1](self.enc[0](x))
    ...         return self.head(y.mean((2, 3)))
    >>> found = uses(Net(), ["forward"])
    >>> found["head"].called, found["enc"].children_called, found["enc"].opaque
    (True, True, '')
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class Use:
    """How untraced code uses one module (see the module docstring)."""

    called: bool = False
    methods: set[str] = field(default_factory=set)
    reached: dict[str, Use] = field(default_factory=dict)
    children_called: bool = False
    opaque: str = ""

    @property
    def reached_into(self) -> bool:
        """Whether the code goes past this module's ``forward``: its children are used directly."""
        return bool(self.methods or self.reached or self.children_called)

    def merge(self, other: Use) -> None:
        self.called |= other.called
        self.methods |= other.methods
        self.children_called |= other.children_called
        self.opaque = self.opaque or other.opaque
        for name, use in other.reached.items():
            self.reached.setdefault(name, Use()).merge(use)


def uses(module: nn.Module, methods: Iterable[str]) -> dict[str, Use]:
    """For each child of ``module`` that the code of ``methods`` (and the methods they call) uses, how."""
    found: dict[str, Use] = {}
    todo = [(type(module), name) for name in methods]
    seen: set[tuple[type, str]] = set()
    while todo:
        cls, name = todo.pop()
        if (cls, name) in seen:
            continue
        seen.add((cls, name))
        owner = next((base for base in cls.__mro__ if name in vars(base)), None)
        where = f"{type(module).__name__}.{name}"
        tree = None if owner is None or owner is nn.Module else _parse(vars(owner)[name])
        if tree is None:
            return {child: Use(opaque=f"the source of {where} cannot be read") for child in module._modules}
        chains = _Chains(module, where)
        chains.visit(tree)
        if chains.dynamic:
            return {child: Use(opaque=f"{where} reaches its children dynamically") for child in module._modules}
        todo.extend((type(module), method) for method in chains.own_methods)
        todo.extend((base, method) for method in chains.super_methods for base in owner.__mro__[1:2])
        for child, use in chains.found.items():
            found.setdefault(child, Use()).merge(use)
    return found


def _parse(function: Any) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None


def _self_chain(node: ast.AST) -> list[str] | None:
    """``["a", "b"]`` for ``self.a.b``; ``None`` for anything that is not attributes of ``self``."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "self":
        return names[::-1]
    return None


class _Chains(ast.NodeVisitor):
    """Collects how one method's code uses ``self``'s children."""

    _DYNAMIC = frozenset({"getattr", "setattr", "vars"})

    def __init__(self, module: nn.Module, where: str) -> None:
        self.module = module
        self.where = where
        self.found: dict[str, Use] = {}
        self.own_methods: set[str] = set()
        self.super_methods: set[str] = set()
        self.dynamic = False

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        chain = _self_chain(func)
        if chain is not None:
            self._use(chain, "call")
        elif isinstance(func, ast.Subscript) and _self_chain(func.value):
            self._use(_self_chain(func.value), "call each child")
            self.visit(func.slice)
        elif isinstance(func, ast.Attribute) and _is_super(func.value):
            self.super_methods.add(func.attr)
        elif isinstance(func, ast.Name) and func.id in self._DYNAMIC and node.args and _self_chain(node.args[0]) == []:
            self.dynamic = True
        else:
            self.visit(func)
        for argument in [*node.args, *(keyword.value for keyword in node.keywords)]:
            self.visit(argument)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = _self_chain(node)
        if chain is None:
            self.generic_visit(node)
        else:
            self._use(chain, "value")

    def visit_Subscript(self, node: ast.Subscript) -> None:
        chain = _self_chain(node.value)
        if chain is None:
            self.generic_visit(node)
        else:
            self._use(chain, "index")
            self.visit(node.slice)

    def visit_For(self, node: ast.For) -> None:
        chain = _self_chain(node.iter)
        if chain is None or not isinstance(node.target, ast.Name):
            self.generic_visit(node)
            return
        only_called = _only_called(node.target.id, node.body)
        self._use(chain, "call each child" if only_called else "index")
        for statement in [*node.body, *node.orelse]:
            self.visit(statement)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id == "self":  # self itself handed to other code
            self.dynamic = True

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for statement in node.body:  # not the signature: ``self`` is declared there
            self.visit(statement)

    def _use(self, chain: list[str], how: str) -> None:
        """Record a use of ``self.<chain>`` of kind ``how`` on the module it reaches."""
        module, path = self.module, []
        for i, name in enumerate(chain):
            child = module._modules.get(name) if isinstance(module, nn.Module) else None
            if child is None:
                self._use_attribute(module, path, name, how if i == len(chain) - 1 else "value")
                return
            module, path = child, [*path, name]
        if not path:  # self itself: iterated over (a Sequential subclass), or handed to other code
            if how == "call each child":
                for name in self.module._modules:
                    self._slot([name]).called = True
            else:
                self.dynamic = True
            return
        use = self._slot(path)
        if how == "call":
            use.called = True
        elif how == "call each child":
            use.children_called = True
        else:
            use.opaque = f"{self.where} uses self.{'.'.join(path)} other than by calling it"

    def _use_attribute(self, module: Any, path: list[str], name: str, how: str) -> None:
        """``self.<path>.<name>`` where ``name`` is not a submodule: a method (called or handed on), or data."""
        if not callable(getattr(type(module), name, None)):
            return  # data: parameters, buffers, sizes; a rewrite never changes them
        if not path:
            self.own_methods.add(name)
        elif name == "forward" and how == "call":
            self._slot(path).called = True
        else:
            self._slot(path).methods.add(name)

    def _slot(self, path: list[str]) -> Use:
        use = self.found.setdefault(path[0], Use())
        for name in path[1:]:
            use = use.reached.setdefault(name, Use())
        return use


def _is_super(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _only_called(name: str, body: list[ast.stmt]) -> bool:
    """Whether every use of the variable ``name`` in ``body`` is a call of it."""
    nodes = list(ast.walk(ast.Module(body=body, type_ignores=[])))
    called = sum(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name for node in nodes
    )
    return called == sum(isinstance(node, ast.Name) and node.id == name for node in nodes)
