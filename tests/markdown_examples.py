"""Collect and run the ```python blocks of Markdown files (README.md, docs/*.md).

Each block is a self-contained program: it runs in a fresh namespace, so a
block never depends on an earlier one. A block whose first line is
``# requires: mod1, mod2`` needs optional packages (peers used for side-by-side
checks, e.g. ``galore_torch`` from the ``bench`` extra); it is skipped, with
the missing package named, when one of them does not import.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
_REQUIRES = re.compile(r"#\s*requires:\s*(.+)")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def requires(self) -> list[str]:
        first = self.code.splitlines()[0] if self.code else ""
        m = _REQUIRES.match(first.strip())
        return [s.strip() for s in m.group(1).split(",")] if m else []


def python_blocks(path: Path) -> list[Example]:
    """The ```python blocks of ``path`` with the line each starts on."""
    text = path.read_text()
    return [Example(path, text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in _BLOCK.finditer(text)]


def run_example(example: Example) -> None:
    """Execute one block (skipping it, with the reason, if an optional package is missing)."""
    missing = [mod for mod in example.requires if importlib.util.find_spec(mod) is None]
    if missing:
        pytest.skip(f"{example.id} needs {', '.join(missing)} (install the 'bench' extra)")
    # the line offset makes tracebacks point at the Markdown line
    code = "\n" * (example.line - 1) + example.code
    exec(compile(code, str(example.path), "exec"), {"__name__": "__doc_example__"})  # noqa: S102
