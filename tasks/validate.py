"""Per-target steps after compile as Prefect tasks: validate and register (:mod:`kiln.steps`)."""

from __future__ import annotations

from prefect import task

from kiln.calibration import TokenSet
from kiln.hub import ModelSnapshot
from kiln.profiles import BuildRequest, Recipe, Target
from kiln.steps import Checkpoint, EngineRef, Outcome, Validation
from kiln.steps import register as register_step
from kiln.steps import validate as validate_step
from kiln.tasks.options import LOCAL, NETWORK


@task(name="validate", timeout_seconds=4 * 3600, **LOCAL)
def validate(
    request: BuildRequest,
    recipe: Recipe,
    target: Target,
    engine: EngineRef,
    baseline: EngineRef,
    heldout: TokenSet | None,
) -> Validation:
    """Accuracy vs the baseline engine of the same target, performance, then the recipe's gates."""
    return validate_step.validate(request, recipe, target, engine, baseline, heldout)


@task(name="register", timeout_seconds=3600, **NETWORK)
def register(
    request: BuildRequest,
    snapshot: ModelSnapshot,
    recipe: Recipe,
    target: Target,
    checkpoint: Checkpoint,
    engine: EngineRef,
    validation: Validation,
    recommended: bool,
) -> Outcome:
    """Publish a passing engine (store + MLflow version, alias candidate); a rebuild reuses the version."""
    return register_step.register(
        request, snapshot, recipe, target, checkpoint, engine, validation, recommended
    )
