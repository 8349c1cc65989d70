"""``kiln report [BUILD]``: the build's recipe x target table (accuracy, speed, size, gates) in the terminal.

It reads ``KILN_HOME/reports/<build>/results.json`` (written by the build's report step) or a
``results.json`` path, so the terminal shows exactly the rows of the Prefect markdown artifact.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kiln.commands._common import cli_errors, console, err_console, print_table
from kiln.errors import KilnInputError


def report(
    build: str = typer.Argument(None, help="Build name (default: the latest build) or a results.json path"),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of a table"),
    as_markdown: bool = typer.Option(
        False, "--markdown", help="Print the markdown report (the Prefect artifact) instead of a table"
    ),
    write_plots: Path = typer.Option(None, "--plots", help="Also (re)draw the PNG plots into this folder"),
) -> None:
    """Show a build's table: accuracy vs baseline, speed, size, gate verdict and the recommended recipe."""
    from kiln.validation.report import (
        failure_lines,
        latest_build,
        load_results,
        markdown,
        rich_table,
        write_report,
    )

    with cli_errors():
        if as_json and as_markdown:
            raise KilnInputError("--json and --markdown are exclusive: pass one of them")
        name = build or latest_build()
        if name is None:
            raise KilnInputError(
                "no build results yet under KILN_HOME/reports: run `kiln build PROFILE` first, "
                "or pass a results.json path"
            )
        results = load_results(name)
        if write_plots is not None:
            written = write_report(results, write_plots)
            for path in written.plots:  # messages on stderr: stdout carries only the table / JSON / markdown
                err_console.print(f"wrote {path}", highlight=False)
        if as_json:
            console.print_json(results.to_json())
        elif as_markdown:
            console.print(markdown(results), markup=False, highlight=False, soft_wrap=True)
        else:
            print_table(rich_table(results))
            failures = failure_lines(results)
            if failures:
                console.print("[bold red]gate failures (not registered):[/]")
            for line in failures:
                console.print(f"  {line}", markup=False, highlight=False)
