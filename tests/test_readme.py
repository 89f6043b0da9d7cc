"""The README matches the code: its commands exist, its flags parse, CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loraport.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _subcommands() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {
        name: {opt for action in p._actions for opt in action.option_strings}
        for name, p in sub.choices.items()  # type: ignore[union-attr]
    }


def test_first_lines_give_the_demo_and_test_commands() -> None:
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("loraport demo")
    assert commands[1].endswith("&& pytest")
    assert commands[1] in (ROOT / ".ci" / "run").read_text(), ".ci/run must run the README's test command"


def test_every_command_and_flag_in_the_readme_exists() -> None:
    commands = _subcommands()
    used = re.findall(r"loraport (\w+)((?:[ \t]+(?:--?[\w-]+|[^\s`|\\]+))*)", README)
    assert used
    for name, rest in used:
        if name not in commands:
            continue  # prose such as "loraport is ..."
        for flag in re.findall(r"(--[\w-]+)", rest):
            assert flag in commands[name], f"README uses loraport {name} {flag}"
    known = set().union(*commands.values())
    for flag in re.findall(r"^\| `(--[\w-]+)", README, flags=re.MULTILINE):
        assert flag in known, f"README's option tables list {flag}, which no command takes"
    for name in ("transfer", "inspect", "eval", "fuse", "demo"):
        assert name in commands


@pytest.mark.parametrize("name", ["transfer", "load_adapter", "save_adapter", "inspect_adapter", "LoraportError"])
def test_public_api_names_exist(name: str) -> None:
    import loraport

    assert hasattr(loraport, name)
