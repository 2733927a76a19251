"""The README's Python examples run as written."""

import re

import pytest
from markdown_examples import ROOT, python_blocks, run_example

README = ROOT / "README.md"
BLOCKS = python_blocks(README)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("example", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_example_runs(example):
    run_example(example)


def test_readme_states_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_readme_has_one_shell_block_with_exactly_the_two_commands():
    text = README.read_text()
    shell = re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text,
                       flags=re.DOTALL | re.MULTILINE)
    assert len(shell) == 1
    commands = [line.split("#", 1)[0].strip() for line in shell[0].splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]
