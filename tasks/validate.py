"""Per-target steps after compile: validate (cached measurements, fresh gate verdicts) and register.

Measurements (accuracy vs this target's baseline engine, performance) are keyed by both engines'
keys and the evaluation settings; the gates are re-decided every run, so tightening a gate re-judges
without re-measuring. Only engines that pass their gates are registered as candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task

from kiln import cache
from kiln.errors import BackendUnavailableError
from kiln.profiles import BuildRequest, Recipe, Target
from kiln.tasks import progress
from kiln.tasks.build import LOCAL, NETWORK, Checkpoint, EngineRef, Outcome, Snapshot


@dataclass(frozen=True)
class Measurement:
    """What validation measured for one engine: flat metrics, and the files (result JSON, plots) behind them."""

    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)
    task_notes: dict[str, str] = field(default_factory=dict)  # task evals that did not run, and why


@dataclass(frozen=True)
class Validation:
    measurement: Measurement
    passed: bool
    failures: list[str]
    key: str
    reused: bool = False

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail: " + "; ".join(self.failures)


def backend_skip(target: Target) -> str | None:
    """Why an optional target is skipped here (its backend is not installed), or None to build it."""
    from kiln.engine.base import get_backend

    try:
        get_backend(target.backend).check_available(target)
    except BackendUnavailableError as exc:
        if target.optional:
            return str(exc)
        raise
    return None


def skipped(recipe: Recipe, target: Target, reason: str) -> Outcome:
    with progress.step("compile", f"{recipe.name} x {target.name}") as ev:
        ev.status, ev.note = "skipped", reason.splitlines()[0]
    return Outcome(recipe.name, target.name, "skipped", f"skipped: {reason.splitlines()[0]}")


def validation_key(engine: EngineRef, baseline: EngineRef, request: BuildRequest, heldout: Any) -> str:
    from kiln.validation.lm_eval_tasks import cache_inputs

    return cache.build_key(step="validate", engine=engine.key, baseline=baseline.key,
                           evaluation=request.evaluation, heldout_sha256=getattr(heldout, "sha256", None),
                           tasks=cache_inputs(request.evaluation), toolchain=cache.toolchain_versions())


@task(name="validate", timeout_seconds=4 * 3600, **LOCAL)
def validate(request: BuildRequest, recipe: Recipe, target: Target, engine: EngineRef, baseline: EngineRef,
             heldout: Any) -> Validation:
    """Accuracy vs the baseline engine of the same target, performance, then the recipe's gates."""
    from kiln.validation.gates import decide
    from kiln.validation.measure import RESULT_FILE, measure_engine
    from kiln.validation.lm_eval_tasks import task_notes

    key = validation_key(engine, baseline, request, heldout)

    def compute(output_dir: Path) -> Measurement:
        metrics, documents = measure_engine(engine.engine_dir, baseline.engine_dir, heldout, request.evaluation,
                                            output_dir=output_dir)
        accuracy = documents[RESULT_FILE].get("accuracy") or {}
        return Measurement(metrics=metrics, artifacts=sorted(p for p in output_dir.iterdir() if p.is_file()),
                           task_notes=task_notes(accuracy.get("task_evals") or {}))

    with progress.step("validate", f"{recipe.name} x {target.name}") as ev:
        hit = cache.StepCache("validate").run(key, compute, Measurement)
        verdict = decide(request.gates_for(recipe), hit.value.metrics)
        ev.status = "reused" if hit.reused else "done"
        ppl = hit.value.metrics.get("perplexity")
        ev.note = f"ppl {ppl:.2f}, " if ppl is not None else ""
        ev.note += "pass" if verdict.passed else "FAIL: " + "; ".join(verdict.messages)
        return Validation(hit.value, verdict.passed, verdict.messages, key, hit.reused)


def choose_recommended(request: BuildRequest, results: dict[str, Validation]) -> str | None:
    """Among passing recipes, the fastest (or smallest, as the profile says) is the target's recommendation."""
    from kiln.validation.gates import recommend

    return recommend({name: v.measurement.metrics for name, v in results.items() if v.passed},
                     request.evaluation.select)


def _params(recipe: Recipe, target: Target) -> dict[str, str]:
    """Recipe and target settings as flat MLflow params (``recipe.quantization``, ``target.limits.max_seq_len``)."""
    from kiln.registry.publish import flat_params

    return {**flat_params("recipe", recipe.model_dump(mode="json", exclude={"gates"})),
            **flat_params("target", target.model_dump(mode="json"))}


@task(name="register", timeout_seconds=3600, **NETWORK)
def register(request: BuildRequest, snapshot: Snapshot, recipe: Recipe, target: Target, checkpoint: Checkpoint,
             engine: EngineRef, validation: Validation, recommended: bool) -> Outcome:
    """Publish a passing engine (store + MLflow version, alias candidate); a rebuild reuses the version."""
    from kiln.registry import publish

    with progress.step("register", f"{recipe.name} x {target.name}") as ev:
        if not validation.passed:
            ev.status, ev.note = "skipped", validation.verdict
            return Outcome(recipe.name, target.name, "failed-gates", validation.verdict, validation.measurement.metrics,
                           task_notes=validation.measurement.task_notes)
        lineage = {"model_sha": snapshot.sha, "repo_id": snapshot.repo_id, "revision": snapshot.revision,
                   "source": snapshot.source, "recipe": recipe.name, "target": target.name,
                   "checkpoint_key": checkpoint.key, "calibration_sha256": checkpoint.calibration_sha256,
                   "engine_key": engine.key, "toolchain": cache.toolchain_versions()}
        published = publish(engine.engine_dir, registry=request.registry, build_key=engine.key, lineage=lineage,
                            metrics=validation.measurement.metrics, params=_params(recipe, target),
                            artifacts=validation.measurement.artifacts, passed_gates=True, recommended=recommended,
                            recipe=recipe.name, target=target.name)
        ev.status = "reused" if published.reused else "done"
        ev.note = f"{published.name} v{published.version}"
        return Outcome(recipe.name, target.name, "registered", validation.verdict, validation.measurement.metrics,
                       recommended, published.name, str(published.version), published.uri, published.reused, engine.key,
                       task_notes=validation.measurement.task_notes)
