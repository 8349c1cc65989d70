"""``kiln versions | promote | rollback | fetch``: the registry's serving-side commands.

NAME is the model name of the profile's ``registry.model_name`` and ``--target`` the target name; the
registered model they address is ``NAME.TARGET`` (one per model x target, see kiln.registry.naming).
Without ``--target``, NAME is taken as the full registered-model name.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from kiln.commands._common import cli_errors, console, err_console, print_table

_KEY_METRICS = (
    "perplexity",
    "ppl_increase_pct",
    "top1_agreement",
    "kl_divergence",
    "tokens_per_s",
    "ttft_p90_ms",
)
_TARGET = typer.Option(None, "--target", "-t", help="Target name (the registered model is NAME.TARGET)")
_TRACKING = typer.Option(
    None,
    "--tracking-uri",
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the SQLite DB under $KILN_HOME)",
)


def _key_metrics(metrics: dict[str, float]) -> str:
    keys = [k for k in _KEY_METRICS if k in metrics] or sorted(metrics)[:3]
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys[:4])


def versions(
    name: str = typer.Argument(..., help="Model name (registry.model_name)"),
    target: str = _TARGET,
    tracking_uri: str = _TRACKING,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
) -> None:
    """List a model's versions on every target (or one) with aliases, gates and key metrics."""
    from kiln.registry import alias_warnings, list_versions

    with cli_errors():
        infos = list_versions(name, target, tracking_uri=tracking_uri)
        for line in alias_warnings(name, target, tracking_uri=tracking_uri):
            err_console.print(f"[bold yellow]warning:[/] {line}", highlight=False)
        if as_json:
            console.print_json(
                json.dumps([{k: v for k, v in asdict(i).items() if k != "tags"} for i in infos])
            )
            return
        table = Table(title=f"{name}: {len(infos)} version(s)")
        for column in (
            "registered model",
            "version",
            "recipe",
            "aliases",
            "gates",
            "state",
            "key metrics",
            "created",
            "uri",
        ):
            table.add_column(column, overflow="fold")
        for info in infos:
            gates = "[green]passed[/]" if info.passed_gates else "[red]failed[/]"
            table.add_row(
                info.name,
                info.version,
                info.recipe or "",
                ", ".join(info.aliases),
                gates,
                info.state,
                _key_metrics(info.metrics),
                info.created_at,
                info.uri,
            )
        print_table(table)


def promote(
    name: str = typer.Argument(..., help="Model name"),
    version: str = typer.Argument(..., help="Version number (3 or v3) or an alias (candidate)"),
    target: str = _TARGET,
    reason: str = typer.Option(None, "--reason", help="Why (recorded with the move)"),
    tracking_uri: str = _TRACKING,
) -> None:
    """Point `production` at a version that passed its gates; the move is recorded (who/when/why)."""
    from kiln.registry import promote as promote_version

    with cli_errors():
        info = promote_version(name, version, target, reason=reason, tracking_uri=tracking_uri)
        console.print(f"[bold]{info.name}[/] production -> v{info.version} ({info.recipe}) {info.uri}")


def rollback(
    name: str = typer.Argument(..., help="Model name"),
    target: str = _TARGET,
    reason: str = typer.Option(None, "--reason", help="Why (recorded with the move)"),
    tracking_uri: str = _TRACKING,
) -> None:
    """Move `production` back to the version it held before the current one."""
    from kiln.registry import rollback as rollback_version

    with cli_errors():
        info = rollback_version(name, target, reason=reason, tracking_uri=tracking_uri)
        console.print(f"[bold]{info.name}[/] production rolled back -> v{info.version} ({info.recipe})")


def fetch(
    ref: str = typer.Argument(..., metavar="NAME@ALIAS", help="e.g. smollm2@production or smollm2@v3"),
    target: str = _TARGET,
    output: Path = typer.Option(..., "--output", "-o", help="New or empty dir"),
    force: bool = typer.Option(
        False,
        "--force",
        help="Download even if this machine's GPU SM / toolchain "
        "does not match the engine (it will not load here)",
    ),
    tracking_uri: str = _TRACKING,
) -> None:
    """Download an engine, verify every file's sha256, refuse one this machine's GPU cannot run."""
    from kiln.registry import ForcedFetchWarning, TransferEvent, UnrecordedAliasWarning
    from kiln.registry import fetch as fetch_version

    with cli_errors(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ForcedFetchWarning)
        warnings.simplefilter("always", UnrecordedAliasWarning)
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=err_console, transient=True) as progress:
            task = progress.add_task("fetch", total=None)

            def advance(event: TransferEvent) -> None:
                progress.update(
                    task,
                    total=event.bytes_total,
                    completed=event.bytes_done,
                    description=f"{event.files_done}/{event.files_total} {event.path}",
                )

            path = fetch_version(
                ref, target, output, force=force, tracking_uri=tracking_uri, on_progress=advance
            )
        for warning in caught:
            if issubclass(warning.category, ForcedFetchWarning | UnrecordedAliasWarning):
                err_console.print(f"[bold red]WARNING:[/] {warning.message}", highlight=False)
        console.print(f"fetched [bold]{ref}[/] into {path} (every file verified)")
