"""Compile: one engine per checkpoint x target, keyed by the checkpoint's key and the target."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kiln import cache, progress
from kiln.errors import BackendUnavailableError
from kiln.hub import ModelSnapshot
from kiln.profiles import Recipe, Target
from kiln.steps.checkpoint import Checkpoint
from kiln.steps.outcome import Outcome


@dataclass(frozen=True)
class EngineRef:
    recipe: str
    target: str
    key: str
    engine_dir: Path
    reused: bool = False


def engine_key(checkpoint: Checkpoint, target: Target) -> str:
    """Content key of an engine: its checkpoint's key, the target (minus where it is scheduled), toolchain."""
    return cache.build_key(
        step="compile",
        checkpoint=checkpoint.key,
        target=target.model_dump(exclude={"work_pool", "optional"}),
        toolchain=cache.toolchain_versions(),
    )


def compile_engine(checkpoint: Checkpoint, target: Target, snapshot: ModelSnapshot) -> EngineRef:
    """Build (or reuse) the engine for one checkpoint on one target; it carries the model's tokenizer."""
    from kiln.engine.base import get_backend

    key = engine_key(checkpoint, target)  # the model sha is inside the checkpoint's key

    def compute(output_dir: Path) -> EngineRef:
        backend = get_backend(target.backend)
        # model_dir: where backends take the tokenizer from;
        # hf_dir: the HF export `hf_checkpoint` targets publish
        lineage = {
            "model_sha": snapshot.sha,
            "repo_id": snapshot.repo_id,
            "revision": snapshot.revision,
            "checkpoint_key": checkpoint.key,
            "recipe": checkpoint.recipe,
            "build_key": key,
            "model_dir": str(snapshot.path),
            "hf_dir": str(checkpoint.hf_dir) if checkpoint.hf_dir else None,
        }
        engine_dir = backend.compile(checkpoint.dir_for(target), target, output_dir, lineage)
        return EngineRef(checkpoint.recipe, target.name, key, Path(engine_dir))

    with progress.step("compile", f"{checkpoint.recipe} x {target.name}") as ev:
        hit = cache.StepCache("compile").run(key, compute, EngineRef)
        ev.status = "reused" if hit.reused else "done"
        return replace(hit.value, reused=hit.reused, recipe=checkpoint.recipe, target=target.name)


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
    """The outcome of a recipe on a target skipped here (:func:`backend_skip`)."""
    with progress.step("compile", f"{recipe.name} x {target.name}") as ev:
        ev.status, ev.note = "skipped", reason.splitlines()[0]
    return Outcome(recipe.name, target.name, "skipped", f"skipped: {reason.splitlines()[0]}")
