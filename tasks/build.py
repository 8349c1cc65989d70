"""The build DAG's steps as Prefect tasks: thin wrappers over ``kiln`` functions plus content-keyed caching.

Every step that produces files (quantize, compile) or costs minutes (validate) runs through
:class:`kiln.cache.StepCache` under a key of its content inputs, so an identical rebuild reuses it.
Network steps (download, register) retry with exponential backoff; input errors never retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from kiln import cache
from kiln.errors import GateFailedError, KilnInputError, is_retryable
from kiln.families import Family
from kiln.profiles import BuildRequest, Gates, Recipe, Target, load_request
from kiln.quantize import Perplexity
from kiln.tasks import progress

BASELINE = Recipe(name="baseline", quantization="none")
"""The unquantized reference every engine is validated against, on its own target."""


def transient(exc: BaseException) -> bool:
    """Whether a network step's failure may pass on a retry (:func:`kiln.errors.is_retryable`)."""
    return is_retryable(exc)


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:
        return transient(exc)
    return False


NETWORK = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5,
               retry_condition_fn=_retry_if_transient, cache_policy=NO_CACHE)
LOCAL = dict(cache_policy=NO_CACHE)  # kiln.cache keys steps by content; Prefect's input hashing would re-hash tensors


@dataclass(frozen=True)
class Snapshot:
    """The pinned model: where its files are and the identity (commit sha or content hash) keys use."""

    path: Path
    sha: str
    source: str
    repo_id: str | None = None
    revision: str | None = None
    reused: bool = False


@dataclass(frozen=True)
class Datasets:
    """Token ids for calibration (per recipe) and the held-out text validation scores on; disjoint."""

    calibration: dict[str, Any]
    heldout: Any


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
        return {"perplexity": ppl.quantized, "baseline_perplexity": ppl.baseline,
                "ppl_increase_pct": ppl.increase_pct, "heldout_tokens": float(ppl.num_tokens)}

    @property
    def exported(self) -> bool:
        return bool(self.trtllm_dirs) or self.hf_dir is not None

    def dir_for(self, target: Target) -> Path:
        """The checkpoint ``target`` compiles from: its layout's TensorRT-LLM checkpoint, or the HF export of a
        family ModelOpt exports only that way (``kiln.families``)."""
        found = self.trtllm_dirs.get(layout_name(target)) or self.hf_dir
        if found is None:
            raise KeyError(f"recipe {self.recipe!r}: no export for target {target.name!r} ({layout_name(target)})")
        return found


@dataclass(frozen=True)
class EngineRef:
    recipe: str
    target: str
    key: str
    engine_dir: Path
    reused: bool = False


@dataclass(frozen=True)
class Outcome:
    """One recipe x target row of the build: verdict, key metrics and where the version went."""

    recipe: str
    target: str
    status: str  # registered | failed-gates | skipped
    verdict: str
    metrics: dict[str, float] = field(default_factory=dict)
    recommended: bool = False
    model_name: str | None = None
    version: str | None = None
    uri: str | None = None
    reused: bool = False
    build_key: str | None = None
    task_notes: dict[str, str] = field(default_factory=dict)


def layout_name(target: Target) -> str:
    return f"tp{target.limits.tp_size}pp{target.limits.pp_size}"


@task(name="load-and-preflight", **LOCAL)
def load_and_preflight(profile: str | dict | BuildRequest, revision: str | None = None,
                       repo_id: str | None = None) -> BuildRequest:
    """Validate the request and every cheap check (recipe x target, registry reachable) before any work."""
    with progress.step("preflight", str(profile) if not isinstance(profile, dict | BuildRequest) else ""):
        request = load_request(profile)
        request = _pin_event_revision(request, revision, repo_id)
        from kiln.preflight import check_request_static
        from kiln.registry.publish import check_registry

        check_request_static(request, source=str(profile) if isinstance(profile, str | Path) else request.name)
        check_registry(request.registry)
        return request


def _pin_event_revision(request: BuildRequest, revision: str | None, repo_id: str | None) -> BuildRequest:
    """Build the revision an event named (a new commit of the watched repo) instead of the profile's."""
    if not revision:
        return request
    model = request.model
    if not hasattr(model, "repo_id"):
        raise KilnInputError(f"revision {revision!r} given, but request {request.name!r} builds a local dir "
                             f"({model.local_dir}); events can pin revisions of hub models only")
    if repo_id and repo_id != model.repo_id:
        raise KilnInputError(f"the event is for {repo_id!r}, but request {request.name!r} builds {model.repo_id!r}: "
                             "emit it with the matching profile")
    return request.model_copy(update={"model": model.model_copy(update={"revision": revision})})


@task(name="download", timeout_seconds=3 * 3600, **NETWORK)
def download(request: BuildRequest) -> Snapshot:
    """Pin the revision to a commit sha and fetch safetensors + config + tokenizer (huggingface_hub caches)."""
    from kiln.hub import fetch_model

    with progress.step("download", getattr(request.model, "repo_id", None) or str(request.model.local_dir)) as ev:
        snap = fetch_model(request.model)
        # model-dependent pre-flight (tp vs heads, memory) once the snapshot is known: before any calibration
        from kiln.hub import inspect_model
        from kiln.preflight import check_model

        check_model(request, inspect_model(Path(snap.path)), source=request.name)
        ev.note = f"sha {snap.sha[:12]}"
        return Snapshot(path=Path(snap.path), sha=snap.sha, source=str(snap.source),
                        repo_id=getattr(snap, "repo_id", None), revision=getattr(snap, "revision", None))


@task(name="calibration-data", timeout_seconds=3600, **LOCAL)
def calibration_data(request: BuildRequest, snapshot: Snapshot) -> Datasets:
    """Tokenise each recipe's calibration samples and the held-out text (checked disjoint from them)."""
    from kiln.calibration import calibration_set, check_disjoint, heldout_set
    from kiln.hub import load_tokenizer

    with progress.step("data", f"{len(request.recipes)} recipe(s)"):
        tokenizer = load_tokenizer(snapshot.path)
        calibration = {recipe.name: calibration_set(recipe.calibration, tokenizer)
                       for recipe in request.recipes if _needs_calibration(recipe)}
        heldout = heldout_set(request.evaluation, tokenizer)
        for samples in calibration.values():
            check_disjoint(heldout, samples, tokenizer=tokenizer)
        return Datasets(calibration=calibration, heldout=heldout)


def _needs_calibration(recipe: Recipe) -> bool:
    from kiln.quantize import needs_calibration

    return needs_calibration(recipe)


def checkpoint_key(snapshot: Snapshot, recipe: Recipe, calibration_sha256: str | None,
                   layouts: list[str], dtype: str, formats: list[str] | tuple[str, ...] = ("trtllm",)) -> str:
    """Content key of a checkpoint: only what changes the weights or the exports (not the recipe's name,
    gates, or an unused calibration spec), so a ``none`` recipe shares the baseline's checkpoint."""
    return cache.build_key(step="quantize", model_sha=snapshot.sha, recipe=_weight_inputs(recipe),
                           calibration_sha256=calibration_sha256, layouts=sorted(layouts), dtype=dtype,
                           formats=sorted(formats), toolchain=cache.toolchain_versions())


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
    if _needs_calibration(recipe):
        inputs["calibration"] = recipe.calibration.model_dump(mode="json")
    return inputs


@task(name="calibrate-and-quantize", timeout_seconds=6 * 3600, **LOCAL)
def calibrate_and_quantize(request: BuildRequest, snapshot: Snapshot, recipe: Recipe, data: Datasets) -> Checkpoint:
    """Calibrate once per recipe (ModelOpt) and export a TensorRT-LLM checkpoint per (tp, pp) of the targets.

    With a ``max_ppl_increase_pct`` gate the fake-quant perplexity is checked first: a recipe over it is
    exported nowhere and comes back with ``gate_failures`` (its targets are reported, never compiled).
    """
    from kiln.families import family_for
    from kiln.hub import inspect_model
    from kiln.quantize import quantize

    layouts = sorted({layout_name(t) for t in request.targets})
    calibration = data.calibration.get(recipe.name)
    cal_sha = getattr(calibration, "sha256", None)
    dtype = _checkpoint_dtype(request)
    formats = export_formats(request, family_for(inspect_model(snapshot.path).architecture))
    key = checkpoint_key(snapshot, recipe, cal_sha, layouts, dtype, formats)
    pairs = [(t.limits.tp_size, t.limits.pp_size) for t in request.targets]
    limit = checkpoint_gate(request, recipe)
    heldout = data.heldout if limit is not None else None  # no gate: no perplexity passes to pay for

    def compute(output_dir: Path) -> Checkpoint:
        lineage = {"model_sha": snapshot.sha, "repo_id": snapshot.repo_id, "recipe": recipe.name, "build_key": key}
        try:
            result = quantize(snapshot.path, recipe, layouts=sorted(set(pairs)), output_dir=output_dir, dtype=dtype,
                              device=_quantize_device(request), lineage=lineage, calibration=calibration,
                              formats=formats, heldout=heldout, max_ppl_increase_pct=limit)
        except GateFailedError as exc:
            measured = getattr(exc, "perplexity", None)
            if measured is None:
                raise
            # cached as a refusal with its numbers: a rerun gives the same verdict without recalibrating
            return Checkpoint(recipe.name, key, {}, None, cal_sha, perplexity=measured)
        return Checkpoint(recipe.name, key, {k: Path(v) for k, v in result.trtllm_dirs.items()},
                          Path(result.hf_dir) if getattr(result, "hf_dir", None) else None,
                          getattr(result, "calibration_sha256", cal_sha), perplexity=result.perplexity)

    def answers(cached: Checkpoint) -> bool:
        # the key leaves gates out (they do not change weights): a stored entry serves when it holds what
        # this run's gate needs; a refusal serves only a gate it still fails, or the recipe recalibrates
        if heldout is None:
            return cached.exported
        ppl = cached.perplexity
        if ppl is None or ppl.heldout_sha256 != getattr(heldout, "sha256", None):
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
        return _with_reused(hit.value, hit.reused, recipe=recipe.name, gate_failures=tuple(failures))


def checkpoint_gate(request: BuildRequest, recipe: Recipe) -> float | None:
    """The recipe's ``max_ppl_increase_pct``, checked on the checkpoint before export; None: no such gate,
    or nothing to check (a recipe that quantizes neither weights nor KV cache is the baseline itself)."""
    if recipe.quantization == "none" and recipe.kv_cache_dtype == "auto":
        return None
    return request.gates_for(recipe).max_ppl_increase_pct


def checkpoint_gate_failures(perplexity: Perplexity | None, limit: float | None) -> list[str]:
    """The checkpoint gate's verdict as validation words it (``kiln.validation.gates``), marked ``checkpoint``."""
    if limit is None:
        return []
    from kiln.validation.gates import decide

    metrics = {} if perplexity is None else {"ppl_increase_pct": perplexity.increase_pct}
    verdict = decide(Gates(max_ppl_increase_pct=limit), metrics)
    if perplexity is None:
        return [f"checkpoint {m}" for m in verdict.messages]
    return [f"checkpoint {m}: fake-quant perplexity {perplexity.quantized:.4g} vs unquantized "
            f"{perplexity.baseline:.4g} on {perplexity.num_tokens} held-out tokens" for m in verdict.messages]


def gate_failed(checkpoint: Checkpoint, target: Target) -> Outcome:
    """The outcome of a recipe its checkpoint gate refused, on one target: reported, nothing compiled."""
    with progress.step("compile", f"{checkpoint.recipe} x {target.name}") as ev:
        ev.status, ev.note = "skipped", checkpoint.verdict
    return Outcome(checkpoint.recipe, target.name, "failed-gates", checkpoint.verdict, checkpoint.metrics())


def _checkpoint_dtype(request: BuildRequest) -> str:
    # one export serves every target: float32 only when a target computes in it, else the GPUs' dtype
    dtypes = {t.dtype for t in request.targets}
    return "float32" if "float32" in dtypes else ("bfloat16" if "bfloat16" in dtypes else "float16")


def _quantize_device(request: BuildRequest) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and any(t.device == "cuda" for t in request.targets) else "cpu"


def _with_reused(value: Any, reused: bool, **names: Any) -> Any:
    from dataclasses import replace

    return replace(value, reused=reused, **names)


def engine_key(checkpoint: Checkpoint, target: Target) -> str:
    """Content key of an engine: its checkpoint's key, the target (minus where it is scheduled), toolchain."""
    return cache.build_key(step="compile", checkpoint=checkpoint.key,
                           target=target.model_dump(exclude={"work_pool", "optional"}),
                           toolchain=cache.toolchain_versions())


@task(name="compile", timeout_seconds=4 * 3600, **LOCAL)
def compile_engine(checkpoint: Checkpoint, target: Target, snapshot: Snapshot) -> EngineRef:
    """Build (or reuse) the engine for one checkpoint on one target; it carries the model's tokenizer."""
    from kiln.engine.base import get_backend

    key = engine_key(checkpoint, target)  # the model sha is inside the checkpoint's key

    def compute(output_dir: Path) -> EngineRef:
        backend = get_backend(target.backend)
        # model_dir: where backends take the tokenizer from; hf_dir: the HF export `hf_checkpoint` targets publish
        lineage = {"model_sha": snapshot.sha, "repo_id": snapshot.repo_id, "revision": snapshot.revision,
                   "checkpoint_key": checkpoint.key, "recipe": checkpoint.recipe, "build_key": key,
                   "model_dir": str(snapshot.path), "hf_dir": str(checkpoint.hf_dir) if checkpoint.hf_dir else None}
        engine_dir = backend.compile(checkpoint.dir_for(target), target, output_dir, lineage)
        return EngineRef(checkpoint.recipe, target.name, key, Path(engine_dir))

    with progress.step("compile", f"{checkpoint.recipe} x {target.name}") as ev:
        hit = cache.StepCache("compile").run(key, compute, EngineRef)
        ev.status = "reused" if hit.reused else "done"
        return _with_reused(hit.value, hit.reused, recipe=checkpoint.recipe, target=target.name)
