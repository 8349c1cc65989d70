"""Shared CLI plumbing: the rich console and turning kiln errors into exit codes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
