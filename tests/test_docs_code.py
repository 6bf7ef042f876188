"""Every Python code block in README.md and docs/ runs as written, each in a fresh namespace.

A block that cannot run here (it needs data this machine cannot make) is preceded by
``<!-- not run: the reason -->``; there is none today. A block importing a package that is
not installed is skipped, naming it: Composer's, which pins its own torch, runs in
``tools/composer_check.sh``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- not run: [^>]*-->\n)?```python\n(.*?)```", re.S)
IMPORTS = re.compile(r"^(?:from (\w+)|import ([\w., ]+))", re.M)


def blocks() -> list:
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start(2)].count("\n")
            name = f"{document.relative_to(ROOT)}:{line}"
            imported = set(imported_packages(match.group(2)))
            missing = sorted(package for package in imported if importlib.util.find_spec(package) is None)
            marks = [pytest.mark.skip(reason=match.group(1).strip())] if match.group(1) else []
            marks += [pytest.mark.skip(reason=f"needs {', '.join(missing)}")] if missing else []
            found.append(pytest.param(match.group(2), id=name, marks=marks))
    return found


def imported_packages(code: str) -> list[str]:
    """The top-level packages ``code``'s import statements name (``import a.b, c as d``: a, c)."""
    found = []
    for package, names in IMPORTS.findall(code):
        found += [package] if package else [name.split()[0].split(".")[0] for name in names.split(",")]
    return found


def test_the_docs_have_code_blocks() -> None:
    assert len(blocks()) >= 6


@pytest.mark.parametrize("code", blocks())
def test_code_block_runs_as_written(code: str, capsys) -> None:
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
