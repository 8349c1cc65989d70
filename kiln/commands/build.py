"""``kiln build`` and ``kiln profiles check``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kiln.cli import app, profiles_app
from kiln.commands._common import cli_errors, console
from kiln.profiles import load_request


@profiles_app.command("check")
def profiles_check(files: list[Path] = typer.Argument(..., help="Build request YAML files")) -> None:
    """Validate build requests (fields, names, recipe x target combinations); do no work."""
    with cli_errors():
        for path in files:
            request = load_request(path)
            from kiln.preflight import check_request_static

            check_request_static(request, source=str(path))
            table = Table(title=f"{path}: ok")
            table.add_column("recipe")
            table.add_column("target")
            for recipe in request.recipes:
                for target in request.targets:
                    table.add_row(f"{recipe.name} ({recipe.quantization})", f"{target.name} ({target.backend}/{target.sm or target.device})")
            console.print(table)
