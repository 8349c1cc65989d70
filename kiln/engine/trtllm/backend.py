"""``TensorRTLLMBackend``: a checkpoint -> an artifact NVIDIA's runtime serves, and that artifact -> a running
engine.

Two artifacts, chosen by the target (``artifact``):

* ``engine`` (TensorRT-LLM 1.2.x): ``trtllm-build`` turns the TensorRT-LLM checkpoint into ``config.json``
  + ``rank{N}.engine``. kiln runs the CLI as a subprocess rather than the LLM API's build: its flags are
  what the contract pins (``cli.trtllm-build``, read from build.py), the exact argv goes into
  ``kiln-engine.json`` so anyone can rebuild by hand, a builder crash or OOM kills the subprocess and not
  the worker, and ``--workers`` builds ranks in parallel. The LLM API's ``BuildConfig`` field list is not
  in the contract, so kiln does not drive it.
* ``hf_checkpoint`` (TensorRT-LLM >= 1.3, PyTorch backend; the engine path is deprecated there): the
  ModelOpt HF export is validated against the contract and published with the LLM API settings that
  serve it (``llm_api_options.yaml``, also usable as ``--extra_llm_api_options``).

Both write ``kiln-engine.json``: what the artifact itself lacks (GPU name and SM, TensorRT, TensorRT-LLM,
CUDA and driver versions, build limits, checkpoint hash, the build command or serving settings). What
each TensorRT-LLM version accepts lives in :mod:`kiln.engine.trtllm.api`; this module only runs it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln.constants import ENGINE_MANIFEST
from kiln.engine import manifest as engine_manifest
from kiln.engine.base import GenerationRequest, GenerationResult, copy_tokenizer
from kiln.engine.base import SamplingParams as KilnSampling
from kiln.engine.manifest import FORMAT_VERSION, ContractRef, EngineManifest, LlmApi, TrtBuild, TrtCheckpoint
from kiln.engine.trtllm import api
from kiln.errors import (
    BackendUnavailableError,
    ContractError,
    EngineMismatchError,
    GenerationLimitError,
    KilnError,
    ModelSourceError,
    UnsupportedCombinationError,
)
from kiln.profiles import Target

BUILD_LOG = "trtllm-build.log"
LLM_API_OPTIONS = "llm_api_options.yaml"
WORK_POOL_TEMPLATE = "deploy/trtllm-work-pool.json"


# --- where it runs ------------------------------------------------------------------------------------------


def unavailable_reason(target: Target) -> str | None:
    """Why this machine cannot build or run ``target`` with TensorRT-LLM, or None when it can."""
    from kiln.host import gpus, tensorrt_llm_status

    trt = tensorrt_llm_status()
    if not trt.importable or not trt.version:
        return trt.why or "tensorrt_llm is not importable"
    contract = api.contract_for(trt.version)
    if target.artifact == "engine" and not contract.engine_path:
        return (
            f"TensorRT-LLM {trt.version} here has no TensorRT engine path ({contract.source}); the target "
            "wants artifact: engine (TensorRT-LLM 1.2.x) — use artifact: hf_checkpoint or a 1.2.x image"
        )
    if target.artifact == "engine" and not trt.trtllm_build:
        return f"tensorrt_llm {trt.version} imports but trtllm-build is not on PATH"
    found = gpus()
    if not found:
        return "no CUDA GPU is visible"
    sms = sorted({gpu.sm_name for gpu in found})
    if target.sm not in sms:
        return (
            f"this machine's GPUs are {', '.join(sms)} and the target is {target.sm}: engines are tied "
            "to the SM"
        )
    world = target.limits.tp_size * target.limits.pp_size
    if len(found) < world:
        return f"tp_size x pp_size = {world} GPUs wanted, {len(found)} visible"
    return None


def unavailable_message(target: Target, why: str) -> str:
    """The one message a TensorRT-LLM target gives where it cannot run: what is missing and where it runs."""
    return (
        f"target {target.name!r} (backend tensorrt_llm, {target.gpu or 'GPU'} {target.sm}, artifact "
        f"{target.artifact}) cannot run on this machine: {why}. It runs on a worker of work pool "
        f"{target.work_pool!r} started from NVIDIA's TensorRT-LLM container image ({WORK_POOL_TEMPLATE}); "
        "`kiln doctor --target NAME` shows what is missing, and `optional: true` on the target skips it on "
        "machines without TensorRT-LLM instead of failing"
    )


def toolchain() -> dict[str, Any]:
    """Versions an engine is tied to, and the GPU it is built on (first visible one)."""
    from kiln.host import driver_version, gpus, package_version, tensorrt_llm_status

    trt = tensorrt_llm_status()
    found = gpus()
    gpu = found[0] if found else None
    return {
        "tensorrt_llm": trt.version,
        "tensorrt": trt.tensorrt_version or package_version("tensorrt"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": driver_version(),
        "nvidia-modelopt": package_version("nvidia-modelopt"),
        "python": platform.python_version(),
        "gpu_name": gpu.name if gpu else None,
        "gpu_sm": gpu.sm_name if gpu else None,
        "gpu_memory_gib": gpu.memory_gib if gpu else None,
        "gpu_count": len(found),
    }


# --- engine path (1.2) --------------------------------------------------------------------------------------


def read_checkpoint(checkpoint_dir: Path) -> api.CheckpointFacts:
    """The facts ``trtllm-build`` reads from a TensorRT-LLM checkpoint (``config.json`` +
    ``rank{N}.safetensors``)."""
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(
            f"{checkpoint_dir}: no config.json; pass a TensorRT-LLM checkpoint "
            "(ModelOpt export_tensorrt_llm_checkpoint, `kiln quantize`)"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{config_path}: not valid JSON: {exc}") from None
    facts = api.CheckpointFacts.from_config(config, str(config_path))
    missing = [
        f"rank{rank}.safetensors"
        for rank in range(facts.world_size)
        if not (checkpoint_dir / f"rank{rank}.safetensors").is_file()
    ]
    if missing:
        raise ModelSourceError(
            f"{checkpoint_dir}: mapping.world_size is {facts.world_size} but {', '.join(missing)} "
            "is missing; re-export the checkpoint"
        )
    return facts


def checkpoint_tensors(checkpoint_dir: Path, rank: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (safetensors dtype, shape) of one rank file, from its header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(Path(checkpoint_dir) / f"rank{rank}.safetensors"), framework="pt") as handle:
        return {
            name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
            for name in handle.keys()
        }


def check_readable(checkpoint_dir: Path, facts: api.CheckpointFacts, contract: api.Contract) -> None:
    """Refuse a checkpoint that trtllm-build of ``contract``'s series would fail to load (contract
    ``checkpoint_reader``)."""
    checkpoint_dir = Path(checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    problems = []
    for rank in range(facts.world_size):
        problems += [
            f"rank{rank}: {p}" if facts.world_size > 1 else p
            for p in api.checkpoint_problems(config, checkpoint_tensors(checkpoint_dir, rank), contract)
        ]
    if problems:
        raise ContractError(
            f"{checkpoint_dir}: trtllm-build of TensorRT-LLM {contract.series} cannot load this checkpoint "
            f"({contract.source}: checkpoint_reader): " + "; ".join(dict.fromkeys(problems))
        )


def build_command(
    checkpoint_dir: Path,
    output_dir: Path,
    target: Target,
    contract: api.Contract,
    *,
    gather_context_logits: bool = True,
) -> list[str]:
    """The ``trtllm-build`` argv for a checkpoint on ``target``, checked against ``contract``."""
    facts = read_checkpoint(checkpoint_dir)
    if facts.quant_algo and facts.quant_algo not in contract.quant_algos():
        raise ContractError(
            f"{checkpoint_dir}/config.json: quant_algo {facts.quant_algo!r} is not a QuantAlgo of "
            f"TensorRT-LLM {contract.series} ({contract.source})"
        )
    argv = api.trtllm_build_command(
        Path(checkpoint_dir),
        Path(output_dir),
        target,
        facts,
        contract,
        gather_context_logits=gather_context_logits,
    )
    check_readable(checkpoint_dir, facts, contract)
    return argv


def build_engine(
    checkpoint_dir: Path,
    target: Target,
    output_dir: Path,
    lineage: dict,
    contract: api.Contract,
    tools: dict[str, Any],
) -> Path:
    """Run ``trtllm-build`` into a staging dir, check what it wrote, add tokenizer + manifest, rename into
    place."""
    from kiln.engine.trtllm.support import artifact_problem
    from kiln.hub import hash_directory
    from kiln.recipes import sm_number

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    facts = read_checkpoint(checkpoint_dir)
    if why := artifact_problem(
        contract,
        "engine",
        facts.quant_algo,
        facts.kv_cache_quant_algo,
        sm_number(tools.get("gpu_sm") or target.sm),
    ):
        raise UnsupportedCombinationError(
            f"{checkpoint_dir}: trtllm-build would fail for target {target.name!r}: {why}"
        )
    with _staging(output_dir) as staging:
        argv = build_command(checkpoint_dir, staging, target, contract)
        log_path = staging / BUILD_LOG
        started = time.perf_counter()
        with log_path.open("w") as log:
            code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        seconds = time.perf_counter() - started
        if code != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise KilnError(
                f"trtllm-build exited with {code} for target {target.name!r} after {seconds:.0f}s; "
                f"command: {' '.join(argv)}\nlast lines of its log:\n{tail}"
            )
        check_engine_dir(staging, facts.world_size, contract)
        tokenizer = copy_tokenizer(
            staging,
            [lineage.get("tokenizer_dir"), lineage.get("model_dir"), lineage.get("hf_dir"), checkpoint_dir],
        )
        build = TrtBuild(
            # the command names the staging dir; record the final one so it can be re-run as written
            command=[str(output_dir) if str(a) == str(staging) else str(a) for a in argv],
            seconds=round(seconds, 1),
            gather_context_logits="--gather_context_logits" in argv,
            # what trtllm-build builds, which the argv states explicitly (contract build_logic)
            plugins=api.attention_plugins(facts, target.sm_number, contract).to_dict(),
            checkpoint_dir=str(checkpoint_dir),
            checkpoint=TrtCheckpoint(
                architecture=facts.architecture,
                dtype=facts.dtype,
                tp_size=facts.tp_size,
                pp_size=facts.pp_size,
                producer=facts.producer,
            ),
        )
        engine_manifest.write(
            staging,
            _manifest(
                target,
                contract,
                tools,
                lineage,
                artifact="engine",
                quant_algo=facts.quant_algo,
                kv_cache_quant_algo=facts.kv_cache_quant_algo,
                checkpoint_sha256=hash_directory(checkpoint_dir),
                tokenizer=tokenizer,
                build=build,
            ),
        )
    return output_dir


def check_engine_dir(engine_dir: Path, world_size: int, contract: api.Contract) -> dict[str, Any]:
    """What ``trtllm-build`` must have written: ``config.json`` with the contract's top-level keys, one engine
    per rank."""
    config_path = Path(engine_dir) / "config.json"
    if not config_path.is_file():
        raise KilnError(f"{engine_dir}: trtllm-build finished but wrote no config.json; see {BUILD_LOG}")
    config = json.loads(config_path.read_text())
    if missing := [k for k in api.ENGINE_CONFIG_KEYS_USED if k not in config]:
        raise ContractError(
            f"{config_path}: lacks {missing}, which TensorRT-LLM {contract.series} writes "
            f"({contract.source}: engine_dir.config_json_top_level)"
        )
    engines = [api.ENGINE_FILE.format(rank=rank) for rank in range(world_size)]
    if absent := [name for name in engines if not (Path(engine_dir) / name).is_file()]:
        raise KilnError(f"{engine_dir}: trtllm-build wrote no {', '.join(absent)}; see {BUILD_LOG}")
    return config


# --- checkpoint path (>= 1.3) -------------------------------------------------------------------------------


def read_hf_quantization(hf_dir: Path, contract: api.Contract) -> tuple[str | None, str | None]:
    """``(quant_algo, kv_cache_quant_algo)`` of a ModelOpt HF export (None, None: unquantized), checked
    against the contract: TensorRT-LLM's PyTorch backend reads ``hf_quant_config.json`` when present."""
    path = Path(hf_dir) / contract.hf_quant_config_file()
    if not path.is_file():
        config = json.loads((Path(hf_dir) / "config.json").read_text())
        if config.get("quantization_config"):
            raise ModelSourceError(
                f"{hf_dir}: config.json has a quantization_config but there is no {path.name}; "
                "kiln publishes ModelOpt exports (modelopt.torch.export.export_hf_checkpoint)"
            )
        return None, None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{path}: not valid JSON: {exc}") from None
    return api.check_hf_quant_config(data, str(path), contract)


def package_hf_checkpoint(
    hf_dir: Path,
    target: Target,
    output_dir: Path,
    lineage: dict,
    contract: api.Contract,
    tools: dict[str, Any] | None = None,
) -> Path:
    """Validate a quantized HF checkpoint for ``target`` and publish it with its serving settings."""
    from kiln.hub import hash_directory, inspect_model

    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    info = inspect_model(hf_dir)  # refuses pickle-only dirs and unsupported architectures
    limits = target.limits
    if info.max_position_embeddings and limits.max_seq_len > info.max_position_embeddings:
        raise UnsupportedCombinationError(
            f"target {target.name!r}: limits.max_seq_len {limits.max_seq_len} exceeds the "
            f"model's max_position_embeddings {info.max_position_embeddings}"
        )
    if info.num_heads % limits.tp_size:
        raise UnsupportedCombinationError(
            f"target {target.name!r}: tp_size {limits.tp_size} does not divide the "
            f"model's {info.num_heads} attention heads"
        )
    quant_algo, kv_algo = read_hf_quantization(hf_dir, contract)
    from kiln.engine.trtllm.support import artifact_problem
    from kiln.recipes import sm_number

    if why := artifact_problem(
        contract, "hf_checkpoint", quant_algo, kv_algo, sm_number((tools or {}).get("gpu_sm") or target.sm)
    ):
        raise UnsupportedCombinationError(
            f"{hf_dir}: TensorRT-LLM's PyTorch backend cannot serve it on target {target.name!r}: {why}"
        )
    settings = api.serving_settings(target, contract)
    with _staging(output_dir) as staging:
        for item in hf_dir.iterdir():
            if item.is_file() and item.name not in (ENGINE_MANIFEST, LLM_API_OPTIONS):
                shutil.copy2(item, staging / item.name)
        (staging / LLM_API_OPTIONS).write_text(
            "# TensorRT-LLM LLM API settings kiln validated this checkpoint with; pass them as "
            "LLM(model=DIR, **these)\n# or `trtllm-serve DIR --extra_llm_api_options llm_api_options.yaml`.\n"
            + yaml.safe_dump(settings)
        )
        llm_api = LlmApi(
            llm_class=contract.llm_class("hf_checkpoint"), settings=settings, options_file=LLM_API_OPTIONS
        )
        engine_manifest.write(
            staging,
            _manifest(
                target,
                contract,
                tools or toolchain(),
                lineage,
                artifact="hf_checkpoint",
                quant_algo=quant_algo,
                kv_cache_quant_algo=kv_algo,
                checkpoint_sha256=hash_directory(hf_dir),
                tokenizer=str(hf_dir),
                llm_api=llm_api,
            ),
        )
    return output_dir


def _hf_dir(checkpoint_dir: Path, lineage: dict) -> Path:
    """The HF export to publish: ``checkpoint_dir`` when it is one, else the lineage's ``hf_dir``."""
    for candidate in (checkpoint_dir, lineage.get("hf_dir")):
        if candidate and (Path(candidate) / "config.json").is_file():
            config = json.loads((Path(candidate) / "config.json").read_text())
            if config.get("architectures"):
                return Path(candidate)
    raise ModelSourceError(
        f"{checkpoint_dir}: not an HF checkpoint (config.json without 'architectures'). A target "
        "with artifact: hf_checkpoint needs ModelOpt's export_hf_checkpoint output: pass that dir, or "
        "lineage['hf_dir']"
    )


# --- shared -------------------------------------------------------------------------------------------------


def _manifest(
    target: Target,
    contract: api.Contract,
    tools: dict[str, Any],
    lineage: dict,
    *,
    artifact: str,
    quant_algo: str | None,
    kv_cache_quant_algo: str | None,
    checkpoint_sha256: str,
    tokenizer: str | None,
    build: TrtBuild | None = None,
    llm_api: LlmApi | None = None,
) -> EngineManifest:
    sections = {"build": build} if artifact == "engine" else {"llm_api": llm_api}
    return EngineManifest(
        format_version=FORMAT_VERSION,
        backend="tensorrt_llm",
        artifact=artifact,
        target=target.name,
        device="cuda",
        sm=tools.get("gpu_sm") or target.sm,
        gpu=target.gpu,
        dtype=target.dtype,
        quant_algo=quant_algo,
        kv_cache_quant_algo=kv_cache_quant_algo,
        limits=target.limits,
        toolchain=tools,
        contract=ContractRef(series=contract.series, source=contract.source),
        model_sha=lineage.get("model_sha") or lineage.get("sha"),
        checkpoint_sha256=checkpoint_sha256,
        tokenizer=tokenizer,
        lineage=lineage,
        **sections,
    )


@contextmanager
def _staging(output_dir: Path) -> Iterator[Path]:
    """A sibling temp dir that replaces ``output_dir`` only if the block succeeds."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        yield staging
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_loadable(manifest: EngineManifest, engine_dir: Path, tools: dict[str, Any]) -> None:
    """Refuse an engine built by another TensorRT-LLM/TensorRT or for another SM, naming both sides."""
    if manifest.artifact != "engine":
        return  # an HF checkpoint is portable across GPUs and versions the contract allows
    built = manifest.toolchain
    for key in ("tensorrt_llm", "tensorrt"):
        if built.get(key) and tools.get(key) and built[key] != tools[key]:
            raise EngineMismatchError(
                f"{engine_dir}: built with {key} {built[key]}, this machine has {tools[key]}: "
                "TensorRT engines only load with the exact version that built them; rebuild here"
            )
    if tools.get("gpu_sm") != manifest.sm:
        raise EngineMismatchError(
            f"{engine_dir}: built for {manifest.sm} ({built.get('gpu_name')}); this "
            f"machine's GPU is {tools.get('gpu_sm')} ({tools.get('gpu_name')}): "
            "rebuild for this target"
        )


# --- the backend --------------------------------------------------------------------------------------------


class TensorRTLLMBackend:
    """NVIDIA's TensorRT-LLM behind kiln's ``Backend`` protocol (runs only where ``tensorrt_llm`` imports)."""

    name = "tensorrt_llm"

    def check_available(self, target: Target) -> None:
        if target.backend != "tensorrt_llm":
            raise UnsupportedCombinationError(
                f"target {target.name!r} has backend {target.backend!r}, not tensorrt_llm"
            )
        if why := unavailable_reason(target):
            raise BackendUnavailableError(unavailable_message(target, why))

    def compile(self, checkpoint_dir: Path, target: Target, output_dir: Path, lineage: dict) -> Path:
        """Build the engine dir (``artifact: engine``) or publish the HF checkpoint (``artifact:
        hf_checkpoint``)."""
        self.check_available(target)  # before reading anything: never a partial artifact where it cannot run
        tools = toolchain()
        contract = api.contract_for(str(tools["tensorrt_llm"]))
        if target.tensorrt_llm_version and api.series_for(target.tensorrt_llm_version) != contract.series:
            raise EngineMismatchError(
                f"target {target.name!r} expects TensorRT-LLM {target.tensorrt_llm_version}, this "
                f"worker has {tools['tensorrt_llm']}: fix the target or the work pool's image"
            )
        if target.artifact == "engine":
            return build_engine(Path(checkpoint_dir), target, Path(output_dir), lineage, contract, tools)
        return package_hf_checkpoint(
            _hf_dir(Path(checkpoint_dir), lineage), target, Path(output_dir), lineage, contract, tools
        )

    def load(self, engine_dir: Path) -> TensorRTLLMEngine:
        """Load an engine dir or HF checkpoint with the LLM API of the installed TensorRT-LLM."""
        from kiln.host import tensorrt_llm_status

        engine_dir = Path(engine_dir)
        manifest = engine_manifest.read(engine_dir)
        if manifest.backend != "tensorrt_llm":
            raise EngineMismatchError(
                f"{engine_dir}: built for backend {manifest.backend!r}, not tensorrt_llm"
            )
        trt = tensorrt_llm_status()
        if not trt.importable or not trt.version:
            raise BackendUnavailableError(
                f"{engine_dir} is a TensorRT-LLM {manifest.artifact}; {trt.why}. "
                "Load it on a worker started from NVIDIA's TensorRT-LLM image "
                f"({WORK_POOL_TEMPLATE})"
            )
        check_loadable(manifest, engine_dir, toolchain())
        contract = api.contract_for(trt.version)
        artifact = str(manifest.artifact)
        if manifest.build is not None and not manifest.build.gather_context_logits:
            raise EngineMismatchError(
                f"{engine_dir}: built without --gather_context_logits, so validation cannot read "
                "prompt logits; rebuild it with kiln"
            )
        module_name, attr = contract.llm_class(artifact).split(":")
        llm_cls = getattr(importlib.import_module(module_name), attr)
        llmapi = importlib.import_module(api.LLMAPI_MODULE)
        settings = manifest.llm_api.settings if manifest.llm_api is not None else {}
        kwargs = api.llm_kwargs(artifact, engine_dir, settings, contract)
        kwargs["kv_cache_config"] = llmapi.KvCacheConfig(**kwargs["kv_cache_config"])
        return TensorRTLLMEngine(engine_dir, manifest, llm_cls(**kwargs), contract, llmapi.SamplingParams)


class TensorRTLLMEngine:
    """A loaded TensorRT-LLM artifact behind kiln's ``Engine`` protocol: streamed batched generation and
    context logits."""

    def __init__(
        self, engine_dir: Path, manifest: EngineManifest, llm: Any, contract: api.Contract, sampling_cls: type
    ) -> None:
        self.engine_dir = engine_dir
        self.manifest = manifest
        self._llm = llm
        self._contract = contract
        self._sampling_cls = sampling_cls
        self._peak = 0

    def _check(self, token_ids: list[int], max_new_tokens: int) -> None:
        limits = self.manifest.limits
        if not token_ids:
            raise GenerationLimitError("empty prompt: pass at least one token id")
        if len(token_ids) > limits.max_input_len:
            raise GenerationLimitError(
                f"prompt of {len(token_ids)} tokens exceeds max_input_len "
                f"{limits.max_input_len} of {self.engine_dir}"
            )
        if len(token_ids) + max_new_tokens > limits.max_seq_len:
            raise GenerationLimitError(
                f"prompt {len(token_ids)} + {max_new_tokens} new tokens exceeds max_seq_len "
                f"{limits.max_seq_len} of {self.engine_dir}"
            )

    def _params(self, sampling: KilnSampling, *, context_logits: bool = False) -> Any:
        return self._sampling_cls(
            **api.sampling_kwargs(sampling, self._contract, context_logits=context_logits)
        )

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Submit every request at once (in-flight batching) and stream each, timing every output token."""
        for request in requests:
            self._check(request.prompt_token_ids, request.sampling.max_new_tokens)
        results = _run_async(self._generate_all(requests))
        self._sample_memory()
        return results

    async def _generate_all(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return list(await asyncio.gather(*(self._one(request) for request in requests)))

    async def _one(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        stream = self._llm.generate_async(
            {"prompt_token_ids": list(request.prompt_token_ids)},
            sampling_params=self._params(request.sampling),
            streaming=True,
        )
        times: list[float] = []
        final = None
        async for output in stream:
            produced = len(output.outputs[0].token_ids)
            now = time.perf_counter() - started
            times.extend([now] * (produced - len(times)))
            final = output
        if final is None:
            raise KilnError(f"{self.engine_dir}: TensorRT-LLM returned no output for a request")
        completion = final.outputs[0]
        reason = completion.finish_reason
        if reason not in ("stop", "length"):
            raise KilnError(f"{self.engine_dir}: request ended with finish_reason {reason!r}")
        return GenerationResult(
            token_ids=list(completion.token_ids),
            finish_reason=reason,
            ttft_s=times[0] if times else None,
            token_times_s=times,
        )

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Context logits ``[len(token_ids), vocab]`` float32 (``return_context_logits``; engines need
        ``--gather_context_logits``, which kiln always builds with)."""
        self._check(token_ids, 1)
        params = self._params(KilnSampling(max_new_tokens=1), context_logits=True)
        output = self._llm.generate(
            [{"prompt_token_ids": list(token_ids)}], sampling_params=[params], use_tqdm=False
        )[0]
        logits = output.context_logits
        if logits is None:
            raise EngineMismatchError(f"{self.engine_dir}: TensorRT-LLM returned no context logits")
        logits = logits.float().cpu()
        if logits.shape[0] != len(token_ids):
            raise KilnError(
                f"{self.engine_dir}: {logits.shape[0]} rows of context logits for {len(token_ids)} tokens"
            )
        self._sample_memory()
        return logits

    def _sample_memory(self) -> None:
        # TensorRT-LLM allocates outside torch's caching allocator: read the device's own counter
        free, total = torch.cuda.mem_get_info()
        self._peak = max(self._peak, total - free)

    def memory_bytes(self) -> int:
        """Device memory in use on this GPU after the calls so far (weights, KV cache pool, activations)."""
        return self._peak

    def close(self) -> None:
        self._llm.shutdown()


def _run_async(coroutine: Any) -> Any:
    """Run a coroutine from sync code, also when the caller already runs an event loop (then in a thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = asyncio.run(coroutine)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
