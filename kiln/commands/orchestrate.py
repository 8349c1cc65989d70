"""``kiln emit`` (send a build-triggering event) and ``kiln pools create`` (the work pools prefect.yaml
uses)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer
import yaml

from kiln.commands._common import cli_errors, console
from kiln.errors import KilnInputError

pools_app = typer.Typer(
    help="Prefect work pools for kiln's deployments (one per GPU class).", no_args_is_help=True
)


def emit_command(
    event: str = typer.Argument(..., help="revision-changed | retraining-completed (or the full event name)"),
    repo_id: str = typer.Option(
        ..., "--repo-id", help="the model repo, e.g. HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
    revision: str = typer.Option(..., "--revision", help="the new commit sha (or branch/tag)"),
    profile: str | None = typer.Option(
        None, "--profile", help="build request to run (default: the deployment's)"
    ),
) -> None:
    """Send a kiln model event to the Prefect server at PREFECT_API_URL (starts the `build` deployment)."""
    with cli_errors():
        from kiln.events import emit

        event_id = emit(event, repo_id, revision, profile)
        console.print(f"sent {event} for {repo_id}@{revision} (event {event_id})")


TARGET_ENTRYPOINT = "kiln.flows.target:build_target"
DOCKER_TEMPLATE = Path("deploy/trtllm-work-pool.json")
"""Base job template of the docker pools (TensorRT-LLM targets run in NVIDIA's image; deploy/README.md)."""


@dataclass(frozen=True)
class PoolSpec:
    name: str
    targets: bool  # runs per-target (GPU) flow runs: limited to one run per GPU
    docker: bool  # its deployments name a container image: a docker pool on deploy/trtllm-work-pool.json


def _pools_in(prefect_yaml: Path) -> list[PoolSpec]:
    """The work pools prefect.yaml's deployments use, and what kind each must be."""
    if not prefect_yaml.is_file():
        raise KilnInputError(
            f"{prefect_yaml}: no such file; run from the kiln checkout or pass --prefect-yaml"
        )
    data = yaml.safe_load(prefect_yaml.read_text()) or {}
    pools: dict[str, PoolSpec] = {}
    for deployment in data.get("deployments") or []:
        pool = deployment.get("work_pool") or {}
        if not (name := pool.get("name")):
            continue
        seen = pools.get(name, PoolSpec(name, False, False))
        pools[name] = PoolSpec(
            name,
            seen.targets or deployment.get("entrypoint") == TARGET_ENTRYPOINT,
            seen.docker or bool((pool.get("job_variables") or {}).get("image")),
        )
    return sorted(pools.values(), key=lambda p: p.name)


@pools_app.command("create")
def pools_create(
    prefect_yaml: Path = typer.Option(
        Path("prefect.yaml"), "--prefect-yaml", help="deployments file to read pools from"
    ),
    limit: int = typer.Option(
        1, "--limit", min=1, help="concurrent flow runs per target pool (= GPUs in it)"
    ),
) -> None:
    """Create (or update) every work pool in prefect.yaml: process pools, docker ones for container targets;
    target pools run at most `--limit` flow runs at a time (one per GPU)."""
    with cli_errors():
        import asyncio

        pools = _pools_in(prefect_yaml)
        template = None
        if any(p.docker for p in pools):
            path = prefect_yaml.parent / DOCKER_TEMPLATE
            if not path.is_file():
                raise KilnInputError(
                    f"{path}: missing; prefect.yaml has docker (image) deployments whose pools use it"
                )
            template = json.loads(path.read_text())
        asyncio.run(_create_pools(pools, limit, template))
        for pool in pools:
            kind = "docker" if pool.docker else "process"
            console.print(
                f"{pool.name} ({kind}): "
                f"{f'{limit} run(s) at a time' if pool.targets else 'no limit (parent flows)'}"
            )


async def _create_pools(pools: list[PoolSpec], limit: int, docker_template: dict | None) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    process_template = ProcessWorker.get_default_base_job_template()
    async with get_client() as client:
        for pool in pools:
            pool_limit = limit if pool.targets else None
            kind, template = ("docker", docker_template) if pool.docker else ("process", process_template)
            try:
                await client.create_work_pool(
                    WorkPoolCreate(
                        name=pool.name, type=kind, base_job_template=template, concurrency_limit=pool_limit
                    )
                )
            except ObjectAlreadyExists:
                await client.update_work_pool(
                    pool.name, WorkPoolUpdate(concurrency_limit=pool_limit, base_job_template=template)
                )
