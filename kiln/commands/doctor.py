"""``kiln doctor``: what this machine can build and run, and why a target can or cannot run here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import ValidationError
from rich.table import Table

from kiln.commands._common import cli_errors, console
from kiln.errors import ProfileError

_LEVEL = {"error": "[red]✗ error[/]", "warning": "[yellow]! warning[/]", "ok": "[green]✓ ok[/]"}


def _entry(kind: str, value: str) -> dict[str, Any]:
    """A target/recipe mapping from a YAML file path or a name in the profiles library."""
    from kiln.profiles import library_entry

    path = Path(value)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ProfileError(f"{path}: no such {kind} file")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ProfileError(f"{path}: expected one {kind} mapping")
        return data
    return library_entry(kind, value)


def _recipe(value: str) -> Any:
    from kiln.profiles import Recipe

    try:
        return Recipe.model_validate(_entry("recipe", value))
    except ValidationError as exc:
        raise ProfileError(f"recipe {value!r}: {exc}") from None


def doctor_command(
    target: str | None = typer.Option(
        None, "--target", "-t", help="target name (profiles/targets.yaml) or target YAML file to check here"
    ),
    recipe: list[str] = typer.Option(
        [], "--recipe", "-r", help="recipe name or YAML file to check on the target"
    ),
    model: Path | None = typer.Option(
        None, "--model", help="local HF model dir: adds tp/pp and GPU memory checks"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Show this machine's toolchain and GPUs; with --target, run that target's pre-flight checks here.

    Exits 1 when a check fails (the target cannot run on this machine), 2 on a bad argument.
    """
    with cli_errors():
        from kiln import doctor, preflight
        from kiln.profiles import load_target

        if recipe and not target:
            raise ProfileError("--recipe needs --target: recipes are checked on a target")
        host = doctor.collect()
        findings: list[preflight.Finding] = []
        if target:
            tgt = load_target(_entry("target", target))
            recipes = [_recipe(r) for r in recipe]
            info = None
            if model is not None:
                from kiln.hub import inspect_model

                info = inspect_model(model)
            findings = preflight.check_target_on_host(tgt, host, recipes=recipes, model_info=info)
        families = doctor.family_rows()
        if as_json:
            console.print_json(
                json.dumps(
                    {
                        "host": host.to_dict(),
                        "families": families,
                        "findings": [f.__dict__ for f in findings],
                    },
                    default=str,
                )
            )
        else:
            _print_host(host)
            _print_families(families)
            if target:
                _print_findings(target, findings)
        if any(f.level == "error" for f in findings):
            raise typer.Exit(1)


def _print_host(host: Any) -> None:
    table = Table(title=f"kiln doctor: Python {host.python}, {host.platform}")
    for column in ("component", "version", "detail"):
        table.add_column(column, overflow="fold")
    for c in host.components:
        table.add_row(c.name, c.version or "[red]missing[/]", c.detail)
    for gpu in host.gpus:
        table.add_row(f"GPU {gpu.index}", gpu.sm_name, f"{gpu.name}, {gpu.memory_gib:g} GiB")
    table.add_row("CUDA / driver", host.cuda_runtime or "-", host.driver or "no nvidia-smi")
    console.print(table)
    for note in host.notes:
        console.print(f"note: {note}", highlight=False)


def _print_families(rows: list[dict[str, str]]) -> None:
    from kiln.doctor import FAMILY_COLUMNS as columns

    table = Table(title="model families kiln builds (kiln.families)")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    console.print(table)
    for row in rows:
        if row["refused"]:
            console.print(f"{row['family']} refuses {row['refused']}", highlight=False)


def _print_findings(target: str, findings: list[Any]) -> None:
    table = Table(title=f"pre-flight for target {target} on this machine")
    for column in ("result", "check", "subject", "message"):
        table.add_column(column, overflow="fold")
    for f in findings:
        table.add_row(_LEVEL[f.level], f.check, f.subject, f.message)
    console.print(table)
    errors = sum(f.level == "error" for f in findings)
    console.print(
        f"{errors} problem(s): this target cannot run here" if errors else "this target can run here",
        highlight=False,
    )
