"""Every command line the README shows parses as written: the README cannot drift from the CLIs.

Each line of the README's usage and training blocks runs as shown, with ``--help`` added (so a
server does not start and placeholders are not opened): the command path must exist and every
option shown must be one the command takes.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mriqa_node.cli import main as mriqa
from training.cli import main as mriqa_train

README = Path(__file__).resolve().parents[1] / "README.md"
PROGRAMS = {"mriqa": mriqa, "mriqa-train": mriqa_train}


def command_lines() -> list[str]:
    """The mriqa / mriqa-train commands of the README's shell blocks (comments dropped, one
    command per ``&&`` part, optional ``[...]`` brackets opened)."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in line.split("&&"):
                part = part.strip().replace("[", "").replace("]", "")
                if part.split(" ", 1)[0] in PROGRAMS:
                    lines.append(part)
    return lines


def _options(cmd: click.Command) -> list[str]:
    return [o for p in cmd.params for o in [*p.opts, *getattr(p, "secondary_opts", [])]]


def _resolve(tokens: list[str]) -> tuple[click.Command, list[str]]:
    """The command a token list names, and the options offered along its path."""
    cmd: click.Command = PROGRAMS[tokens[0]]
    offered = _options(cmd)
    for token in tokens[1:]:
        if not isinstance(cmd, click.Group) or token.startswith("-"):
            break
        if token in cmd.commands:
            cmd = cmd.commands[token]
            offered += _options(cmd)
    return cmd, offered


def test_the_readme_shows_commands() -> None:
    lines = command_lines()
    assert any(line.startswith("mriqa serve --config ") for line in lines)
    assert sum(line.startswith("mriqa-train ") for line in lines) >= 8


@pytest.mark.parametrize("line", command_lines())
def test_every_readme_command_line_parses_as_written(line: str) -> None:
    tokens = shlex.split(line)
    cmd, offered = _resolve(tokens)
    assert not isinstance(cmd, click.Group), f"{line!r} names a group, not a command"
    shown = [t.split("=", 1)[0] for t in tokens if t.startswith("--")]
    unknown = [o for o in shown if o not in offered]
    assert not unknown, f"{line!r}: {cmd.name} takes no {', '.join(unknown)}"
    result = CliRunner().invoke(PROGRAMS[tokens[0]], [*tokens[1:], "--help"])
    assert result.exit_code == 0, f"{line!r}: {result.output}{result.exception!r}"
    assert "Usage:" in result.output
