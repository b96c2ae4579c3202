"""The README's examples come from the current code: its ``lit-dp plan`` example is exactly what
``lit-dp plan`` prints today (it once showed count-noise lines and a gradient multiplier from an
old default), and the commands it names exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from lit_dp.commands import COMMANDS, main

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _console_examples(prefix: str) -> list[tuple[list[str], str]]:
    """(argv, printed text) of each ``$ <prefix> ...`` example in a fenced block."""
    blocks, current = [], None
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):  # a fence opens or closes a block
            if current is not None:
                blocks.append("".join(current))
            current = [] if current is None else None
        elif current is not None:
            current.append(line)
    found = []
    for block in blocks:
        if block.startswith(f"$ {prefix}"):
            command, _, printed = block.partition("\n")
            found.append((shlex.split(command[2:])[1:], printed))
    return found


def test_readme_plan_example_is_current(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example's config path is relative to the repository
    examples = _console_examples("lit-dp plan")
    assert examples, "README has no `$ lit-dp plan` example"
    for argv, printed in examples:
        main(argv)
        assert capsys.readouterr().out == printed, f"README example of {shlex.join(argv)}"


def test_readme_names_only_existing_commands():
    used = set(re.findall(r"\blit-dp ([a-z]+)\b", README))
    assert used <= set(COMMANDS), used - set(COMMANDS)
