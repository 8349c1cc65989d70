"""kiln on a real Prefect server: `prefect deploy --all` from prefect.yaml, event-triggered builds, per-pool
fan-out.

One session's server (tests/fixtures/prefect.py), process workers for ``kiln-control`` (the parent
build) and two target pools, ``kiln-cpu`` and ``kiln-h100`` (that worker runs on this CPU machine and
its target is a cpu target), a local
hub serving a tiny Llama, and the embedded MLflow (SQLite) under a KILN_HOME shared by the workers.
One event-triggered build of a two-target request serves the tests below (~2 min in all).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.fixtures.hub import model_repo_files
from tests.fixtures.prefect import REPO_ROOT, PrefectServer, wait_until

pytestmark = pytest.mark.servers

REPO = "kiln-test/tiny-llama"
BUILD_TIMEOUT_S = 300
KILN = str(Path(sys.executable).with_name("kiln"))


@pytest.fixture(scope="module")
def deployed(prefect_server: PrefectServer, tmp_path_factory, _local_hub_server, tiny_hub_model_dir) -> dict:
    """kiln's work pools and deployments on the server, a worker per pool, a hub repo and a two-target
    profile."""
    home = tmp_path_factory.mktemp("kiln-home-server")
    _local_hub_server.create_repo(REPO, model_repo_files(tiny_hub_model_dir, tiny_hub_model_dir))
    profile = home / "two-pools.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "name": "fanout",
                "model": {"repo_id": REPO, "revision": "main"},
                "recipes": [{"name": "none", "quantization": "none"}],
                "targets": [
                    {
                        "name": "cpu-a",
                        "backend": "torch",
                        "device": "cpu",
                        "dtype": "float32",
                        "work_pool": "kiln-cpu",
                        "limits": {
                            "max_batch_size": 2,
                            "max_input_len": 64,
                            "max_seq_len": 128,
                            "max_num_tokens": 256,
                        },
                    },
                    {
                        "name": "cpu-b",
                        "backend": "torch",
                        "device": "cpu",
                        "dtype": "float32",
                        "work_pool": "kiln-h100",
                        "limits": {
                            "max_batch_size": 2,
                            "max_input_len": 64,
                            "max_seq_len": 128,
                            "max_num_tokens": 256,
                        },
                    },
                ],
                "evaluation": {"heldout_tokens": 128, "prompts": 2, "max_new_tokens": 4, "concurrency": [1]},
                "registry": {"model_name": f"fanout-{uuid.uuid4().hex[:6]}"},
            }
        )
    )
    worker_env = {
        "KILN_HOME": str(home),
        "HF_ENDPOINT": _local_hub_server.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "MLFLOW_TRACKING_URI", "KILN_STORE_URI"):
        prefect_server.env.pop(name, None)
    prefect_server.env.update(worker_env)
    subprocess.run(
        [KILN, "pools", "create"],
        env=prefect_server.env,
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    prefect_server.cli("deploy", "--all")
    for pool in ("kiln-control", "kiln-cpu", "kiln-h100"):
        prefect_server.start_worker(pool)
    return {
        "home": home,
        "profile": profile,
        "model_name": yaml.safe_load(profile.read_text())["registry"]["model_name"],
    }


def test_prefect_deploy_all_creates_the_four_deployments_and_a_target_deployment_per_pool(
    prefect_server, deployed
):
    listing = prefect_server.cli("deployment", "ls").stdout
    for name in (
        "kiln-build/build",
        "kiln-promote/promote",
        "kiln-rollback/rollback",
        "kiln-revalidate/revalidate",
        "kiln-watch/watch",
        "kiln-target/kiln-cpu",
        "kiln-target/kiln-h100",
        "kiln-target/kiln-h200",
        "kiln-target/kiln-h100-trtllm",
    ):
        assert name in listing, listing


async def _pools_and_schedules() -> tuple[dict, dict]:
    from prefect import get_client

    async with get_client() as client:
        pools = {p.name: p for p in await client.read_work_pools()}
        schedules = {}
        for name in ("kiln-revalidate/revalidate", "kiln-watch/watch"):
            dep = await client.read_deployment_by_name(name)
            schedules[name] = [s.schedule.cron for s in dep.schedules if s.active]
        return pools, schedules


def test_pools_per_gpu_class_limit_targets_to_one_run_and_cron_deployments_are_scheduled(
    prefect_server, deployed
):
    pools, schedules = _run(_pools_and_schedules(), prefect_server.env)
    assert pools["kiln-cpu"].concurrency_limit == 1 and pools["kiln-h100"].concurrency_limit == 1
    assert pools["kiln-control"].concurrency_limit is None  # parents wait on targets: a limit could deadlock
    assert pools["kiln-h100-trtllm"].type == "docker"
    assert pools["kiln-h100-trtllm"].base_job_template["variables"]["properties"]["image"]["default"]
    assert all(schedules.values()), schedules


async def _deployment_runs(deployment: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

    async with get_client() as client:
        dep = await client.read_deployment_by_name(deployment)
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(),
        )


def _run(coro, env: dict[str, str]):
    """Run a Prefect client coroutine against the test server (this process may have imported Prefect
    already)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(coro)


@pytest.fixture(scope="module")
def event_build(prefect_server: PrefectServer, deployed: dict, _local_hub_server) -> dict:
    """Move the hub branch, emit `kiln.model.revision-changed` with `kiln emit`, wait for the triggered
    build."""
    sha = _local_hub_server.push(REPO, {"README.md": b"# retrained\n"})
    subprocess.run(
        [
            KILN,
            "emit",
            "revision-changed",
            "--repo-id",
            REPO,
            "--revision",
            sha,
            "--profile",
            str(deployed["profile"]),
        ],
        env=prefect_server.env,
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )

    def finished():
        runs = _run(_deployment_runs("kiln-build/build"), prefect_server.env)
        return next((r for r in runs if r.state and r.state.is_final()), None)

    run = wait_until(finished, BUILD_TIMEOUT_S, "the event-triggered kiln-build flow run", interval_s=3)
    return {"run": run, "sha": sha}


def _worker_logs(server: PrefectServer) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in server.logs.glob("worker-*.log"))


def test_revision_changed_event_runs_the_build_deployment_and_registers_a_version(
    prefect_server, deployed, event_build
):
    run = event_build["run"]
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{_worker_logs(prefect_server)}"
    assert run.parameters["revision"] == event_build["sha"] and run.parameters["repo_id"] == REPO
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{deployed['home'] / 'mlflow.db'}")
    for target in ("cpu-a", "cpu-b"):
        versions = client.search_model_versions(f"name = '{deployed['model_name']}.{target}'")
        assert len(versions) == 1, f"{target}: {versions}"
        run_data = client.get_run(versions[0].run_id).data
        assert run_data.metrics["perplexity"] > 1
        assert json.dumps(run_data.tags).find(event_build["sha"]) >= 0  # lineage names the event's commit


def test_each_target_ran_as_its_own_flow_run_on_its_work_pool(prefect_server, deployed, event_build):
    parent = event_build["run"]
    by_pool = {}
    for pool in ("kiln-cpu", "kiln-h100"):
        runs = _run(_deployment_runs(f"kiln-target/{pool}"), prefect_server.env)
        children = [r for r in runs if r.parent_task_run_id is not None]
        assert children, f"no kiln-target run on {pool}"
        by_pool[pool] = children[-1]
    for pool, child in by_pool.items():
        assert child.work_pool_name == pool and child.state.is_completed()
    assert {c.parameters["target"] for c in by_pool.values()} == {"cpu-a", "cpu-b"}
    assert parent.state.is_completed()
