"""Register: publish a passing engine (store + MLflow version, alias ``candidate``); a rebuild reuses it."""

from __future__ import annotations

from kiln import cache, progress
from kiln.hub import ModelSnapshot
from kiln.profiles import BuildRequest, Recipe, Target
from kiln.steps.checkpoint import Checkpoint
from kiln.steps.engine import EngineRef
from kiln.steps.outcome import Outcome
from kiln.steps.validate import Validation


def _params(recipe: Recipe, target: Target) -> dict[str, str]:
    """Recipe and target settings as flat MLflow params (``recipe.quantization``,
    ``target.limits.max_seq_len``)."""
    from kiln.registry.publish import flat_params

    return {
        **flat_params("recipe", recipe.model_dump(mode="json", exclude={"gates"})),
        **flat_params("target", target.model_dump(mode="json")),
    }


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
    """Publish a passing engine (store + MLflow version, alias candidate); a failing one is only reported."""
    from kiln.registry import publish

    with progress.step("register", f"{recipe.name} x {target.name}") as ev:
        measured = validation.measurement
        if not validation.passed:
            ev.status, ev.note = "skipped", validation.verdict
            return Outcome(
                recipe.name,
                target.name,
                "failed-gates",
                validation.verdict,
                measured.metrics,
                task_notes=measured.task_notes,
            )
        lineage = {
            "model_sha": snapshot.sha,
            "repo_id": snapshot.repo_id,
            "revision": snapshot.revision,
            "source": snapshot.source,
            "recipe": recipe.name,
            "target": target.name,
            "checkpoint_key": checkpoint.key,
            "calibration_sha256": checkpoint.calibration_sha256,
            "engine_key": engine.key,
            "toolchain": cache.toolchain_versions(),
        }
        published = publish(
            engine.engine_dir,
            registry=request.registry,
            build_key=engine.key,
            lineage=lineage,
            metrics=measured.metrics,
            params=_params(recipe, target),
            artifacts=measured.artifacts,
            passed_gates=True,
            recommended=recommended,
            recipe=recipe.name,
            target=target.name,
        )
        ev.status = "reused" if published.reused else "done"
        ev.note = f"{published.name} v{published.version}"
        return Outcome(
            recipe.name,
            target.name,
            "registered",
            validation.verdict,
            measured.metrics,
            recommended,
            published.name,
            str(published.version),
            published.uri,
            published.reused,
            engine.key,
            task_notes=measured.task_notes,
        )
