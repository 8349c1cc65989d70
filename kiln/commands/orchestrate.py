"""``kiln emit`` (send a build-triggering event) and ``kiln pools create`` (the work pools prefect.yaml uses)."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from kiln.cli import app
from kiln.commands._common import cli_errors, console
from kiln.errors import KilnInputError

pools_app = typer.Typer(help="Prefect work pools for kiln's deployments (one per GPU class).", no_args_is_help=True)
app.add_typer(pools_app, name="pools")


@app.command("emit")
def emit_command(
    event: str = typer.Argument(..., help="revision-changed | retraining-completed (or the full event name)"),
    repo_id: str = typer.Option(..., "--repo-id", help="the model repo, e.g. HuggingFaceTB/SmolLM2-135M-Instruct"),
    revision: str = typer.Option(..., "--revision", help="the new commit sha (or branch/tag)"),
    profile: str | None = typer.Option(None, "--profile", help="build request to run (default: the deployment's)"),
) -> None:
    """Send a kiln model event to the Prefect server at PREFECT_API_URL (starts the `build` deployment)."""
    with cli_errors():
        from kiln.events import emit

        event_id = emit(event, repo_id, revision, profile)
        console.print(f"sent {event} for {repo_id}@{revision} (event {event_id})")


TARGET_ENTRYPOINT = "kiln.flows.target:build_target"


def _pools_in(prefect_yaml: Path) -> dict[str, bool]:
    """Work pools named in prefect.yaml -> whether they run per-target (GPU) flow runs."""
    if not prefect_yaml.is_file():
        raise KilnInputError(f"{prefect_yaml}: no such file; run from the kiln checkout or pass --prefect-yaml")
    data = yaml.safe_load(prefect_yaml.read_text()) or {}
    pools: dict[str, bool] = {}
    for deployment in data.get("deployments") or []:
        name = (deployment.get("work_pool") or {}).get("name")
        if name:
            pools[name] = pools.get(name, False) or deployment.get("entrypoint") == TARGET_ENTRYPOINT
    return pools


@pools_app.command("create")
def pools_create(
    prefect_yaml: Path = typer.Option(Path("prefect.yaml"), "--prefect-yaml", help="deployments file to read pools from"),
    limit: int = typer.Option(1, "--limit", min=1, help="concurrent flow runs per target pool (= GPUs in it)"),
) -> None:
    """Create (or update) every work pool in prefect.yaml: process type; target pools limited to `--limit` runs."""
    with cli_errors():
        import asyncio

        pools = _pools_in(prefect_yaml)
        limits = {name: limit if is_target else None for name, is_target in sorted(pools.items())}
        asyncio.run(_create_pools(limits))
        for name, pool_limit in limits.items():
            console.print(f"{name}: {'no limit (parent flows)' if pool_limit is None else f'{pool_limit} run(s) at a time'}")


async def _create_pools(limits: dict[str, int | None]) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    async with get_client() as client:
        for name, limit in limits.items():
            try:
                await client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template,
                                                             concurrency_limit=limit))
            except ObjectAlreadyExists:
                await client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))
