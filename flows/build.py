"""The build flow: one request -> validated, registered engines per recipe x target.

load + preflight -> download -> calibration data -> calibrate + quantize (once per recipe, shared by
every target; a recipe over its ``max_ppl_increase_pct`` stops here) -> per target: compile -> validate
-> register -> report. Each target runs as its own flow run: on its GPU class's work pool
(``run_deployment``) when this build runs from a deployment, in this process on the embedded default.
Identical inputs reuse every step (``kiln.cache``).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from kiln.flows.target import dispatch_targets
from kiln.profiles import BuildRequest
from kiln.steps import BASELINE, Outcome
from kiln.steps.checkpoint import gate_failed
from kiln.tasks.build import calibrate_and_quantize, calibration_data, download, load_and_preflight
from kiln.tasks.report import report

Dispatch = Literal["auto", "inline", "deployments"]


def _run_name() -> str:
    """``<profile>[-<revision>]``: the request's name, and the pinned revision an event brings."""
    from pathlib import Path

    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    profile = params.get("profile")
    name = (
        profile.get("name")
        if isinstance(profile, dict)
        else Path(str(profile)).stem
        if profile
        else "default"
    )
    revision = params.get("revision")
    return f"{name}-{str(revision)[:8]}" if revision else str(name)


@flow(name="kiln-build", log_prints=True, flow_run_name=_run_name)
def build(
    profile: str | dict | None = None,
    revision: str | None = None,
    repo_id: str | None = None,
    dispatch: Dispatch = "auto",
) -> list[Outcome]:
    """Build a request (path, mapping, or an event's repo_id + revision over the deployment's profile)."""
    request = load_and_preflight(_profile_or_default(profile), revision, repo_id)
    snapshot = download(request)
    data = calibration_data(request, snapshot)
    checkpoints = {
        recipe.name: calibrate_and_quantize(request, snapshot, recipe, data)
        for recipe in [BASELINE, *request.recipes]
    }
    # a recipe its checkpoint gate refused goes no further (no export, so no compile or register) and does
    # not stop the others: its targets are reported `failed-gates`, as a validation gate failure is
    passing = [recipe for recipe in request.recipes if checkpoints[recipe.name].passed]
    built = (
        dispatch_targets(
            request.model_copy(update={"recipes": passing}), snapshot, checkpoints, data.heldout, dispatch
        )
        if passing
        else []
    )
    by_pair = {(o.recipe, o.target): o for o in built}
    outcomes = [
        by_pair[(recipe.name, target.name)]
        if checkpoints[recipe.name].passed
        else gate_failed(checkpoints[recipe.name], target)
        for target in request.targets
        for recipe in request.recipes
    ]
    report(request, snapshot, outcomes)
    return outcomes


def _profile_or_default(profile: str | dict | BuildRequest | None) -> str | dict | BuildRequest:
    """An event without a profile builds the deployment's default one."""
    if profile:
        return profile
    from prefect.runtime import deployment

    default = (deployment.parameters or {}).get("profile")
    if not default:
        from kiln.errors import KilnInputError

        raise KilnInputError(
            "no profile: pass one (kiln build PROFILE, or the event's payload.profile) "
            "or set the build deployment's default `profile` parameter in prefect.yaml"
        )
    return default
