"""The commands README.md tells a newcomer to type parse as kiln's CLI defines them (no work is done)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

from kiln.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _kiln_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if re.match(r"^(\.venv/bin/)?kiln ", line)]


def test_every_kiln_command_in_the_readme_parses() -> None:
    lines = _kiln_lines()
    assert any(" emit " in f" {line} " for line in lines)  # the one that used to lack its EVENT argument
    root = typer.main.get_command(app)
    for line in lines:
        args = shlex.split(line.split("&&")[0])[1:]
        command = root
        while hasattr(command, "get_command"):  # a group: descend to the subcommand the line names
            name = args.pop(0)
            command = command.get_command(command.make_context(command.name, [name]), name)
            assert command is not None, f"README: `{line}`: no command {name!r}"
        command.make_context(command.name, list(args))  # raises on a missing or unknown argument
