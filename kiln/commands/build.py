"""``kiln build`` and ``kiln profiles check``."""

from __future__ import annotations

import os
import time
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


_MARKS = {"done": "[green]✓[/]", "reused": "[cyan]↺[/]", "skipped": "[yellow]-[/]", "failed": "[red]✗[/]"}


@app.command("build")
def build_command(
    profile: Path = typer.Argument(..., help="build request YAML (e.g. profiles/examples/tiny-cpu.yaml)"),
    dispatch: str = typer.Option("auto", help="auto | inline | deployments: where per-target subflows run"),
) -> None:
    """Build a request through the Prefect DAG (embedded ephemeral server unless PREFECT_API_URL is set)."""
    with cli_errors():
        from kiln.preflight import check_request_static

        check_request_static(load_request(profile), source=str(profile))  # bad input: exit 2 before Prefect starts
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the step lines below are the progress
        import kiln.flows  # noqa: F401  (PREFECT_HOME under KILN_HOME before prefect is imported)
        from kiln.flows.build import build
        from kiln.tasks import progress

        started = time.perf_counter()
        with console.status("starting Prefect (embedded server)...") as status, progress.listening(_printer(status)):
            outcomes = build(profile=str(profile), dispatch=dispatch)
        _print_summary(outcomes, time.perf_counter() - started)


def _printer(status):
    def show(event) -> None:
        label = f"{event.step} [bold]{event.detail}[/]" if event.detail else event.step
        if event.status == "running":
            status.update(f"{label} ...")
            return
        note = f" ({event.note})" if event.note else ""
        reused = " reused" if event.status == "reused" else ""
        console.print(f"{_MARKS.get(event.status, '?')} {label}{reused}{note} [dim]{event.seconds:.1f}s[/]",
                      highlight=False)
    return show


def _print_summary(outcomes, seconds: float) -> None:
    table = Table(title=f"kiln build: {len(outcomes)} engine(s) in {seconds:.0f}s")
    for column in ("recipe", "target", "ppl", "verdict", "model version", "artifact URI"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        ppl = o.metrics.get("perplexity")
        version = f"{o.model_name} v{o.version}" + (" (reused)" if o.reused else "") if o.version else "-"
        table.add_row(o.recipe + (" ★" if o.recommended else ""), o.target, "-" if ppl is None else f"{ppl:.2f}",
                      o.verdict, version, o.uri or "-")
    console.print(table)
    registered = [o for o in outcomes if o.version]
    if registered and all(o.reused for o in registered):
        console.print("identical inputs: reused every registered version, no new model version created")
