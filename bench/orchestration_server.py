"""Server-mode overhead per target flow run (run by hand, from the repository root).

    .venv/bin/python bench/orchestration_server.py [--query-seconds 2]

Starts a real ``prefect server`` on 127.0.0.1 (temporary PREFECT_HOME), ``kiln pools create``, ``prefect
deploy --all``, process workers for ``kiln-control``, ``kiln-cpu`` and ``kiln-h100``, then runs the
``build`` deployment on a two-target request (a tiny random Llama with SmolLM2's tokenizer, one target
per pool) three times in one KILN_HOME:

1. ``deployments`` cold: every target is its own flow run on its pool (``run_deployment``);
2. ``deployments`` no-op: the same again, every step reused, so a target run is almost pure overhead;
3. ``inline`` no-op: the same request with ``dispatch=inline`` (targets as in-process subflows).

Per target flow run it reads from the Prefect API: queue latency (created -> started: worker poll and
process start), the run's wall, the sum of its task runs, and created -> end (what the parent's
``run_deployment`` waits for). Overhead = created -> end - task time. Writes
``bench/results/orchestration_server.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.hub import TOKENIZER_FILES  # noqa: E402
from tests.fixtures.models import make_tiny_llama  # noqa: E402
from tests.fixtures.prefect import PrefectServer, start_server  # noqa: E402

KILN = str(Path(sys.executable).with_name("kiln"))
POOLS = ("kiln-control", "kiln-cpu", "kiln-h100")
LIMITS = {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 128, "max_num_tokens": 256}


def write_request(home: Path, assets: Path) -> Path:
    model = make_tiny_llama(home / "tiny-llama", vocab=49152, hidden=32, tie=True)
    for name in TOKENIZER_FILES:
        if (assets / name).is_file():
            (model / name).write_bytes((assets / name).read_bytes())
    profile = home / "bench-two-pools.yaml"
    target = {"backend": "torch", "device": "cpu", "dtype": "float32", "limits": LIMITS}
    profile.write_text(
        yaml.safe_dump(
            {
                "name": "bench-fanout",
                "model": {"local_dir": str(model)},
                "recipes": [{"name": "none", "quantization": "none"}],
                "targets": [
                    {"name": "cpu-a", "work_pool": "kiln-cpu", **target},
                    {"name": "cpu-b", "work_pool": "kiln-h100", **target},
                ],
                "evaluation": {"heldout_tokens": 128, "prompts": 2, "max_new_tokens": 4, "concurrency": [1]},
                "registry": {"model_name": "bench-fanout"},
            }
        )
    )
    return profile


def _seconds(start, end) -> float | None:
    return round((end - start).total_seconds(), 2) if start and end else None


async def _measure(parent_id) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentTaskRunId,
    )

    async with get_client() as client:
        parent = await client.read_flow_run(parent_id)
        parent_tasks = {
            t.id
            for t in await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent_id]))
            )
        }
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(any_=list(parent_tasks))
            )
        )
        rows = []
        for child in sorted(children, key=lambda c: c.parameters.get("target", "")):
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child.id]))
            )
            task_s = sum(_seconds(t.start_time, t.end_time) or 0.0 for t in tasks)
            # created -> ended is what the parent waits for (run_deployment creates the run, then polls it)
            waited = _seconds(child.created, child.end_time)
            rows.append(
                {
                    "target": child.parameters.get("target"),
                    "work_pool": child.work_pool_name,
                    "state": child.state_name,
                    "queue_s": _seconds(child.created, child.start_time),
                    "run_s": _seconds(child.start_time, child.end_time),
                    "tasks_s": round(task_s, 2),
                    "created_to_end_s": waited,
                    "overhead_s": round(waited - task_s, 2) if waited else None,
                }
            )
        return {
            "parent_state": parent.state_name,
            "parent_s": _seconds(parent.start_time, parent.end_time),
            "targets": rows,
        }


def run_build(server: PrefectServer, profile: Path, dispatch: str) -> dict:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        started = time.perf_counter()
        run = run_deployment(
            "kiln-build/build",
            parameters={"profile": str(profile), "dispatch": dispatch},
            timeout=1800,
            poll_interval=1,
        )
        wall = time.perf_counter() - started
        if not run.state or not run.state.is_completed():
            logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in server.logs.glob("worker-*.log"))
            raise SystemExit(f"build ended {run.state.name if run.state else '?'}:\n{logs}")
        return {"dispatch": dispatch, "wall_s": round(wall, 2), **asyncio.run(_measure(run.id))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--query-seconds",
        type=float,
        default=2.0,
        help="PREFECT_WORKER_QUERY_SECONDS of the workers (Prefect's default is 10)",
    )
    parser.add_argument("--assets", default=str(Path.home() / ".kiln" / "assets" / "SmolLM2-135M-Instruct"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-server-"))
    home = root / "kiln-home"
    home.mkdir()
    profile = write_request(home, Path(args.assets))
    started = time.perf_counter()
    server = start_server(root / "prefect")
    server_start_s = time.perf_counter() - started
    try:
        server.env.update(
            {
                "KILN_HOME": str(home),
                "PREFECT_WORKER_QUERY_SECONDS": str(args.query_seconds),
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_TELEMETRY": "1",
            }
        )
        for name in ("MLFLOW_TRACKING_URI", "KILN_STORE_URI"):
            server.env.pop(name, None)
        subprocess.run([KILN, "pools", "create"], env=server.env, cwd=ROOT, check=True, capture_output=True)
        server.cli("deploy", "--all", timeout_s=300)
        for pool in POOLS:
            server.start_worker(pool)
        runs = [
            run_build(server, profile, "deployments"),
            run_build(server, profile, "deployments"),
            run_build(server, profile, "inline"),
        ]
    finally:
        server.stop()
    labels = ("deployments, cold", "deployments, no-op", "inline, no-op")
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "worker_query_seconds": args.query_seconds,
        "server_start_s": round(server_start_s, 1),
        "runs": dict(zip(labels, runs, strict=True)),
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "orchestration_server.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "| build run | target | pool | queue (s) | run (s) | tasks (s) | created -> end (s) | overhead (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, run in result["runs"].items():
        for t in run["targets"]:
            lines.append(
                f"| {label} | {t['target']} | {t['work_pool'] or '(in-process)'} | {t['queue_s']} | "
                f"{t['run_s']} | {t['tasks_s']} | {t['created_to_end_s']} | {t['overhead_s']} |"
            )
    table = "\n".join(lines)
    (out / "orchestration_server.md").write_text(
        f"# Server-mode overhead per target flow run\n\n`.venv/bin/python bench/orchestration_server.py "
        f"--query-seconds {args.query_seconds}` on {result['machine']}; a real `prefect server` (start "
        f"{result['server_start_s']} s), process workers, tiny Llama, two targets on two pools.\n"
        "Overhead = a target run's created -> end (what the parent waits for) minus its task runs' time; "
        "no-op task time is mostly first-use imports (MLflow, the engine) in a fresh process.\n\n"
        + table
        + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
