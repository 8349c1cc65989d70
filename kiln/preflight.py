"""Pre-flight checks that run before any expensive step: recipe x target support, limits vs model.

``check_request_static`` needs only the profile; deeper checks (memory fit, GPUs per worker, the
TensorRT-LLM version vs the checkpoint format, registry reachability) build on it.
"""

from __future__ import annotations

from kiln.errors import UnsupportedCombinationError
from kiln.profiles import BuildRequest, Recipe, Target
from kiln.recipes import KV_SCHEMES, scheme


def recipe_target_problem(recipe: Recipe, target: Target) -> str | None:
    """Why ``recipe`` cannot run on ``target``, or None when it can."""
    quant = scheme(recipe.quantization)
    sm = target.sm_number
    if quant.needs_cuda_to_calibrate and target.device != "cuda":
        return f"{recipe.quantization} needs CUDA to calibrate and run; target {target.name!r} is a cpu target"
    if quant.min_sm is not None and target.device == "cuda" and sm is not None and sm < quant.min_sm:
        return (f"{recipe.quantization} needs SM >= {quant.min_sm}; target {target.name!r} is {target.sm}"
                f" ({target.gpu or 'unknown GPU'})")
    kv_min_sm = KV_SCHEMES[recipe.kv_cache_dtype][2]
    if kv_min_sm is not None and target.device == "cuda" and sm is not None and sm < kv_min_sm:
        return f"kv_cache_dtype {recipe.kv_cache_dtype} needs SM >= {kv_min_sm}; target {target.name!r} is {target.sm}"
    return None


def check_request_static(request: BuildRequest, source: str = "<request>") -> None:
    """Raise ``UnsupportedCombinationError`` listing every recipe x target pair that cannot run."""
    problems = [
        f"recipe {recipe.name!r} x target {target.name!r}: {why}"
        for recipe in request.recipes
        for target in request.targets
        if (why := recipe_target_problem(recipe, target))
    ]
    if problems:
        raise UnsupportedCombinationError(
            f"{source}: {len(problems)} recipe x target pair(s) cannot run:\n  " + "\n  ".join(problems)
            + "\nRemove the pair (split the request) or pick a target with a newer GPU."
        )
