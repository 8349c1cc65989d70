"""The per-target subflow (compile -> validate -> register, for every recipe on one target) and its fan-out.

On the embedded default the parent calls the subflow in-process, target after target. When the build
runs from a deployment, each target becomes its own flow run of the ``kiln-target/<work pool>``
deployment, so it lands on a worker of that GPU class; the parent waits for all of them and gathers
their results (persisted as JSON in Prefect's result storage, which a fleet must share, e.g. S3).
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prefect import flow
from pydantic import TypeAdapter

from kiln.cache import canonical_json
from kiln.calibration import TokenSet
from kiln.errors import DeploymentNotFoundError, KilnError
from kiln.hub import ModelSnapshot
from kiln.profiles import BuildRequest
from kiln.steps import Checkpoint, Outcome
from kiln.steps.engine import backend_skip, skipped
from kiln.steps.validate import choose_recommended
from kiln.tasks.build import compile_engine
from kiln.tasks.validate import register, validate

TARGET_FLOW = "kiln-target"
_OUTCOMES = TypeAdapter(list[Outcome])


def _run_name() -> str:
    """``<request>-<target>-<model sha>``, so a target's run is found by name on the Prefect UI."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    request, snapshot = params.get("request"), params.get("snapshot")
    name = getattr(request, "name", None) or (request or {}).get("name", "build")
    sha = getattr(snapshot, "sha", None) or (snapshot or {}).get("sha", "")
    return f"{name}-{params.get('target')}-{str(sha)[:8]}"


@flow(name=TARGET_FLOW, persist_result=True, result_serializer="json", flow_run_name=_run_name)
def build_target(
    request: BuildRequest,
    target: str,
    snapshot: ModelSnapshot,
    checkpoints: dict[str, Checkpoint],
    heldout: TokenSet | None,
) -> list[dict]:
    """Every recipe on one target: compile, validate vs this target's baseline engine, register passing
    ones."""
    tgt = next(t for t in request.targets if t.name == target)
    if reason := backend_skip(tgt):
        return _dump([skipped(recipe, tgt, reason) for recipe in request.recipes])
    baseline = compile_engine(checkpoints["baseline"], tgt, snapshot)
    engines = {
        recipe.name: compile_engine(checkpoints[recipe.name], tgt, snapshot) for recipe in request.recipes
    }
    results = {
        recipe.name: validate(request, recipe, tgt, engines[recipe.name], baseline, heldout)
        for recipe in request.recipes
    }
    best = choose_recommended(request, results)
    return _dump(
        [
            register(
                request,
                snapshot,
                recipe,
                tgt,
                checkpoints[recipe.name],
                engines[recipe.name],
                results[recipe.name],
                recommended=recipe.name == best,
            )
            for recipe in request.recipes
        ]
    )


def _dump(outcomes: list[Outcome]) -> list[dict]:
    return _OUTCOMES.dump_python(outcomes, mode="json")


def dispatch_targets(
    request: BuildRequest,
    snapshot: ModelSnapshot,
    checkpoints: dict[str, Checkpoint],
    heldout: TokenSet | None,
    dispatch: str = "auto",
) -> list[Outcome]:
    """Run every target's subflow (in-process, or as deployment runs on the targets' work pools)."""
    if not _use_deployments(dispatch):
        rows = [build_target(request, t.name, snapshot, checkpoints, heldout) for t in request.targets]
    else:
        with ThreadPoolExecutor(max_workers=len(request.targets)) as pool:
            # each thread runs in a copy of this flow run's context, so Prefect links every target's run
            # to this parent as a subflow (a bare thread would start them as unrelated flow runs)
            futures = [
                pool.submit(
                    contextvars.copy_context().run,
                    _run_on_pool,
                    request,
                    t.name,
                    t.work_pool,
                    snapshot,
                    checkpoints,
                    heldout,
                )
                for t in request.targets
            ]
            rows = [future.result() for future in futures]
    return [outcome for target_rows in rows for outcome in _OUTCOMES.validate_python(target_rows)]


def _use_deployments(dispatch: str) -> bool:
    if dispatch != "auto":
        return dispatch == "deployments"
    from prefect.runtime import deployment

    return deployment.id is not None  # a deployment run fans out; `kiln build` stays in-process


def _run_on_pool(
    request: BuildRequest,
    target: str,
    work_pool: str,
    snapshot: ModelSnapshot,
    checkpoints: dict[str, Checkpoint],
    heldout: TokenSet | None,
) -> list[dict]:
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = f"{TARGET_FLOW}/{work_pool}"
    parameters = {
        "request": request,
        "target": target,
        "snapshot": snapshot,
        "checkpoints": checkpoints,
        "heldout": heldout,
    }
    try:
        run = run_deployment(
            name,
            parameters=_json(parameters),
            timeout=None,
            poll_interval=2,
            flow_run_name=f"{request.name}-{target}-{snapshot.sha[:8]}",
        )
    except ObjectNotFound as exc:
        raise DeploymentNotFoundError(
            f"no deployment {name!r} for target {target!r}: add it to prefect.yaml (one "
            f"kiln-target deployment per work pool) and run `prefect deploy --all`",
            deployment=name,
            target=target,
        ) from exc
    if not run.state or not run.state.is_completed():
        raise KilnError(
            f"target {target!r} ({name}, flow run {run.id}) ended "
            f"{run.state.name if run.state else 'unknown'}: {run.state.message if run.state else ''}"
        )
    return run.state.result()


def _json(parameters: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(canonical_json(parameters))
