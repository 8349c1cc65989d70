"""Calibrate + quantize: one checkpoint per recipe, shared by every target, gated on fake-quant perplexity.

key (:func:`checkpoint_key`: only what changes the weights) -> compute (:func:`kiln.quantize.quantize`) ->
reuse (a cached entry serves when it holds what this run's gate needs) -> gate (``max_ppl_increase_pct``,
decided every run from the cached numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kiln import cache, progress
from kiln.calibration import TokenSet
from kiln.families import Family
from kiln.hub import ModelSnapshot
from kiln.profiles import BuildRequest, Gates, Recipe, Target
from kiln.quantize import Perplexity, layout_key, needs_calibration
from kiln.steps.data import Datasets
from kiln.steps.outcome import Outcome

BASELINE = Recipe(name="baseline", quantization="none")
"""The unquantized reference every engine is validated against, on its own target."""


@dataclass(frozen=True)
class Checkpoint:
    """One recipe's checkpoint, calibrated once and shared by every target.

    ``perplexity`` is the fake-quant perplexity vs the unquantized model on the held-out tokens, measured
    when the recipe has a ``max_ppl_increase_pct`` gate (cached with the checkpoint); ``gate_failures``
    is decided from it every run. A recipe refused by that gate has no exports: nothing is compiled from it.
    """

    recipe: str
    key: str
    trtllm_dirs: dict[str, Path]
    hf_dir: Path | None
    calibration_sha256: str | None
    reused: bool = False
    perplexity: Perplexity | None = None
    gate_failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.gate_failures

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail: " + "; ".join(self.gate_failures)

    def metrics(self) -> dict[str, float]:
        """The gate's numbers under the report's metric names (``perplexity``, ``ppl_increase_pct`` ...)."""
        ppl = self.perplexity
        if ppl is None:
            return {}
        return {
            "perplexity": ppl.quantized,
            "baseline_perplexity": ppl.baseline,
            "ppl_increase_pct": ppl.increase_pct,
            "heldout_tokens": float(ppl.num_tokens),
        }

    @property
    def exported(self) -> bool:
        return bool(self.trtllm_dirs) or self.hf_dir is not None

    def dir_for(self, target: Target) -> Path:
        """The checkpoint ``target`` compiles from: its layout's TensorRT-LLM checkpoint, or the HF export of
        a
        family ModelOpt exports only that way (``kiln.families``)."""
        layout = target_layout(target)
        found = self.trtllm_dirs.get(layout) or self.hf_dir
        if found is None:
            raise KeyError(f"recipe {self.recipe!r}: no export for target {target.name!r} ({layout})")
        return found


def target_layout(target: Target) -> str:
    """The (tp, pp) layout name of ``target``'s TensorRT-LLM checkpoint (:func:`kiln.quantize.layout_key`)."""
    return layout_key(target.limits.tp_size, target.limits.pp_size)


def checkpoint_key(
    snapshot: ModelSnapshot,
    recipe: Recipe,
    calibration_sha256: str | None,
    layouts: list[str],
    dtype: str,
    formats: list[str] | tuple[str, ...] = ("trtllm",),
) -> str:
    """Content key of a checkpoint: only what changes the weights or the exports (not the recipe's name,
    gates, or an unused calibration spec), so a ``none`` recipe shares the baseline's checkpoint."""
    return cache.build_key(
        step="quantize",
        model_sha=snapshot.sha,
        recipe=_weight_inputs(recipe),
        calibration_sha256=calibration_sha256,
        layouts=sorted(layouts),
        dtype=dtype,
        formats=sorted(formats),
        toolchain=cache.toolchain_versions(),
    )


def export_formats(request: BuildRequest, family: Family | None = None) -> list[str]:
    """TensorRT-LLM checkpoints where ModelOpt writes them for the family (every backend compiles from them)
    and the HF export only when a target publishes it (``artifact: hf_checkpoint``: a second full copy of
    the weights); for a family ModelOpt exports only as an HF checkpoint, that alone."""
    if family is not None and "trtllm" not in family.exports:
        return ["hf"]
    return ["trtllm", "hf"] if any(t.artifact == "hf_checkpoint" for t in request.targets) else ["trtllm"]


def _weight_inputs(recipe: Recipe) -> dict[str, Any]:
    from kiln.recipes import scheme

    quant = scheme(recipe.quantization)
    inputs: dict[str, Any] = {"quantization": recipe.quantization, "kv_cache_dtype": recipe.kv_cache_dtype}
    if quant.group_size:
        inputs["group_size"] = recipe.group_size
    if needs_calibration(recipe):
        inputs["calibration"] = recipe.calibration.model_dump(mode="json")
    return inputs


def checkpoint_gate(request: BuildRequest, recipe: Recipe) -> float | None:
    """The recipe's ``max_ppl_increase_pct``, checked on the checkpoint before export; None: no such gate,
    or nothing to check (a recipe that quantizes neither weights nor KV cache is the baseline itself)."""
    if recipe.quantization == "none" and recipe.kv_cache_dtype == "auto":
        return None
    return request.gates_for(recipe).max_ppl_increase_pct


def checkpoint_gate_failures(perplexity: Perplexity | None, limit: float | None) -> list[str]:
    """The checkpoint gate's verdict as validation words it (``kiln.validation.gates``), marked
    ``checkpoint``."""
    if limit is None:
        return []
    from kiln.validation.gates import decide

    metrics = {} if perplexity is None else {"ppl_increase_pct": perplexity.increase_pct}
    verdict = decide(Gates(max_ppl_increase_pct=limit), metrics)
    if perplexity is None:
        return [f"checkpoint {m}" for m in verdict.messages]
    return [
        f"checkpoint {m}: fake-quant perplexity {perplexity.quantized:.4g} vs unquantized "
        f"{perplexity.baseline:.4g} on {perplexity.num_tokens} held-out tokens"
        for m in verdict.messages
    ]


def checkpoint_dtype(request: BuildRequest) -> str:
    """One export serves every target: float32 only when a target computes in it, else the GPUs' dtype."""
    dtypes = {t.dtype for t in request.targets}
    return "float32" if "float32" in dtypes else ("bfloat16" if "bfloat16" in dtypes else "float16")


def quantize_device(request: BuildRequest) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and any(t.device == "cuda" for t in request.targets) else "cpu"


def build_checkpoint(
    request: BuildRequest, snapshot: ModelSnapshot, recipe: Recipe, data: Datasets
) -> Checkpoint:
    """Calibrate once per recipe (ModelOpt) and export a TensorRT-LLM checkpoint per (tp, pp) of the targets.

    With a ``max_ppl_increase_pct`` gate the fake-quant perplexity is checked first: a recipe over it is
    exported nowhere and comes back with ``gate_failures`` (its targets are reported, never compiled).
    """
    from kiln.families import family_for
    from kiln.hub import inspect_model
    from kiln.quantize import quantize

    layouts = sorted({target_layout(t) for t in request.targets})
    calibration = data.calibration.get(recipe.name)
    cal_sha = calibration.sha256 if calibration is not None else None
    dtype = checkpoint_dtype(request)
    formats = export_formats(request, family_for(inspect_model(snapshot.path).architecture))
    key = checkpoint_key(snapshot, recipe, cal_sha, layouts, dtype, formats)
    pairs = sorted({(t.limits.tp_size, t.limits.pp_size) for t in request.targets})
    limit = checkpoint_gate(request, recipe)
    heldout: TokenSet | None = (
        data.heldout if limit is not None else None
    )  # no gate: no perplexity to pay for

    def compute(output_dir: Path) -> Checkpoint:
        lineage = {
            "model_sha": snapshot.sha,
            "repo_id": snapshot.repo_id,
            "recipe": recipe.name,
            "build_key": key,
        }
        # the gate is decided here, by the caller: a refusal is cached with its numbers and no exports, so a
        # rerun gives the same verdict without recalibrating
        result = quantize(
            snapshot.path,
            recipe,
            layouts=pairs,
            output_dir=output_dir,
            dtype=dtype,
            device=quantize_device(request),
            lineage=lineage,
            calibration=calibration,
            formats=formats,
            heldout=heldout,
            export_if=None if limit is None else lambda ppl: ppl.increase_pct <= limit,
        )
        return Checkpoint(
            recipe.name,
            key,
            dict(result.trtllm_dirs),
            result.hf_dir,
            result.calibration_sha256,
            perplexity=result.perplexity,
        )

    def answers(cached: Checkpoint) -> bool:
        # the key leaves gates out (they do not change weights): a stored entry serves when it holds what
        # this run's gate needs; a refusal serves only a gate it still fails, or the recipe recalibrates
        if heldout is None or limit is None:
            return cached.exported
        ppl = cached.perplexity
        if ppl is None or ppl.heldout_sha256 != heldout.sha256:
            return False
        return cached.exported or ppl.increase_pct > limit

    with progress.step("quantize", recipe.name) as ev:
        hit = cache.StepCache("quantize").run(key, compute, Checkpoint, reuse=answers)
        failures = checkpoint_gate_failures(hit.value.perplexity, limit)
        ev.status = "reused" if hit.reused else "done"
        if hit.value.perplexity is not None:
            ppl = hit.value.perplexity
            ev.note = f"fake-quant ppl {ppl.quantized:.2f} ({ppl.increase_pct:+.2f}%), "
            ev.note += "pass" if not failures else "FAIL: " + "; ".join(failures)
        # recipes with the same weights (`none` and the baseline) share one entry: name it for this recipe
        return replace(hit.value, reused=hit.reused, recipe=recipe.name, gate_failures=tuple(failures))


def gate_failed(checkpoint: Checkpoint, target: Target) -> Outcome:
    """The outcome of a recipe its checkpoint gate refused, on one target: reported, nothing compiled."""
    with progress.step("compile", f"{checkpoint.recipe} x {target.name}") as ev:
        ev.status, ev.note = "skipped", checkpoint.verdict
    return Outcome(checkpoint.recipe, target.name, "failed-gates", checkpoint.verdict, checkpoint.metrics())
