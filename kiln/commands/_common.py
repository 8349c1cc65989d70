"""Shared CLI plumbing: the rich console and turning kiln errors into exit codes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from kiln.errors import KilnError

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Print a KilnError as one red message and exit with its code (2 for bad input)."""
    try:
        yield
    except KilnError as exc:
        from rich.markup import escape

        from kiln.redact import redact

        err_console.print(f"[bold red]error:[/] {escape(redact(str(exc)))}", highlight=False)
        raise typer.Exit(exc.exit_code) from None


def print_table(table: Any) -> None:
    """A table at full width when stdout is not a terminal (piped output is never cut to 80 columns); in a
    terminal its cells wrap (``overflow="fold"``) instead of ending in "…"."""
    for column in table.columns:
        column.overflow = "fold"
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update_width(100_000)).maximum
    width = console.width
    console.width = max(width, natural)  # Console.print caps a width argument at the console's own
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def jsonl_rows(path: Path, error: type[Exception], missing: str = "no such file") -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` for each non-blank line of ``path``; ``error`` names the file and line."""
    if not path.is_file():
        raise error(f"{path}: {missing}")
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number}: not JSON: {exc}") from None
