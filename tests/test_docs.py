"""The guides in docs/ stay true: every Python example runs, every link resolves,
and the optimizer reference lists every group key with the constructor's default."""

from __future__ import annotations

import re

import pytest
import torch
from markdown_examples import ROOT, python_blocks, run_example

import matrixopt

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
EXAMPLES = [b for page in PAGES for b in python_blocks(page)]


def test_docs_exist_and_have_examples():
    names = {p.name for p in PAGES}
    assert {"index.md", "choosing.md", "migration.md", "hyperparameters.md", "linalg.md",
            "optimizers.md"} <= names
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("example", EXAMPLES, ids=[b.id for b in EXAMPLES])
def test_doc_example_runs(example):
    run_example(example)


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md", ROOT / "CHANGELOG.md"],
                         ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in _LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: broken link {target}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path.read_text()), f"{page.name}: no heading for {target}"


def _anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    heads = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


_ROW = re.compile(r"^\| `(\w+)` \| `([^`]*)` \|", flags=re.MULTILINE)


@pytest.mark.parametrize("cls", [matrixopt.Muon, matrixopt.GaLoreAdamW, matrixopt.GaLoreAdafactor,
                                 matrixopt.Adafactor, matrixopt.SOAP, matrixopt.Shampoo,
                                 matrixopt.Dion], ids=lambda c: c.__name__)
def test_reference_lists_every_group_key_with_its_default(cls):
    sections = _sections((DOCS / "optimizers.md").read_text())
    assert cls.__name__ in sections, f"optimizers.md has no '## {cls.__name__}' section"
    rows = dict(_ROW.findall(sections[cls.__name__]))
    defaults = cls([torch.nn.Parameter(torch.zeros(2, 2))]).defaults
    missing = sorted(set(defaults) - set(rows))
    assert not missing, f"optimizers.md, ## {cls.__name__}: no row for group key(s) {missing}"
    extra = sorted(set(rows) - set(defaults))
    assert not extra, f"optimizers.md, ## {cls.__name__}: rows for unknown key(s) {extra}"
    for key, text in rows.items():
        # the cell is a Python literal from our own Markdown (e.g. `(0.9, 0.999)`)
        documented = eval(text, {"torch": torch})
        assert documented == defaults[key], (
            f"optimizers.md, ## {cls.__name__}: `{key}` documented as {text}, "
            f"the constructor's default is {defaults[key]!r}")
