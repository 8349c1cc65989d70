"""Pre-flight checks that run before any expensive step, for every recipe x target pair.

Profile-only checks (``check_request_static``): recipe vs the target's SM (for TensorRT-LLM targets: the
contract's per-SM, per-artifact support facts, ``kiln.engine.trtllm.support``). ``check_request`` adds what
needs the model's shape and the TensorRT-LLM contract: tp/pp vs GPUs per worker and vs the attention
heads, estimated GPU memory (weights + KV cache at the build limits) vs the target's memory, the
recipe's QuantAlgo and the target's artifact vs the contract of the target's TensorRT-LLM series, the
installed ModelOpt (the exporter) vs that series' pin, and whether a local TensorRT-LLM target can run
here at all. ``check_target_on_host`` checks a target against this machine (``kiln doctor --target``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kiln.errors import ContractError, ProfileError, UnsupportedCombinationError
from kiln.profiles import BuildRequest, LocalModel, Recipe, Target
from kiln.recipes import KV_SCHEMES, scheme

if TYPE_CHECKING:
    from kiln.host import HostReport
    from kiln.hub import ModelInfo

GIB = 1024**3
RUNTIME_OVERHEAD_BYTES = 1 * GIB
"""Per-GPU CUDA context, cuBLAS/TensorRT workspaces and runtime buffers (an estimate, not a measurement)."""

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_WEIGHT_BITS = {  # storage bits per quantized linear weight, scales included (TensorRT-LLM checkpoint layout)
    "FP8": 8,
    "W8A8_SQ_PER_CHANNEL": 8,
    "W8A16": 8,
    "W4A16": 4,
    "W4A16_AWQ": 4,
    "W4A8_AWQ": 4,
    "NVFP4": 4.5,
}


@dataclass(frozen=True)
class Finding:
    """One pre-flight result: ``error`` stops the build, ``warning`` is reported, ``ok`` is shown by
    doctor."""

    level: Literal["error", "warning", "ok"]
    check: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: [{self.check}] {self.message}"


def recipe_target_problem(recipe: Recipe, target: Target) -> str | None:
    """Why ``recipe`` cannot run on ``target``, or None when it can.

    A ``tensorrt_llm`` target is checked against the contract's per-SM, per-artifact support facts
    (:func:`kiln.engine.trtllm.support.recipe_problem`: SM ranges with a minimum and a maximum, e.g. no
    INT8/INT4 engines on SM100); a torch target against kiln's own rules (``min_sm`` and the KV caches its
    engine runs).
    """
    quant = scheme(recipe.quantization)
    sm = target.sm_number
    if quant.needs_cuda_to_calibrate and target.device != "cuda":
        return (
            f"{recipe.quantization} needs CUDA to calibrate and run; target {target.name!r} is a cpu target"
        )
    if target.backend == "tensorrt_llm":
        from kiln.engine.trtllm.support import recipe_problem

        return recipe_problem(recipe, target)
    if quant.min_sm is not None and target.device == "cuda" and sm is not None and sm < quant.min_sm:
        return (
            f"{recipe.quantization} needs SM >= {quant.min_sm}; target {target.name!r} is {target.sm}"
            f" ({target.gpu or 'unknown GPU'})"
        )
    kv_algo = KV_SCHEMES[recipe.kv_cache_dtype][1]
    from kiln.engine.torch.spec import KV_CACHE_QUANT_ALGOS

    if kv_algo not in KV_CACHE_QUANT_ALGOS:
        return (
            f"kv_cache_dtype {recipe.kv_cache_dtype} is not supported by the torch backend of target "
            f"{target.name!r} (its KV cache is unquantized or FP8); use kv_cache_dtype fp8 or auto, or a "
            "tensorrt_llm target"
        )
    kv_min_sm = KV_SCHEMES[recipe.kv_cache_dtype][2]
    if kv_min_sm is not None and target.device == "cuda" and sm is not None and sm < kv_min_sm:
        return (
            f"kv_cache_dtype {recipe.kv_cache_dtype} needs SM >= {kv_min_sm}; target {target.name!r} is "
            f"{target.sm}"
        )
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
            f"{source}: {len(problems)} recipe x target pair(s) cannot run:\n  "
            + "\n  ".join(problems)
            + "\nRemove the pair (split the request) or pick a target whose GPU (and, for TensorRT-LLM, "
            "artifact) runs the recipe: docs/TRTLLM_SUPPORT.md lists them."
        )
    if request.evaluation.tasks:  # unknown lm-eval task names fail here, before any engine is built
        from kiln.validation.lm_eval_tasks import task_problems

        if errors := [msg for level, msg in task_problems(request.evaluation) if level == "error"]:
            raise ProfileError(f"{source}: " + "\n  ".join(errors))


# --- memory ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes per GPU of one engine at its build limits (worst case: every slot at max_seq_len)."""

    weights: int
    kv_cache: int
    activations: int
    logits: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.logits + self.runtime

    def describe(self) -> str:
        parts = {
            "weights": self.weights,
            "KV cache": self.kv_cache,
            "activations": self.activations,
            "logits": self.logits,
            "runtime": self.runtime,
        }
        return (
            f"{self.total / GIB:.1f} GiB (" + ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items()) + ")"
        )


def estimate_memory(
    info: ModelInfo, recipe: Recipe, target: Target, *, gather_context_logits: bool = True
) -> MemoryEstimate:
    """Weights (quantized linears, embedding and lm_head in the target dtype) + KV cache for max_batch_size
    sequences of max_seq_len + activations for max_num_tokens + logits, split over tp x pp."""
    limits = target.limits
    tp, pp = limits.tp_size, limits.pp_size
    dtype_bytes = _DTYPE_BYTES[target.dtype]
    embed_params = info.vocab_size * info.hidden_size
    lm_head_params = 0 if info.tie_word_embeddings else embed_params
    linear_params = max(info.param_count - embed_params - lm_head_params, 0)
    quant_algo = scheme(recipe.quantization).quant_algo
    linear_bytes = (
        linear_params * _WEIGHT_BITS.get(quant_algo, dtype_bytes * 8) / 8
        if quant_algo
        else linear_params * dtype_bytes
    )
    # ModelOpt leaves lm_head unquantized and TensorRT-LLM keeps its own copy even for tied embeddings.
    weights = int(linear_bytes / (tp * pp) + 2 * embed_params * dtype_bytes / tp)
    kv_bytes = 1 if recipe.kv_cache_dtype in ("fp8", "int8") else dtype_bytes
    kv_heads_per_gpu = max(info.num_kv_heads // tp, 1)
    layers_per_gpu = -(-info.num_layers // pp)
    kv_cache = (
        2
        * layers_per_gpu
        * kv_heads_per_gpu
        * info.head_dim
        * kv_bytes
        * limits.max_batch_size
        * limits.max_seq_len
    )
    activations = (
        limits.max_num_tokens * (4 * info.hidden_size + 3 * info.intermediate_size // tp) * dtype_bytes
    )
    logit_rows = limits.max_num_tokens if gather_context_logits else limits.max_batch_size
    logits = logit_rows * info.vocab_size * 4
    return MemoryEstimate(
        weights=weights,
        kv_cache=kv_cache,
        activations=activations,
        logits=logits,
        runtime=RUNTIME_OVERHEAD_BYTES,
    )


# --- per-target checks --------------------------------------------------------------------------------------


def _pair(recipe: Recipe | None, target: Target) -> str:
    return f"recipe {recipe.name!r} x target {target.name!r}" if recipe else f"target {target.name!r}"


def parallelism_findings(target: Target, info: ModelInfo | None) -> list[Finding]:
    """tp x pp must fit one worker's GPUs; tp must split the attention heads; pp must split the layers."""
    limits, subject, found = target.limits, _pair(None, target), []
    world = limits.tp_size * limits.pp_size
    if world > target.gpus_per_worker:
        found.append(
            Finding(
                "error",
                "parallelism",
                subject,
                f"tp_size {limits.tp_size} x pp_size {limits.pp_size} = {world} GPUs, but gpus_per_worker is "
                f"{target.gpus_per_worker}: raise gpus_per_worker (a bigger worker) or lower tp/pp",
            )
        )
    if info is None:
        return found
    tp = limits.tp_size
    if info.num_heads % tp:
        found.append(
            Finding(
                "error",
                "parallelism",
                subject,
                f"tp_size {tp} does not divide the model's {info.num_heads} attention heads; use a divisor "
                f"of {info.num_heads}",
            )
        )
    if info.num_kv_heads % tp and tp % info.num_kv_heads:
        found.append(
            Finding(
                "error",
                "parallelism",
                subject,
                f"tp_size {tp} neither divides nor is a multiple of the model's {info.num_kv_heads} KV heads "
                "(TensorRT-LLM splits or replicates KV heads); pick tp accordingly",
            )
        )
    if limits.pp_size > info.num_layers:
        found.append(
            Finding(
                "error",
                "parallelism",
                subject,
                f"pp_size {limits.pp_size} is more than the model's {info.num_layers} layers",
            )
        )
    return found


def _multi_rank_torch_findings(target: Target) -> list[Finding]:
    """A build validates each torch engine in one process; a tp x pp > 1 torch engine needs one per rank."""
    ranks = target.limits.tp_size * target.limits.pp_size
    if target.backend != "torch" or ranks == 1:
        return []
    return [
        Finding(
            "error",
            "parallelism",
            _pair(None, target),
            f"tp_size {target.limits.tp_size} x pp_size {target.limits.pp_size}: a torch engine of {ranks} "
            "ranks runs one process per rank, which `kiln build` does not launch to validate it; build it "
            f"with `kiln quantize --tp {target.limits.tp_size} --pp {target.limits.pp_size}` + `kiln "
            f"compile` and run it with `torchrun --nproc-per-node {ranks} kiln generate ENGINE_DIR`, or set "
            "tp_size and pp_size to 1 for this target",
        )
    ]


def memory_findings(recipe: Recipe, target: Target, info: ModelInfo) -> list[Finding]:
    if target.device != "cuda" or target.gpu_memory_gib is None:
        return []
    estimate = estimate_memory(info, recipe, target, gather_context_logits=target.artifact == "engine")
    capacity = target.gpu_memory_gib * GIB
    subject = _pair(recipe, target)
    if estimate.total > capacity:
        return [
            Finding(
                "error",
                "memory",
                subject,
                f"needs about {estimate.describe()} per GPU at the build limits, the target's GPU has "
                f"{target.gpu_memory_gib:g} GiB: lower limits.max_batch_size / max_seq_len, use "
                "kv_cache_dtype fp8, a smaller-weight recipe, or raise tp_size",
            )
        ]
    return [
        Finding("ok", "memory", subject, f"estimated {estimate.describe()} of {target.gpu_memory_gib:g} GiB")
    ]


def contract_findings(recipe: Recipe, target: Target, *, modelopt_version: str | None) -> list[Finding]:
    """The recipe's QuantAlgo and the target's artifact vs the contract of the target's TensorRT-LLM series,
    and the exporting ModelOpt vs that series' pin. Being a QuantAlgo name says nothing about where it runs:
    that is ``recipe_target_problem``'s check, from the contract's per-artifact, per-SM ``support`` facts."""
    if target.backend != "tensorrt_llm":
        return []
    from kiln.engine.trtllm import api

    subject = _pair(recipe, target)
    contract = api.load_contract(api.default_series(target))
    found = []
    if target.artifact == "engine" and not contract.engine_path:
        found.append(
            Finding(
                "error",
                "contract",
                subject,
                f"TensorRT-LLM {contract.series} serves HF checkpoints with its PyTorch backend; the "
                "TensorRT engine path is gone: set artifact: hf_checkpoint, or tensorrt_llm_version 1.2.x",
            )
        )
    quant_algo = scheme(recipe.quantization).quant_algo
    if quant_algo and quant_algo not in contract.quant_algos():
        found.append(
            Finding(
                "error",
                "contract",
                subject,
                f"quant_algo {quant_algo} is not a QuantAlgo of TensorRT-LLM {contract.series} "
                f"({contract.source})",
            )
        )
    kv_algo = KV_SCHEMES[recipe.kv_cache_dtype][1]
    if kv_algo and kv_algo not in contract.kv_cache_quant_algos():
        found.append(
            Finding(
                "error",
                "contract",
                subject,
                f"kv_cache_quant_algo {kv_algo} is not supported by TensorRT-LLM {contract.series}",
            )
        )
    if quant_algo and modelopt_version:
        found += _pin_findings(
            "nvidia-modelopt", modelopt_version, contract, subject, role="exports the checkpoint"
        )
    return found


def _pin_findings(package: str, installed: str, contract: Any, subject: str, *, role: str) -> list[Finding]:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    pin = contract.pin(package)
    if pin is None:
        return [
            Finding(
                "warning",
                "pins",
                subject,
                f"TensorRT-LLM {contract.series}'s pin for {package} is unknown; "
                f"{package} {installed} {role}",
            )
        ]
    try:
        version, spec = Version(installed), SpecifierSet(pin)
    except (InvalidVersion, ValueError):
        return [Finding("warning", "pins", subject, f"cannot compare {package} {installed} with pin {pin}")]
    if version in spec:
        return [
            Finding(
                "ok",
                "pins",
                subject,
                f"{package} {installed} matches TensorRT-LLM {contract.series}'s pin {pin}",
            )
        ]
    floors = [Version(s.version) for s in spec if s.operator in (">=", "~=", "==", ">")]
    if floors and version < max(floors):
        return [
            Finding(
                "error",
                "pins",
                subject,
                f"{package} {installed} {role} but is older than TensorRT-LLM {contract.series} pins "
                f"({pin}): upgrade {package}",
            )
        ]
    return [
        Finding(
            "warning",
            "pins",
            subject,
            f"{package} {installed} {role} and is newer than TensorRT-LLM {contract.series} pins ({pin}); "
            "kiln checks the checkpoint keys it writes against the contract instead",
        )
    ]


def backend_findings(target: Target) -> list[Finding]:
    """A target that runs in this process must be buildable here: a TensorRT-LLM target needs TensorRT-LLM,
    a torch cuda target a GPU of its SM (optional ones are skipped)."""
    if target.backend == "torch" and target.device == "cuda":
        from kiln.host import collect

        problems = [f for f in host_findings(target, collect()) if f.level == "error"]
        if not problems:
            return []
        why = "; ".join(f.message for f in problems)
        if target.optional:
            return [
                Finding("warning", "backend", _pair(None, target), f"{why} (optional: it will be skipped)")
            ]
        return [
            Finding(
                "error",
                "backend",
                _pair(None, target),
                f"{why}; this build runs its targets in this process: run it with --dispatch deployments "
                "(each target on its work pool) or on a machine with that GPU",
            )
        ]
    if target.backend != "tensorrt_llm":
        return []
    from kiln.engine.trtllm.backend import unavailable_message, unavailable_reason

    why = unavailable_reason(target)
    if why is None:
        return []
    if target.optional:
        return [Finding("warning", "backend", _pair(None, target), f"{why} (optional: it will be skipped)")]
    return [Finding("error", "backend", _pair(None, target), unavailable_message(target, why))]


def _model_info(request: BuildRequest, model_info: ModelInfo | None) -> ModelInfo | None:
    if model_info is not None:
        return model_info
    if isinstance(request.model, LocalModel) and Path(request.model.local_dir).is_dir():
        from kiln.hub import inspect_model

        return inspect_model(request.model.local_dir)
    return None


def request_findings(
    request: BuildRequest, *, model_info: ModelInfo | None = None, local_targets: bool = True
) -> list[Finding]:
    """Every finding for every recipe x target pair of ``request`` (model checks need a local dir or
    ``model_info``)."""
    from kiln.host import package_version

    info = _model_info(request, model_info)
    modelopt_version = package_version("nvidia-modelopt")
    found: list[Finding] = []
    if (
        request.evaluation.tasks
    ):  # lm-eval task names: unknown ones fail here, not after the engines are built
        from kiln.validation.lm_eval_tasks import task_problems

        found += [
            Finding(level, "tasks", "evaluation", msg) for level, msg in task_problems(request.evaluation)
        ]
    for target in request.targets:
        found += parallelism_findings(target, info) + _multi_rank_torch_findings(target)
        if local_targets:
            found += backend_findings(target)
        for recipe in request.recipes:
            found += pair_findings(recipe, target, info, modelopt_version=modelopt_version)
    return found


def pair_findings(
    recipe: Recipe, target: Target, info: ModelInfo | None, *, modelopt_version: str | None
) -> list[Finding]:
    """One recipe on one target: SM first (nothing else matters if it fails), then the model's family,
    contract and memory."""
    if why := recipe_target_problem(recipe, target):
        return [Finding("error", "sm", _pair(recipe, target), why)]
    found = contract_findings(recipe, target, modelopt_version=modelopt_version)
    if info is not None:
        found = family_findings(recipe, target, info) + found + memory_findings(recipe, target, info)
    return found


def family_findings(recipe: Recipe, target: Target, info: ModelInfo) -> list[Finding]:
    """What the model's family (``kiln.families``) allows: the recipe (what ModelOpt quantizes and exports
    for it), the artifact (no TensorRT-LLM checkpoint for an HF-export-only family), the layout (an HF
    export is unsharded) and, for TensorRT-LLM targets, the architectures its contract lists per artifact."""
    from kiln.families import family_for

    family, subject = family_for(info.architecture), _pair(recipe, target)
    found = []
    if why := family.recipe_problem(recipe.quantization):
        found.append(Finding("error", "family", subject, why))
    hf_only = "trtllm" not in family.exports
    if hf_only and target.backend == "tensorrt_llm" and target.artifact == "engine":
        found.append(
            Finding(
                "error",
                "family",
                subject,
                f"{info.architecture} ({family.name}): ModelOpt exports no TensorRT-LLM checkpoint for this "
                "family, so trtllm-build has nothing to build; set artifact: hf_checkpoint (TensorRT-LLM's "
                "PyTorch backend) or use a torch target",
            )
        )
    if hf_only and target.limits.tp_size * target.limits.pp_size > 1:
        found.append(
            Finding(
                "error",
                "family",
                subject,
                f"{family.name} compiles from ModelOpt's unified HF export, which is unsharded: set tp_size "
                "and pp_size to 1 for this target",
            )
        )
    if target.backend == "tensorrt_llm":
        found += _contract_architecture_findings(recipe, target, info.architecture, family.moe)
    return found


def _contract_architecture_findings(
    recipe: Recipe, target: Target, architecture: str, moe: bool
) -> list[Finding]:
    from kiln.engine.trtllm import api

    contract = api.load_contract(api.default_series(target))
    facts = contract.data.get("architectures") or {}
    subject, found = _pair(recipe, target), []
    entry = (facts.get(target.artifact) or {}).get(architecture)
    where = f"TensorRT-LLM {contract.series} ({contract.source}: architectures.{target.artifact})"
    if entry is None or entry.get("supported") is None:
        found.append(
            Finding(
                "warning",
                "contract",
                subject,
                f"{where} does not confirm {architecture}; "
                "UNVERIFIED in kiln's contract, so the build may fail on the TensorRT-LLM worker",
            )
        )
    elif not entry["supported"]:
        found.append(
            Finding(
                "error",
                "contract",
                subject,
                f"{where} has no {architecture}: {entry.get('note') or ''} "
                f"({entry.get('evidence')}); use a torch target or another artifact",
            )
        )
    elif (entry.get("modelopt_export") or {}).get("status") == "exports_but_likely_unbuildable":
        found.append(
            Finding(
                "warning",
                "contract",
                subject,
                f"{where}: ModelOpt's checkpoint of {architecture} was "
                "not seen built by trtllm-build (UNVERIFIED); kiln adds the config keys TensorRT-LLM reads",
            )
        )
    quant_algo = scheme(recipe.quantization).quant_algo
    moe_algos = (facts.get("moe_quant_algos") or {}).get(target.artifact) or {}
    if moe and quant_algo and quant_algo in moe_algos and moe_algos[quant_algo].get("supported") is False:
        found.append(
            Finding(
                "error",
                "contract",
                subject,
                f"{where}: its fused MoE has no {quant_algo} experts "
                f"({moe_algos[quant_algo].get('evidence')}); use fp8 for this target",
            )
        )
    return found


def check_request(
    request: BuildRequest,
    source: str = "<request>",
    *,
    model_info: ModelInfo | None = None,
    local_targets: bool = True,
) -> list[Finding]:
    """Raise ``UnsupportedCombinationError`` naming every problem; return the warnings and passed checks.

    ``local_targets``: targets run in this process (the embedded default), so a non-optional TensorRT-LLM
    target fails here when TensorRT-LLM is missing; pass False when targets go to their work pools.
    """
    found = request_findings(request, model_info=model_info, local_targets=local_targets)
    errors = [f for f in found if f.level == "error"]
    if errors:
        raise UnsupportedCombinationError(
            f"{source}: pre-flight found {len(errors)} problem(s) before any work:\n  "
            + "\n  ".join(map(str, errors))
        )
    return [f for f in found if f.level != "error"]


def check_model(request: BuildRequest, model_info: ModelInfo, source: str = "<request>") -> list[Finding]:
    """The model-dependent checks for a hub model, once its snapshot is known (before quantization)."""
    return check_request(request, source, model_info=model_info, local_targets=False)


# --- this machine -------------------------------------------------------------------------------------------


def host_findings(target: Target, host: HostReport) -> list[Finding]:
    """Can this machine build and run ``target``: GPU SM, memory and count, and the TensorRT-LLM toolchain."""
    subject, found = _pair(None, target), []
    if target.device == "cuda":
        if not host.gpus:
            found.append(
                Finding(
                    "error",
                    "gpu",
                    subject,
                    f"no CUDA GPU here; target {target.name!r} runs on a worker of "
                    f"work pool {target.work_pool!r}",
                )
            )
        else:
            gpu = host.gpus[0]
            if target.sm and gpu.sm_name != target.sm:
                found.append(
                    Finding(
                        "error",
                        "gpu",
                        subject,
                        f"this machine's GPU is {gpu.name} ({gpu.sm_name}); the target is {target.sm}. "
                        "Engines are tied to the SM they are built on: run it on work pool "
                        f"{target.work_pool!r}",
                    )
                )
            else:
                found.append(
                    Finding("ok", "gpu", subject, f"{gpu.name} ({gpu.sm_name}, {gpu.memory_gib:g} GiB)")
                )
            if target.gpu_memory_gib and gpu.memory_gib < target.gpu_memory_gib * 0.95:
                found.append(
                    Finding(
                        "error",
                        "gpu",
                        subject,
                        f"{gpu.name} has {gpu.memory_gib:g} GiB, the target assumes "
                        f"{target.gpu_memory_gib:g} GiB: fix gpu_memory_gib or run on the target's GPUs",
                    )
                )
            if len(host.gpus) < target.gpus_per_worker:
                found.append(
                    Finding(
                        "error",
                        "gpu",
                        subject,
                        f"{len(host.gpus)} GPU(s) here, the target needs "
                        f"gpus_per_worker {target.gpus_per_worker}",
                    )
                )
    if target.backend == "tensorrt_llm":
        found += _trtllm_host_findings(target, host)
    return found


def _trtllm_host_findings(target: Target, host: HostReport) -> list[Finding]:
    from kiln.engine.trtllm import api
    from kiln.engine.trtllm.backend import unavailable_message

    subject, trt = _pair(None, target), host.tensorrt_llm
    if not trt.importable or not trt.version:
        return [Finding("error", "backend", subject, unavailable_message(target, trt.why))]
    try:
        contract = api.contract_for(trt.version)
    except ContractError as exc:
        return [Finding("error", "contract", subject, str(exc))]
    found = [Finding("ok", "backend", subject, f"tensorrt_llm {trt.version} (contract {contract.source})")]
    if target.tensorrt_llm_version and api.series_for(target.tensorrt_llm_version) != contract.series:
        found.append(
            Finding(
                "error",
                "contract",
                subject,
                f"target expects TensorRT-LLM {target.tensorrt_llm_version}, this machine has {trt.version}",
            )
        )
    if target.artifact == "engine" and not contract.engine_path:
        found.append(
            Finding(
                "error",
                "contract",
                subject,
                f"TensorRT-LLM {trt.version} has no engine path: use artifact: hf_checkpoint",
            )
        )
    if target.artifact == "engine" and not trt.trtllm_build:
        found.append(
            Finding("error", "backend", subject, "trtllm-build is not on PATH (it ships with tensorrt_llm)")
        )
    if missing := api.missing_uses(contract):
        found.append(
            Finding(
                "error", "contract", subject, f"{contract.source} lacks what kiln uses: {', '.join(missing)}"
            )
        )
    from kiln.host import package_version

    for package in ("torch", "transformers", "nvidia-modelopt"):
        if installed := package_version(package):
            found += _pin_findings(package, installed, contract, subject, role="is installed")
    return found


def check_target_on_host(
    target: Target,
    host: HostReport,
    *,
    recipes: tuple[Recipe, ...] | list[Recipe] = (),
    model_info: ModelInfo | None = None,
) -> list[Finding]:
    """Everything ``kiln doctor --target`` checks: this machine vs the target, tp x pp, and each recipe on
    it."""
    from kiln.host import package_version

    found = host_findings(target, host) + parallelism_findings(target, model_info)
    modelopt_version = package_version("nvidia-modelopt")
    for recipe in recipes:
        found += pair_findings(recipe, target, model_info, modelopt_version=modelopt_version)
    return found
