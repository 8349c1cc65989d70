"""Calibrate and quantize a model once per recipe with NVIDIA ModelOpt, then export its checkpoints.

One call loads the HF model, checks the recipe against the model and device (before any forward pass),
calibrates it (weight-only recipes skip the calibration forward passes: ModelOpt computes their scales
from the weights), optionally scores fake-quant perplexity on held-out tokens against the unquantized
model and refuses a recipe over its budget, and exports:

- a TensorRT-LLM checkpoint (``config.json`` + ``rank{N}.safetensors``) per distinct ``(tp, pp)`` with
  ``modelopt.torch.export.export_tensorrt_llm_checkpoint`` (the TensorRT-LLM 1.2 engine path; the function
  was removed in modelopt 0.49, hence the pin in pyproject);
- a quantized HF checkpoint (``export_hf_checkpoint``) for TensorRT-LLM >= 1.3 and other runtimes.

Every export carries kiln's lineage file. Tensor names and config fields are ModelOpt's: kiln's torch engine
and TensorRT-LLM both read them as ModelOpt writes them, except what kiln fixes (``restore_rope_config``;
``fix_pre_quant_scale``: ``int4_wo``'s pre-quant scale flag and tensors made to agree for TensorRT-LLM).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kiln import constants
from kiln.errors import CalibrationDataError, GateFailedError, KilnInputError, UnsupportedCombinationError
from kiln.families import family_for
from kiln.recipes import KV_SCHEMES, QuantScheme, scheme

if TYPE_CHECKING:
    import torch

    from kiln.calibration import TokenSet
    from kiln.hub import ModelInfo
    from kiln.profiles import Recipe

Format = Literal["trtllm", "hf"]

TORCH_DTYPES = ("float32", "float16", "bfloat16")
CALIBRATION_BATCH = 8
SEED = 0


@dataclass(frozen=True)
class Perplexity:
    """Fake-quant perplexity of the quantized model vs the unquantized one on the same held-out tokens."""

    baseline: float
    quantized: float
    increase_pct: float
    num_tokens: int
    heldout_sha256: str


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """What one recipe's calibration produced: a TensorRT-LLM dir per layout, the HF export, the numbers."""

    recipe: str
    quantization: str
    trtllm_dirs: dict[str, Path]
    """``"tp{tp}pp{pp}"`` -> TensorRT-LLM checkpoint dir (``config.json`` + ``rank{N}.safetensors``)."""
    hf_dir: Path | None
    calibration_sha256: str | None
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    calibrated: bool
    """Whether calibration forward passes ran (False for weight-only recipes and ``none``)."""
    timings_s: dict[str, float] = field(default_factory=dict)
    perplexity: Perplexity | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trtllm_dirs"] = {k: str(v) for k, v in self.trtllm_dirs.items()}
        data["hf_dir"] = str(self.hf_dir) if self.hf_dir else None
        return data


def layout_key(tp: int, pp: int) -> str:
    return f"tp{tp}pp{pp}"


# --- checks (cheap, before any weights are loaded) --------------------------------------------------------


def check_recipe(
    recipe: Recipe, info: ModelInfo, *, device: str, layouts: Sequence[tuple[int, int]], dtype: str
) -> QuantScheme:
    """Raise a KilnInputError for a recipe that cannot run on this model and device; return its scheme."""
    try:
        quant = scheme(recipe.quantization)
    except KeyError as exc:
        raise KilnInputError(f"recipe {recipe.name!r}: quantization: {exc.args[0]}") from None
    if recipe.kv_cache_dtype not in KV_SCHEMES:
        raise KilnInputError(
            f"recipe {recipe.name!r}: kv_cache_dtype {recipe.kv_cache_dtype!r} is unknown; "
            f"allowed: {', '.join(KV_SCHEMES)}"
        )
    if dtype not in TORCH_DTYPES:
        raise KilnInputError(f"checkpoint dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    if quant.needs_cuda_to_calibrate and device != "cuda":
        raise UnsupportedCombinationError(
            f"recipe {recipe.name!r}: {recipe.quantization} calibrates only on CUDA (ModelOpt's FP4 "
            f"kernels); this run is on {device}: quantize it on a GPU worker (any SM >= 89 calibrates; "
            "engines need SM >= 100)"
        )
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UnsupportedCombinationError(
                f"recipe {recipe.name!r}: device cuda asked, but torch sees no GPU here"
            )
    family = family_for(info.architecture)  # inspect_model refused unknown architectures already
    if why := family.recipe_problem(recipe.quantization):
        raise UnsupportedCombinationError(f"recipe {recipe.name!r}: {why}")
    if quant.group_size:
        sizes = {"hidden_size": info.hidden_size, "intermediate_size": info.intermediate_size}
        bad = {k: v for k, v in sizes.items() if v % recipe.group_size}
        if bad:
            raise KilnInputError(
                f"recipe {recipe.name!r}: group_size {recipe.group_size} does not divide the model's "
                + ", ".join(f"{k} {v}" for k, v in bad.items())
                + f"; pick a group size dividing {math.gcd(info.hidden_size, info.intermediate_size)} "
                "(e.g. 32, 64, 128)"
            )
    for tp, pp in layouts:
        if tp < 1 or pp < 1:
            raise KilnInputError(f"tp {tp} / pp {pp}: both must be >= 1")
        if info.num_heads % tp:
            raise KilnInputError(f"tp {tp} does not divide the model's {info.num_heads} attention heads")
        if pp > info.num_layers:
            raise KilnInputError(f"pp {pp} is more than the model's {info.num_layers} layers")
    return quant


def check_calibration(recipe: Recipe, info: ModelInfo, calibration: TokenSet | None) -> None:
    """Raise a CalibrationDataError unless a recipe that calibrates has tokens of this model's vocabulary."""
    if needs_calibration(recipe):
        if calibration is None or not calibration.token_ids:
            raise CalibrationDataError(
                f"recipe {recipe.name!r}: {recipe.quantization} (kv_cache_dtype {recipe.kv_cache_dtype}) "
                "calibrates on activations, but no calibration tokens were given (see the recipe's "
                "calibration: section)"
            )
        too_big = [max(w) for w in calibration.token_ids if w and max(w) >= info.vocab_size]
        if too_big:
            raise CalibrationDataError(
                f"calibration tokens go up to id {max(too_big)}, beyond the model's vocab "
                f"({info.vocab_size}): they were tokenized for another model"
            )


def hf_export_problem(recipe: Recipe) -> str | None:
    """Why ModelOpt's HF exporter cannot write this recipe, or None (its unified format has no INT8 KV
    cache)."""
    if recipe.kv_cache_dtype == "int8":
        return (
            f"recipe {recipe.name!r}: the quantized HF checkpoint format has no INT8 KV cache (ModelOpt's "
            "export_hf_checkpoint supports fp8/nvfp4 KV); use --format trtllm or kv_cache_dtype fp8"
        )
    return None


def needs_calibration(recipe: Recipe) -> bool:
    """Whether the recipe's quantizers need calibration forward passes (activations or KV cache)."""
    return scheme(recipe.quantization).needs_activations or recipe.kv_cache_dtype != "auto"


def modelopt_config(recipe: Recipe) -> dict[str, Any] | None:
    """The ModelOpt quantize config of a recipe: the named preset, its group size, plus the KV cache entry."""
    quant = scheme(recipe.quantization)
    kv_cfg_name, kv_algo, _ = KV_SCHEMES[recipe.kv_cache_dtype]
    if quant.modelopt_cfg is None and kv_algo is None:
        return None
    import modelopt.torch.quantization as mtq

    if quant.modelopt_cfg is None:  # KV cache only on an unquantized model
        cfg: dict[str, Any] = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
    else:
        cfg = copy.deepcopy(getattr(mtq, quant.modelopt_cfg))
    if quant.group_size:
        _set_group_size(cfg["quant_cfg"], recipe.group_size)
    if kv_cfg_name is not None:
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(getattr(mtq, kv_cfg_name)["quant_cfg"])
    elif kv_algo == "INT8":
        # ModelOpt ships no INT8 KV preset; its exporter reads 8-bit k/v bmm quantizers as
        # kv_cache_quant_algo INT8
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
            {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": 8, "axis": None}}
        ]
    return cfg


def _set_group_size(entries: Iterable[Any], group_size: int) -> None:
    for entry in entries:
        cfgs = entry.get("cfg") if isinstance(entry, dict) else None
        for cfg in cfgs if isinstance(cfgs, list) else [cfgs]:
            blocks = cfg.get("block_sizes") if isinstance(cfg, dict) else None
            if isinstance(blocks, dict) and -1 in blocks:
                blocks[-1] = group_size


# --- the step ---------------------------------------------------------------------------------------------


def quantize(
    model_dir: Path,
    recipe: Recipe,
    *,
    layouts: list[tuple[int, int]],
    output_dir: Path,
    dtype: str,
    device: str,
    lineage: dict[str, Any],
    calibration: TokenSet | None,
    heldout: TokenSet | None = None,
    max_ppl_increase_pct: float | None = None,
    formats: Sequence[Format] = ("trtllm", "hf"),
    batch_size: int = CALIBRATION_BATCH,
    on_progress: Any = None,
    export_if: Callable[[Perplexity], bool] | None = None,
) -> QuantizedCheckpoint:
    """Calibrate ``recipe`` on ``model_dir`` once and export it for every ``(tp, pp)`` in ``layouts``.

    ``dtype`` is the checkpoint dtype of unquantized tensors. With ``heldout`` tokens the fake-quant
    perplexity is measured against the unquantized model and returned; the caller decides the gate:
    ``export_if(perplexity)`` False returns the numbers with nothing exported, and over
    ``max_ppl_increase_pct`` the recipe is refused (``GateFailedError``) before anything is exported.
    """
    from kiln.hub import inspect_model

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    layouts = sorted(set(layouts)) or [(1, 1)]
    info = inspect_model(model_dir)
    quant = check_recipe(recipe, info, device=device, layouts=layouts, dtype=dtype)
    check_calibration(recipe, info, calibration)
    family = family_for(info.architecture)
    if "trtllm" in formats and family.modelopt_decoder is None:
        raise UnsupportedCombinationError(
            f"{info.architecture} ({family.name}): ModelOpt exports no TensorRT-LLM checkpoint for this "
            "family, only the unified HF checkpoint (--format hf), which the torch engine and TensorRT-LLM's "
            "PyTorch backend load"
        )
    if "trtllm" not in formats and layouts != [(1, 1)]:
        raise UnsupportedCombinationError(
            f"tp/pp {layouts}: the HF checkpoint export is unsharded (tp 1, pp 1); "
            "sharded exports are TensorRT-LLM checkpoints (--format trtllm)"
        )
    if list(formats) == ["hf"] and (why := hf_export_problem(recipe)):
        raise UnsupportedCombinationError(why)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(constants.torch_extensions_dir()))

    import torch

    timings: dict[str, float] = {}
    _seed_everything(SEED)
    start = time.perf_counter()
    model = _load_model(model_dir, device=device, dtype=dtype)
    timings["load"] = time.perf_counter() - start

    cfg = modelopt_config(recipe)
    baseline_nll = None
    if heldout is not None and cfg is not None:  # an unquantized export equals its baseline
        start = time.perf_counter()
        baseline_nll = _heldout_nll(model, heldout.token_ids, device)
        timings["baseline_ppl"] = time.perf_counter() - start

    calibrated = False
    if cfg is not None:
        import modelopt.torch.quantization as mtq

        start = time.perf_counter()
        forward_loop = None
        if needs_calibration(recipe):
            assert calibration is not None  # check_calibration refused it otherwise
            forward_loop = _forward_loop(calibration.token_ids, device, batch_size, on_progress)
            calibrated = True
        with torch.inference_mode(False), _quiet():
            mtq.quantize(model, cfg, forward_loop=forward_loop)
        timings["calibrate"] = time.perf_counter() - start

    perplexity = None
    if baseline_nll is not None and heldout is not None:
        start = time.perf_counter()
        quant_nll = _heldout_nll(model, heldout.token_ids, device)
        timings["quantized_ppl"] = time.perf_counter() - start
        perplexity = _perplexity(baseline_nll, quant_nll, heldout.sha256)
        if max_ppl_increase_pct is not None and perplexity.increase_pct > max_ppl_increase_pct:
            refused = GateFailedError(
                f"recipe {recipe.name!r}: fake-quant perplexity {perplexity.quantized:.3f} vs baseline "
                f"{perplexity.baseline:.3f} (+{perplexity.increase_pct:.2f}%) is over max_ppl_increase_pct "
                f"{max_ppl_increase_pct:g} on {perplexity.num_tokens} held-out tokens; no engine is built "
                "from it. Use a milder recipe (e.g. int8_wo, fp8, int4_awq with a smaller group_size) or "
                "relax the gate"
            )
            raise refused
        if export_if is not None and not export_if(perplexity):
            return QuantizedCheckpoint(
                recipe=recipe.name,
                quantization=recipe.quantization,
                trtllm_dirs={},
                hf_dir=None,
                calibration_sha256=calibration.sha256 if calibration is not None and calibrated else None,
                quant_algo=quant.quant_algo,
                kv_cache_quant_algo=KV_SCHEMES[recipe.kv_cache_dtype][1],
                calibrated=calibrated,
                timings_s={k: round(v, 3) for k, v in timings.items()},
                perplexity=perplexity,
            )

    decoder_type = family.modelopt_decoder
    torch_dtype = getattr(torch, dtype)
    versions = toolchain_versions()
    full_lineage = {
        **lineage,
        "recipe": lineage.get("recipe", recipe.name),
        "quantization": recipe.quantization,
        "kv_cache_dtype": recipe.kv_cache_dtype,
        "group_size": recipe.group_size if quant.group_size else None,
        "calibration_sha256": calibration.sha256 if calibration is not None and calibrated else None,
        "calibration_source": calibration.source if calibration is not None and calibrated else None,
        "dtype": dtype,
        "versions": versions,
        "perplexity": asdict(perplexity) if perplexity else None,
    }

    trtllm_dirs: dict[str, Path] = {}
    output_dir.mkdir(parents=True, exist_ok=True)
    if "trtllm" in formats:
        from modelopt.torch.export import export_tensorrt_llm_checkpoint

        start = time.perf_counter()
        for tp, pp in layouts:
            target = output_dir / f"trtllm-{layout_key(tp, pp)}"
            shutil.rmtree(target, ignore_errors=True)
            with torch.no_grad(), _quiet():
                export_tensorrt_llm_checkpoint(
                    model,
                    decoder_type,
                    dtype=torch_dtype,
                    export_dir=target,
                    inference_tensor_parallel=tp,
                    inference_pipeline_parallel=pp,
                )
            restore_rope_config(target, model.config.to_dict())
            if identity_pre_quant_scale(quant):
                fix_pre_quant_scale(target, "trtllm")
            if family.trtllm_config:
                config_path = target / "config.json"
                config_path.write_text(
                    json.dumps({**json.loads(config_path.read_text()), **family.trtllm_config}, indent=4)
                )
            _write_lineage(
                target, {**full_lineage, "format": "tensorrt_llm_checkpoint", "tp_size": tp, "pp_size": pp}
            )
            trtllm_dirs[layout_key(tp, pp)] = target
        timings["export_trtllm"] = time.perf_counter() - start

    hf_dir = None
    # last: ModelOpt's HF export folds scales into the module weights in place
    if "hf" in formats and hf_export_problem(recipe) is None:
        start = time.perf_counter()
        hf_dir = output_dir / "hf"
        _export_hf(model, model_dir, hf_dir, torch_dtype, quantized=cfg is not None)
        if identity_pre_quant_scale(quant):
            fix_pre_quant_scale(hf_dir, "hf")
        _write_lineage(hf_dir, {**full_lineage, "format": "hf_checkpoint"})
        timings["export_hf"] = time.perf_counter() - start

    # what ModelOpt wrote wins over kiln's table (e.g. block-wise INT4 weight-only exports as W4A16_AWQ)
    written = _written_quantization(trtllm_dirs)
    return QuantizedCheckpoint(
        recipe=recipe.name,
        quantization=recipe.quantization,
        trtllm_dirs=trtllm_dirs,
        hf_dir=hf_dir,
        calibration_sha256=full_lineage["calibration_sha256"],
        quant_algo=written.get("quant_algo", quant.quant_algo),
        kv_cache_quant_algo=written.get("kv_cache_quant_algo", KV_SCHEMES[recipe.kv_cache_dtype][1]),
        calibrated=calibrated,
        timings_s={k: round(v, 3) for k, v in timings.items()},
        perplexity=perplexity,
    )


# --- helpers ------------------------------------------------------------------------------------------------


def toolchain_versions() -> dict[str, str]:
    """What a checkpoint's lineage records: Python and the packages that shaped its weights."""
    from kiln.host import installed_versions

    return {
        "python": platform.python_version(),
        **installed_versions(("nvidia-modelopt", "torch", "transformers", "kiln-llm")),
    }


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


class _quiet:
    """Silence ModelOpt's per-module prints (hundreds of lines per model) on stdout."""

    def __enter__(self) -> None:
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._redirect.__exit__(*exc)


def _load_model(model_dir: Path, *, device: str, dtype: str) -> torch.nn.Module:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # CPU calibrates in float32 (bf16 matmuls are slow there and lose precision); GPUs in the checkpoint dtype
    load_dtype = torch.float32 if device == "cpu" else getattr(torch, dtype)
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    quant_config = getattr(config, "quantization_config", None)
    if quant_config is not None:
        method = (
            quant_config.get("quant_method")
            if isinstance(quant_config, dict)
            else getattr(quant_config, "quant_method", None)
        )
        fix = (
            "if these safetensors are a dequantized GGUF conversion, delete quantization_config from "
            "config.json (`kiln assets prepare` writes SmolLM2 without it)"
            if str(method) == "gguf"
            else "point the profile at it"
        )
        raise KilnInputError(
            f"{model_dir}/config.json: the model is already quantized ({method}); kiln "
            f"calibrates from the unquantized checkpoint: {fix}"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), config=config, dtype=load_dtype, trust_remote_code=False, use_safetensors=True
    )
    return model.to(device).eval()


def _batches(token_ids: Sequence[Sequence[int]], batch_size: int) -> Iterable[list[list[int]]]:
    # same-length windows batch together; ragged ones (a short last window) go alone
    by_len: dict[int, list[list[int]]] = {}
    for window in token_ids:
        by_len.setdefault(len(window), []).append(list(window))
    for windows in by_len.values():
        for start in range(0, len(windows), batch_size):
            yield windows[start : start + batch_size]


def _forward_loop(token_ids: Sequence[Sequence[int]], device: str, batch_size: int, on_progress: Any) -> Any:
    import torch

    batches = list(_batches(token_ids, batch_size))

    def loop(model: torch.nn.Module) -> None:
        for index, batch in enumerate(batches):
            with torch.no_grad():
                model(input_ids=torch.tensor(batch, device=device), use_cache=False)
            if on_progress:
                on_progress(index + 1, len(batches))

    return loop


def _heldout_nll(
    model: torch.nn.Module, token_ids: Sequence[Sequence[int]], device: str
) -> tuple[float, int]:
    """Summed NLL and predicted tokens over the held-out windows, as kiln.validation.accuracy counts them."""
    import torch

    total, tokens = 0.0, 0
    for window in token_ids:
        if len(window) < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(window)], device=device), use_cache=False).logits[0]
        log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
        targets = torch.tensor(window[1:], device=device, dtype=torch.long).unsqueeze(1)
        total += -log_probs.gather(1, targets).sum().item()
        tokens += len(window) - 1
    if not tokens:
        raise CalibrationDataError("held-out set has no window of 2+ tokens: raise evaluation.heldout_tokens")
    return total, tokens


def _perplexity(baseline: tuple[float, int], quantized: tuple[float, int], sha256: str) -> Perplexity:
    ppl_b = math.exp(baseline[0] / baseline[1])
    ppl_q = math.exp(quantized[0] / quantized[1])
    return Perplexity(
        baseline=ppl_b,
        quantized=ppl_q,
        increase_pct=100.0 * (ppl_q - ppl_b) / ppl_b,
        num_tokens=baseline[1],
        heldout_sha256=sha256,
    )


def _export_hf(
    model: torch.nn.Module, model_dir: Path, hf_dir: Path, torch_dtype: torch.dtype, *, quantized: bool
) -> None:
    shutil.rmtree(hf_dir, ignore_errors=True)
    hf_dir.mkdir(parents=True)
    # transformers 5 configs loaded from some dirs lack architectures; ModelOpt's exporter needs it and a
    # dtype
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.to(torch_dtype)  # last step: CPU calibrated in float32; the export's config.json names its dtype
    if quantized:
        from modelopt.torch.export import export_hf_checkpoint

        with _quiet():
            export_hf_checkpoint(model, dtype=torch_dtype, export_dir=hf_dir)
    else:
        model.save_pretrained(hf_dir)
    for name in constants.MODEL_SIDE_FILES:  # runtimes load the tokenizer from the checkpoint dir
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, hf_dir / name)


def _written_quantization(trtllm_dirs: dict[str, Path]) -> dict[str, Any]:
    for directory in trtllm_dirs.values():
        return dict(json.loads((directory / "config.json").read_text()).get("quantization") or {})
    return {}


def identity_pre_quant_scale(quant: QuantScheme) -> bool:
    """Whether the recipe exports as W4A16_AWQ without AWQ calibration (block-wise INT4 weight-only:
    ``int4_wo``), so its pre-quant scale is identically one."""
    return quant.quant_algo == "W4A16_AWQ" and not quant.needs_activations


def fix_pre_quant_scale(directory: Path, fmt: Format) -> str | None:
    """Make a W4A16_AWQ export's ``pre_quant_scale`` flag and its tensors agree; return what changed (None:
    nothing).

    ModelOpt 0.47 exports block-wise INT4 weight-only as ``quant_algo: W4A16_AWQ`` with
    ``pre_quant_scale: true`` but writes no pre-quant scale tensor. The two TensorRT-LLM paths differ
    (contract ``support.sources``):

    - trtllm-build (``groupwise_prequant``) creates a ``prequant_scaling_factor`` parameter on every groupwise
      linear only when the config says ``pre_quant_scale`` and fails with 'Required but not provided tensors'
      otherwise; its preprocess needs no pre-quant scale. So the TensorRT-LLM checkpoint gets the flag the
      tensors have: ``pre_quant_scale: false`` (``fmt="trtllm"``).
    - the PyTorch backend's W4A16_AWQ loader (``torch_w4a16_awq``) reads ``pre_quant_scale`` for every unfused
      linear whatever the flag says. So the HF export gets the tensors the flag announces: ``pre_quant_scale``
      of ones (the exact value: no activation smoothing happened) on every INT4 linear, in the checkpoint
      dtype, ``[in_features]`` as ModelOpt writes AWQ's (``fmt="hf"``).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    if fmt == "trtllm":
        path = directory / "config.json"
        config = json.loads(path.read_text())
        quant = config.get("quantization") or {}
        if quant.get("quant_algo") != "W4A16_AWQ" or not quant.get("pre_quant_scale"):
            return None
        for rank_file in sorted(directory.glob("rank*.safetensors")):
            with safe_open(str(rank_file), framework="pt") as handle:
                if any(name.endswith(".prequant_scaling_factor") for name in handle.keys()):
                    return None  # AWQ scales are there: the flag is right
        config["quantization"] = {**quant, "pre_quant_scale": False}
        path.write_text(json.dumps(config, indent=4))
        return "pre_quant_scale: false (no prequant_scaling_factor tensors)"
    quant = json.loads((directory / "hf_quant_config.json").read_text()).get("quantization") or {}
    if quant.get("quant_algo") != "W4A16_AWQ" or not quant.get("pre_quant_scale"):
        return None
    config = json.loads((directory / "config.json").read_text())
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float16"))
    added: dict[str, str] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        new = {}
        for name, weight in tensors.items():
            prefix = name.removesuffix(".weight")
            if (
                prefix == name
                or weight.dtype != torch.uint8
                or f"{prefix}.weight_scale" not in tensors
                or f"{prefix}.pre_quant_scale" in tensors
            ):
                continue
            new[f"{prefix}.pre_quant_scale"] = torch.ones(
                weight.shape[1], dtype=dtype
            )  # packed (out / 2, in)
        if new:
            save_file({**tensors, **new}, str(path), metadata=metadata)
            added.update(dict.fromkeys(new, path.name))
    index = directory / "model.safetensors.index.json"
    if added and index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("weight_map", {}).update(added)
        index.write_text(json.dumps(data, indent=2))
    return f"{len(added)} pre_quant_scale tensors of ones" if added else None


def restore_rope_config(checkpoint_dir: Path, hf_config: dict[str, Any]) -> None:
    """Write ``rotary_base`` / ``rotary_scaling`` into an exported checkpoint's config.json.

    ModelOpt 0.47's TensorRT-LLM export reads ``rope_theta`` / ``rope_scaling``, which transformers 5 moved
    into ``rope_parameters``: it silently drops both, and TensorRT-LLM (and kiln's engine) would then run
    SmolLM2's theta 100000 as the default 10000, or Llama 3 without its RoPE scaling.
    """
    path = Path(checkpoint_dir) / "config.json"
    config = json.loads(path.read_text())
    rope = dict(hf_config.get("rope_parameters") or {})
    if hf_config.get("rope_scaling"):
        rope = {**hf_config["rope_scaling"], **rope}
    theta = rope.pop("rope_theta", None) or hf_config.get("rope_theta")
    if theta is not None:
        config["rotary_base"] = float(theta)
    kind = rope.pop("rope_type", None) or rope.pop("type", None)
    if kind and kind != "default":
        config["rotary_scaling"] = {"type": kind, **rope}
    path.write_text(json.dumps(config, indent=4))


def _write_lineage(directory: Path, lineage: dict[str, Any]) -> None:
    (directory / constants.LINEAGE_FILE).write_text(
        json.dumps(lineage, indent=2, sort_keys=True, default=str) + "\n"
    )
