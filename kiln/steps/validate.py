"""Validate: accuracy vs this target's baseline engine and performance (cached), then the gates (every run).

Measurements are keyed by both engines' keys and the evaluation settings; the gates are re-decided every
run, so tightening a gate re-judges without re-measuring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kiln import cache, progress
from kiln.calibration import TokenSet
from kiln.profiles import BuildRequest, Recipe, Target
from kiln.steps.engine import EngineRef


@dataclass(frozen=True)
class Measurement:
    """What validation measured for one engine: flat metrics, and the files (result JSON, plots) behind
    them."""

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


def validation_key(
    engine: EngineRef, baseline: EngineRef, request: BuildRequest, heldout: TokenSet | None
) -> str:
    from kiln.validation.lm_eval_tasks import cache_inputs

    return cache.build_key(
        step="validate",
        engine=engine.key,
        baseline=baseline.key,
        evaluation=request.evaluation,
        heldout_sha256=heldout.sha256 if heldout else None,
        tasks=cache_inputs(request.evaluation),
        toolchain=cache.toolchain_versions(),
    )


def validate(
    request: BuildRequest,
    recipe: Recipe,
    target: Target,
    engine: EngineRef,
    baseline: EngineRef,
    heldout: TokenSet | None,
) -> Validation:
    """Accuracy vs the baseline engine of the same target, performance, then the recipe's gates."""
    from kiln.validation.gates import decide
    from kiln.validation.lm_eval_tasks import task_notes
    from kiln.validation.measure import RESULT_FILE, measure_engine

    key = validation_key(engine, baseline, request, heldout)

    def compute(output_dir: Path) -> Measurement:
        metrics, documents = measure_engine(
            engine.engine_dir, baseline.engine_dir, heldout, request.evaluation, output_dir=output_dir
        )
        accuracy = documents[RESULT_FILE].get("accuracy") or {}
        return Measurement(
            metrics=metrics,
            artifacts=sorted(p for p in output_dir.iterdir() if p.is_file()),
            task_notes=task_notes(accuracy.get("task_evals") or {}),
        )

    with progress.step("validate", f"{recipe.name} x {target.name}") as ev:
        hit = cache.StepCache("validate").run(key, compute, Measurement)
        verdict = decide(request.gates_for(recipe), hit.value.metrics)
        ev.status = "reused" if hit.reused else "done"
        ppl = hit.value.metrics.get("perplexity")
        ev.note = f"ppl {ppl:.2f}, " if ppl is not None else ""
        ev.note += "pass" if verdict.passed else "FAIL: " + "; ".join(verdict.messages)
        return Validation(hit.value, verdict.passed, verdict.messages, key, hit.reused)


def choose_recommended(request: BuildRequest, results: dict[str, Validation]) -> str | None:
    """Among passing recipes, the fastest (or smallest, as the profile says) is the target's
    recommendation."""
    from kiln.validation.gates import recommend

    return recommend(
        {name: v.measurement.metrics for name, v in results.items() if v.passed}, request.evaluation.select
    )
