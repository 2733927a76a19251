"""docs/choosing.md keeps no copy of measured numbers: the README's Results section is
the one source, and every command choosing.md names is one the README names too."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHOOSING = (ROOT / "docs" / "choosing.md").read_text()
README = (ROOT / "README.md").read_text()


def _prose(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def test_choosing_has_no_measured_numbers():
    text = _prose(CHOOSING)
    measured = re.findall(r"\d+\.\d+|\d+(?:\.\d+)?\s*[×x%]\B|\d+(?:\.\d+)?\s*(?:MB|ms|s)\b", text)
    assert not measured, f"docs/choosing.md quotes measurements {measured}; link the README"
    assert "../README.md#results" in CHOOSING


def test_choosing_commands_are_the_readmes():
    commands = re.findall(r"`(python (?:benchmarks|examples)/[^`]*)`", CHOOSING)
    assert commands, "choosing.md should name the commands behind the README's tables"
    for cmd in commands:
        assert cmd in README, f"docs/choosing.md names `{cmd}`, which the README does not"
