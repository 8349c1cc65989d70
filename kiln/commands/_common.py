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
    """A table that never cuts a cell: at full width when stdout is not a terminal (piped output is not cut
    to 80 columns); in a terminal too narrow for it, one block of ``column: value`` lines per row, so
    words are neither truncated to "…" nor broken mid-word."""
    from rich.table import Table

    natural = console.measure(table, options=console.options.update_width(100_000)).maximum
    if console.is_terminal:
        if natural <= console.width:
            console.print(table)
            return
        cells = [list(column.cells) for column in table.columns]
        for index in range(table.row_count):
            block = Table(
                show_header=False, box=None, pad_edge=False, title=table.title if index == 0 else None
            )
            block.add_column(style="bold", no_wrap=True)
            block.add_column(overflow="fold")
            for column, values in zip(table.columns, cells, strict=True):
                block.add_row(str(column.header), values[index])
            console.print(block)
            console.print()
        return
    # a console of its own at the table's width (Console.print caps a width argument at the console's own,
    # and setting the shared console's width would pin it for every later command in the process)
    Console(file=console.file, width=max(console.width, natural), no_color=console.no_color).print(
        table, crop=False
    )


def jsonl_rows(
    path: Path, error: type[Exception], missing: str = "no such file"
) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` for each non-blank line of ``path``; ``error`` names the file and
    line."""
    if not path.is_file():
        raise error(f"{path}: {missing}")
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number}: not JSON: {exc}") from None
