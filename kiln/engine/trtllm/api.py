"""Everything kiln knows about one TensorRT-LLM version, read from its contract file, in one place.

The contract (``kiln/contracts/tensorrt_llm-<series>.json``) lists the real API facts with their evidence
in the TensorRT-LLM sources. This module turns kiln's intent (a target, a checkpoint) into what that
version accepts: the ``trtllm-build`` argv, the LLM API keyword arguments, ``SamplingParams`` fields and
the serving settings of an HF checkpoint. Each builder checks what it emits against the contract, and
the ``*_USED`` tuples name everything kiln emits or reads, so a contract that drops one fails loudly.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kiln.engine.base import SamplingParams
from kiln.errors import ContractError
from kiln.profiles import Target

CONTRACT_SERIES = ("1.2", "1.3")
"""Contract files shipped with kiln; a TensorRT-LLM version maps to the newest series not above it."""

BUILD_FLAGS_USED = (
    "--checkpoint_dir",
    "--output_dir",
    "--max_batch_size",
    "--max_input_len",
    "--max_seq_len",
    "--max_num_tokens",
    "--max_beam_width",
    "--kv_cache_type",
    "--gemm_plugin",
    "--gpt_attention_plugin",
    "--context_fmha",
    "--use_paged_context_fmha",
    "--remove_input_padding",
    "--use_fp8_context_fmha",
    "--gather_context_logits",
    "--workers",
    "--log_level",
)
LLM_ARGS_USED = (
    "model",
    "tokenizer",
    "skip_tokenizer_init",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_batch_size",
    "max_input_len",
    "max_seq_len",
    "max_num_tokens",
    "kv_cache_config",
)
KV_CACHE_CONFIG_USED = ("free_gpu_memory_fraction", "enable_block_reuse")
SAMPLING_PARAMS_USED = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop_token_ids",
    "end_id",
    "pad_id",
    "detokenize",
    "return_context_logits",
    "include_stop_str_in_output",
)
RESULT_FIELDS_USED = ("outputs", "context_logits", "token_ids", "finish_reason")
HF_QUANT_KEYS_USED = ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules")
ENGINE_CONFIG_KEYS_USED = ("version", "pretrained_config", "build_config")
LLMAPI_MODULE = "tensorrt_llm.llmapi"
"""Where ``SamplingParams`` and ``KvCacheConfig`` are exported (contract
``llm_api.BuildConfig_QuantConfig_...``)."""
ENGINE_FILE = "rank{rank}.engine"
"""One serialized engine per rank next to ``config.json`` (contract ``engine_dir.engine_files``); the LLM API
detects an engine dir by ``config.json`` + ``*.engine`` and only after it found no ``*.safetensors``
(tensorrt_llm/llmapi/llm_utils.py@7b437aaa ``ModelLoader.get_model_format``), so engine dirs hold none."""

END_ID_NONE = -1
"""``end_id`` that never matches a token: kiln feeds token ids and stops on ``stop_token_ids`` only
(the value trtllm-bench uses for ``--eos_id``, contract ``bench.throughput.options``)."""

KV_FREE_GPU_MEMORY_FRACTION = 0.9
"""Share of free GPU memory the paged KV cache may take (TensorRT-LLM's own default, stated explicitly)."""

LINEAR_NAMES = ("qkv", "dense", "fc", "gate", "proj")
"""Last name component of a decoder linear in a TensorRT-LLM checkpoint
(``transformer.layers.N.attention.qkv``)."""
_FLOAT_DTYPES = {"F16", "BF16", "F32"}


@dataclass(frozen=True)
class Contract:
    """The API facts of one TensorRT-LLM series, as read from its contract file."""

    series: str
    data: dict[str, Any]
    source: str

    @property
    def engine_path(self) -> bool:
        """Whether this series builds TensorRT engines with ``trtllm-build`` (1.2) or only serves HF
        checkpoints."""
        return bool(self.data.get("kiln", {}).get("engine_path"))

    def build_flags(self) -> dict[str, dict[str, Any]]:
        """Every ``trtllm-build`` flag (and alias) this series accepts, with its contract entry."""
        cli = self.data.get("cli", {}).get("trtllm-build", {})
        flags: dict[str, dict[str, Any]] = {}
        for group in ("args", "plugin_args"):
            for name, entry in cli.get(group, {}).items():
                if not re.fullmatch(r"--[a-z0-9_]+", name) or not isinstance(entry, dict):
                    continue
                if entry.get("exists") is False or entry.get("cli_flag") is False:
                    continue
                flags[name] = entry
                for alias in entry.get("aliases", []):
                    flags[alias] = entry
        return flags

    def flag_choices(self, flag: str) -> list[str] | None:
        choices = self.build_flags().get(flag, {}).get("choices")
        return choices if isinstance(choices, list) else None

    def _fields(self, *path: str) -> set[str]:
        node: Any = self.data
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return set(node) if isinstance(node, list) else set()

    def llm_args_fields(self) -> set[str]:
        return self._fields("llm_api", "llm_args", "fields")

    def kv_cache_config_fields(self) -> set[str]:
        return self._fields("llm_api", "KvCacheConfig", "fields")

    def sampling_params_fields(self) -> set[str]:
        return self._fields("llm_api", "SamplingParams", "fields_verified")

    def result_fields(self) -> set[str]:
        return self._fields("llm_api", "result", "request_output_fields") | self._fields(
            "llm_api", "result", "completion_output_fields"
        )

    def hf_quant_config_file(self) -> str:
        """The file ModelOpt writes next to an HF export and TensorRT-LLM's PyTorch backend reads."""
        return str(self.data.get("hf_checkpoint", {}).get("quant_config_file") or "hf_quant_config.json")

    def hf_quant_keys(self) -> set[str]:
        return self._fields("hf_checkpoint", "keys_read", "quantization")

    def engine_config_keys(self) -> set[str]:
        return self._fields("engine_dir", "config_json_top_level")

    def quant_algos(self) -> set[str]:
        return set(self.data.get("quant_algo", []))

    def kv_cache_quant_algos(self) -> set[str]:
        return set(self.data.get("quant_algo_meta", {}).get("KV_CACHE_QUANT_ALGO_LIST", []))

    def pin(self, package: str) -> str | None:
        """The version specifier this series' package metadata pins ``package`` to (None: unknown)."""
        pins = self.data.get("pins", {})
        for key, value in pins.items():
            if key.split("[")[0] == package and isinstance(value, str) and re.match(r"^[~=<>!]", value):
                return value
        return None

    def llm_class(self, artifact: str) -> str:
        """``module:attr`` of the LLM class that serves ``artifact`` in this series."""
        path = self.data.get("kiln", {}).get("llm_class", {}).get(artifact)
        if not path:
            raise ContractError(
                f"{self.source}: TensorRT-LLM {self.series} has no LLM class for artifact {artifact!r}"
            )
        return path


def missing_uses(contract: Contract) -> list[str]:
    """Everything kiln emits or reads that ``contract`` does not list (empty: kiln and the contract agree)."""
    from kiln.recipes import KV_SCHEMES, SCHEMES

    problems: list[str] = []

    def need(kind: str, used: tuple[str, ...] | set[str], have: set[str]) -> None:
        problems.extend(f"{kind} {name!r}" for name in sorted(set(used) - have))

    if contract.engine_path:
        need("trtllm-build flag", BUILD_FLAGS_USED, set(contract.build_flags()))
        need("engine config.json key", ENGINE_CONFIG_KEYS_USED, contract.engine_config_keys())
    need("LLM API argument", LLM_ARGS_USED, contract.llm_args_fields())
    need("KvCacheConfig field", KV_CACHE_CONFIG_USED, contract.kv_cache_config_fields())
    need("SamplingParams field", SAMPLING_PARAMS_USED, contract.sampling_params_fields())
    need("RequestOutput/CompletionOutput field", RESULT_FIELDS_USED, contract.result_fields())
    need("hf_quant_config.json key", HF_QUANT_KEYS_USED, contract.hf_quant_keys())
    need("QuantAlgo value", {s.quant_algo for s in SCHEMES.values() if s.quant_algo}, contract.quant_algos())
    need(
        "kv_cache_quant_algo value",
        {v[1] for v in KV_SCHEMES.values() if v[1]},
        contract.kv_cache_quant_algos(),
    )
    # where each recipe runs (kiln.engine.trtllm.support): a fact per artifact kiln serves, per algo it emits
    support = contract.data.get("support") or {}
    for artifact in (("engine",) if contract.engine_path else ()) + ("hf_checkpoint",):
        facts = support.get(artifact) or {}
        need(
            f"support fact {artifact}.quant_algo",
            {s.quant_algo or "NO_QUANT" for s in SCHEMES.values()},
            set(facts.get("quant_algo") or {}),
        )
        need(
            f"support fact {artifact}.kv_cache_quant_algo",
            {v[1] for v in KV_SCHEMES.values() if v[1]},
            set(facts.get("kv_cache_quant_algo") or {}),
        )
    if contract.engine_path:
        need("build_logic", ("fp8_context_fmha",), set(contract.data.get("build_logic") or {}))
    return problems


def load_contract(series: str, path: Path | None = None) -> Contract:
    """The contract of ``series`` shipped in ``kiln/contracts`` (or read from ``path``)."""
    if path is None:
        if series not in CONTRACT_SERIES:
            raise ContractError(
                f"no TensorRT-LLM contract for series {series!r}; kiln ships {', '.join(CONTRACT_SERIES)}"
            )
        return _packaged_contract(series)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ContractError(f"{path}: not a readable contract file ({exc})") from None
    return Contract(series=series, data=data, source=str(path))


@functools.cache
def _packaged_contract(series: str) -> Contract:
    resource = resources.files("kiln") / "contracts" / f"tensorrt_llm-{series}.json"
    return Contract(
        series=series,
        data=json.loads(resource.read_text()),
        source=f"kiln/contracts/tensorrt_llm-{series}.json",
    )


def series_for(version: str) -> str:
    """The contract series for a TensorRT-LLM version string (``1.2.1`` -> ``1.2``, ``1.4.0rc1`` ->
    ``1.3``)."""
    match = re.match(r"^(\d+)\.(\d+)", version.strip())
    if not match:
        raise ContractError(f"cannot read TensorRT-LLM version {version!r}; expected e.g. 1.2.1")
    major_minor = (int(match[1]), int(match[2]))
    known = [s for s in CONTRACT_SERIES if tuple(int(p) for p in s.split(".")) <= major_minor]
    if not known:
        raise ContractError(
            f"TensorRT-LLM {version} is older than kiln supports ({CONTRACT_SERIES[0]}.x is the oldest); "
            "use NVIDIA's TensorRT-LLM 1.2 image or newer"
        )
    return known[-1]


def contract_for(version: str) -> Contract:
    return load_contract(series_for(version))


def default_series(target: Target) -> str:
    """The series a target is checked against before its worker's version is known."""
    if target.tensorrt_llm_version:
        return series_for(target.tensorrt_llm_version)
    return "1.2" if target.artifact == "engine" else "1.3"


# --- engine path (1.2) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointFacts:
    """What ``trtllm-build`` reads from a TensorRT-LLM checkpoint's ``config.json`` and kiln builds on."""

    architecture: str
    dtype: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    world_size: int
    tp_size: int
    pp_size: int
    producer: dict[str, str]

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> CheckpointFacts:
        from kiln.errors import ModelSourceError

        mapping = config.get("mapping") or {}
        quant = config.get("quantization") or {}
        architecture = config.get("architecture")
        if not isinstance(architecture, str):
            raise ModelSourceError(
                f"{where}: no 'architecture' in config.json; is this a TensorRT-LLM checkpoint "
                "(ModelOpt export_tensorrt_llm_checkpoint) rather than an HF model dir?"
            )
        tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
        return cls(
            architecture=architecture,
            dtype=str(config.get("dtype", "float16")),
            quant_algo=quant.get("quant_algo"),
            kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
            world_size=int(mapping.get("world_size", tp * pp)),
            tp_size=tp,
            pp_size=pp,
            producer=dict(config.get("producer") or {}),
        )


@dataclass(frozen=True)
class AttentionPlugins:
    """The context-attention plugin settings trtllm-build really builds with (it overrides what it is
    given)."""

    context_fmha: bool
    use_paged_context_fmha: bool
    use_fp8_context_fmha: bool
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "context_fmha": self.context_fmha,
            "use_paged_context_fmha": self.use_paged_context_fmha,
            "use_fp8_context_fmha": self.use_fp8_context_fmha,
            "notes": list(self.notes),
        }


def attention_plugins(checkpoint: CheckpointFacts, sm: int | None, contract: Contract) -> AttentionPlugins:
    """What trtllm-build's ``build()`` makes of kiln's request (context FMHA + paged context FMHA, FP8 context
    FMHA wherever it applies) for this checkpoint on this SM: the contract's ``build_logic.fp8_context_fmha``
    rules.

    FP8 context FMHA applies only to FP8 / W4A8_AWQ / NVFP4 checkpoints from SM89 on, and with paged context
    FMHA only together with an FP8 KV cache; an FP8 KV cache without it, or an INT8 KV cache, turns paged
    context FMHA off. kiln passes the result explicitly, so the argv and kiln-engine.json describe the engine
    built."""
    rules = (contract.data.get("build_logic") or {}).get("fp8_context_fmha")
    if not rules:
        raise ContractError(
            f"{contract.source} lacks build_logic.fp8_context_fmha (what trtllm-build does with FP8 "
            "context FMHA); kiln cannot say which attention kernels the engine gets"
        )
    algos, min_sm = set(rules["quant_algos"]), int(rules["min_sm"])
    fp8_kv, int8_kv = checkpoint.kv_cache_quant_algo == "FP8", checkpoint.kv_cache_quant_algo == "INT8"
    paged, fp8, notes = True, True, []
    if checkpoint.quant_algo not in algos:
        fp8 = False
        notes.append(
            f"FP8 context FMHA off: it applies only to {', '.join(sorted(algos))} checkpoints "
            f"(quant_algo {checkpoint.quant_algo})"
        )
        if fp8_kv:
            paged = False
            notes.append("paged context FMHA off: an FP8 KV cache without FP8 context FMHA")
    elif sm is not None and sm < min_sm:
        fp8 = False
        notes.append(f"FP8 context FMHA off: it needs SM >= {min_sm} (sm{sm})")
        if fp8_kv:
            paged = False
            notes.append("paged context FMHA off: an FP8 KV cache without FP8 context FMHA")
    elif not fp8_kv:
        fp8 = False
        notes.append("FP8 context FMHA off: with paged context FMHA it needs an FP8 KV cache")
    if int8_kv and paged:
        paged = False
        notes.append("paged context FMHA off: it does not run with an INT8 KV cache")
    return AttentionPlugins(
        context_fmha=True, use_paged_context_fmha=paged, use_fp8_context_fmha=fp8, notes=tuple(notes)
    )


def checkpoint_problems(
    config: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...]]], contract: Contract
) -> list[str]:
    """What keeps trtllm-build from loading this checkpoint (``tensors``: name -> (safetensors dtype, shape)
    of one rank), per the contract's ``checkpoint_reader`` facts: config keys, QuantConfig fields, RoPE base,
    and the
    tensors each quantized linear's TensorRT-LLM layer requires ('Required but not provided tensors')."""
    reader = contract.data.get("checkpoint_reader")
    if not reader:
        return []
    problems = [
        f"config.json lacks {key!r}" for key in reader.get("config_required", []) if key not in config
    ]
    quant = config.get("quantization") or {}
    if unknown := sorted(set(quant) - set(reader.get("quantization_fields", []))):
        problems.append(
            f"quantization keys {unknown} are not QuantConfig fields (QuantConfig(**config) raises TypeError)"
        )
    if str(config.get("position_embedding_type", "")).startswith("rope") and "rotary_base" not in config:
        problems.append(
            f"no rotary_base: trtllm-build would use {reader.get('rotary_base_default')} "
            "(re-export with kiln quantize, which restores the model's RoPE base)"
        )
    algo = quant.get("quant_algo")
    expected = list((reader.get("linear_tensors") or {}).get(algo) or [])
    if quant.get("pre_quant_scale") and algo in ("W4A16_AWQ", "W4A8_AWQ"):
        expected += reader.get("linear_tensors_with_pre_quant_scale", [])
    if not expected:
        return problems
    missing: dict[str, list[str]] = {}
    for name, (dtype, _) in sorted(tensors.items()):
        prefix, _, leaf = name.rpartition(".")
        if leaf != "weight" or prefix.rpartition(".")[2] not in LINEAR_NAMES or dtype in _FLOAT_DTYPES:
            # not a decoder linear, or an unquantized one (excluded; or W8A16/W4A16 that trtllm-build
            # quantizes)
            continue
        for field in expected:
            if f"{prefix}.{field}" not in tensors:
                missing.setdefault(field, []).append(prefix)
    for field, prefixes in missing.items():
        problems.append(
            f"{len(prefixes)} {algo} linear(s) lack {field!r} (e.g. {prefixes[0]}.{field}), which "
            "TensorRT-LLM's layer requires: load() raises 'Required but not provided tensors'"
        )
    return problems


def trtllm_build_command(
    checkpoint_dir: Path,
    output_dir: Path,
    target: Target,
    checkpoint: CheckpointFacts,
    contract: Contract,
    *,
    gather_context_logits: bool = True,
    executable: str = "trtllm-build",
) -> list[str]:
    """The ``trtllm-build`` argv for ``checkpoint`` on ``target``: pure, and checked against ``contract``.

    Limits come from the target; parallelism from the checkpoint's mapping (trtllm-build has no
    --tp_size), so the checkpoint must have been exported for the target's tp x pp. Plugins follow
    NVIDIA's recipes for Llama-family decoders: GEMM and attention plugins in the model dtype, paged
    KV cache with paged context FMHA (chunked context, KV reuse), and FP8 context FMHA where trtllm-build
    keeps it (:func:`attention_plugins`: the effective values are passed, so the argv is the engine built).
    ``gather_context_logits`` keeps the prompt logits that perplexity/KL validation reads.
    """
    _require_engine_path(contract)
    limits = target.limits
    if checkpoint.world_size != limits.tp_size * limits.pp_size:
        raise ContractError(
            f"{checkpoint_dir}: checkpoint mapping is tp {checkpoint.tp_size} x pp {checkpoint.pp_size}, "
            f"target {target.name!r} wants tp {limits.tp_size} x pp {limits.pp_size}; trtllm-build takes "
            "parallelism from the checkpoint, so export it for the target's layout"
        )
    plugins = attention_plugins(checkpoint, target.sm_number, contract)
    onoff = {True: "enable", False: "disable"}
    args: list[tuple[str, str | None]] = [
        ("--checkpoint_dir", str(checkpoint_dir)),
        ("--output_dir", str(output_dir)),
        ("--max_batch_size", str(limits.max_batch_size)),
        ("--max_input_len", str(limits.max_input_len)),
        ("--max_seq_len", str(limits.max_seq_len)),
        ("--max_num_tokens", str(limits.max_num_tokens)),
        ("--max_beam_width", "1"),
        ("--kv_cache_type", "paged"),
        ("--gemm_plugin", "auto"),
        ("--gpt_attention_plugin", "auto"),
        ("--context_fmha", onoff[plugins.context_fmha]),
        ("--use_paged_context_fmha", onoff[plugins.use_paged_context_fmha]),
        ("--use_fp8_context_fmha", onoff[plugins.use_fp8_context_fmha]),
        ("--remove_input_padding", "enable"),
    ]
    if gather_context_logits:
        args.append(("--gather_context_logits", None))
    args += [("--workers", str(min(checkpoint.world_size, target.gpus_per_worker))), ("--log_level", "info")]
    _check_flags(args, contract)
    argv = [executable]
    for flag, value in args:
        argv += [flag] if value is None else [flag, value]
    return argv


def _require_engine_path(contract: Contract) -> None:
    if not contract.engine_path:
        raise ContractError(
            f"TensorRT-LLM {contract.series} has no TensorRT engine path in kiln's contract "
            f"({contract.source}); use artifact: hf_checkpoint for this target"
        )


def _check_flags(args: list[tuple[str, str | None]], contract: Contract) -> None:
    _require_engine_path(contract)
    flags = contract.build_flags()
    problems = []
    for flag, value in args:
        if flag not in flags:
            problems.append(f"{flag} is not a trtllm-build flag")
        elif value is not None and (choices := contract.flag_choices(flag)) and value not in choices:
            problems.append(f"{flag} {value}: allowed {choices}")
    if problems:
        raise ContractError(
            f"kiln's trtllm-build command disagrees with {contract.source} "
            f"(TensorRT-LLM {contract.series}): " + "; ".join(problems)
        )


# --- LLM API (both paths) -----------------------------------------------------------------------------------


def _check_fields(kind: str, names: set[str], allowed: set[str], contract: Contract) -> None:
    if unknown := sorted(names - allowed):
        raise ContractError(f"{kind} {unknown} not in {contract.source} (TensorRT-LLM {contract.series})")


def kv_cache_config_kwargs(contract: Contract, *, enable_block_reuse: bool = True) -> dict[str, Any]:
    """``KvCacheConfig`` fields kiln sets. The KV dtype is left at its default: an engine has it built in,
    and the PyTorch backend's ``dtype='auto'`` follows the checkpoint's ``kv_cache_quant_algo``."""
    kwargs: dict[str, Any] = {
        "free_gpu_memory_fraction": KV_FREE_GPU_MEMORY_FRACTION,
        "enable_block_reuse": enable_block_reuse,
    }
    _check_fields("KvCacheConfig fields", set(kwargs), contract.kv_cache_config_fields(), contract)
    return kwargs


def serving_settings(target: Target, contract: Contract) -> dict[str, Any]:
    """The LLM API arguments that serve an HF checkpoint on ``target`` (also a ``--extra_llm_api_options``
    file)."""
    limits = target.limits
    settings: dict[str, Any] = {
        "tensor_parallel_size": limits.tp_size,
        "pipeline_parallel_size": limits.pp_size,
        "max_batch_size": limits.max_batch_size,
        "max_input_len": limits.max_input_len,
        "max_seq_len": limits.max_seq_len,
        "max_num_tokens": limits.max_num_tokens,
        "kv_cache_config": kv_cache_config_kwargs(contract),
    }
    _check_fields("LLM API arguments", set(settings), contract.llm_args_fields(), contract)
    return settings


def llm_kwargs(
    artifact: str, model_dir: Path, settings: dict[str, Any], contract: Contract
) -> dict[str, Any]:
    """Keyword arguments of the LLM class that loads ``artifact`` for validation (kiln passes token ids, so
    no tokenizer is loaded). ``kv_cache_config`` stays a mapping; the runtime wraps it in ``KvCacheConfig``.

    An engine carries its limits; an HF checkpoint gets the published serving ``settings``. KV block reuse
    is off: context logits of a prompt whose blocks were reused come back short (TensorRT-LLM's own
    tests/unittest/_torch/sampler/test_return_logits.py xfails on it, nvbugs 5577178) and reuse would
    flatter repeated prompts in the speed sweep."""
    kwargs: dict[str, Any] = {"model": str(model_dir), "skip_tokenizer_init": True}
    if artifact == "hf_checkpoint":
        kwargs.update({k: v for k, v in settings.items() if k != "kv_cache_config"})
    kwargs["kv_cache_config"] = kv_cache_config_kwargs(contract, enable_block_reuse=False)
    _check_fields("LLM API arguments", set(kwargs), contract.llm_args_fields(), contract)
    return kwargs


def sampling_kwargs(
    params: SamplingParams, contract: Contract, *, context_logits: bool = False
) -> dict[str, Any]:
    """``tensorrt_llm.SamplingParams`` fields for kiln's sampling: greedy is top_k=1 (the LLM API's greedy
    rule)."""
    # include_stop_str_in_output: TensorRT-LLM otherwise trims a matched stop token from token_ids
    # (contract llm_api.result.stop_token_trimming); kiln's torch engine keeps it, and so must this one
    kwargs: dict[str, Any] = {
        "max_tokens": params.max_new_tokens,
        "end_id": END_ID_NONE,
        "pad_id": END_ID_NONE,
        "detokenize": False,
        "include_stop_str_in_output": True,
    }
    if params.temperature == 0:
        kwargs["top_k"] = 1
    else:
        kwargs["temperature"] = params.temperature
        kwargs["top_k"] = params.top_k or None
        kwargs["top_p"] = params.top_p
    if params.seed is not None:
        kwargs["seed"] = params.seed
    if params.stop_token_ids:
        kwargs["stop_token_ids"] = list(params.stop_token_ids)
    if context_logits:
        kwargs["return_context_logits"] = True
    _check_fields("SamplingParams fields", set(kwargs), contract.sampling_params_fields(), contract)
    return kwargs


def check_hf_quant_config(
    data: dict[str, Any], where: str, contract: Contract
) -> tuple[str | None, str | None]:
    """``(quant_algo, kv_cache_quant_algo)`` of a ModelOpt ``hf_quant_config.json``, refusing values this
    series lacks."""
    from kiln.errors import ModelSourceError

    quant = data.get("quantization")
    if not isinstance(quant, dict):
        raise ModelSourceError(
            f"{where}: no 'quantization' mapping; TensorRT-LLM reads quantization.quant_algo from it"
        )
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo is not None and algo not in contract.quant_algos():
        raise ContractError(
            f"{where}: quant_algo {algo!r} is not a QuantAlgo of TensorRT-LLM {contract.series} "
            f"({contract.source}); known: {sorted(contract.quant_algos())}"
        )
    if kv_algo is not None and kv_algo not in contract.kv_cache_quant_algos():
        raise ContractError(
            f"{where}: kv_cache_quant_algo {kv_algo!r} is not supported by TensorRT-LLM "
            f"{contract.series}; known: {sorted(contract.kv_cache_quant_algos())}"
        )
    return algo, kv_algo
