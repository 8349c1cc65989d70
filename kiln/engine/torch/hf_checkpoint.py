"""ModelOpt's unified HF checkpoint -> the torch engine's spec and runtime-layout tensors.

This is the forward path of ModelOpt (``export_hf_checkpoint``; ``export_tensorrt_llm_checkpoint`` is gone
in 0.49) and the only export ModelOpt 0.47 writes for Gemma, Phi-3 and the MoE families. The family
(``kiln.families``) says where each tensor lives (``HFNames``) and which numerics its config implies; the
tensors are renamed into the TensorRT-LLM checkpoint's names that ``linear.runtime_tensors`` converts, so
both sources share one conversion. RoPE tables come from transformers' own RoPE functions at compile
time and are stored in the engine (``rope.<layer type>.inv_freq``), so LongRoPE, Llama 3 and per-layer-type
bases need no reimplementation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kiln.engine.torch.linear import runtime_tensors
from kiln.engine.torch.spec import ModelSpec, check_quantization
from kiln.engine.torch.weights import fuse_rows
from kiln.errors import ModelSourceError
from kiln.families import Family, family_for
from kiln.hub import config_int, weight_files

QUANT_CONFIG = "hf_quant_config.json"
# ModelOpt's HF tensor suffixes -> the TensorRT-LLM checkpoint's, which runtime_tensors reads
_QUANT_SUFFIXES = {
    "weight_scale": "weights_scaling_factor",
    "input_scale": "activation_scaling_factor",
    "pre_quant_scale": "prequant_scaling_factor",
    "weight_scale_2": "weights_scaling_factor_2",
}
ALL_KINDS = ("dense", "fp8", "int8_sq", "int8_wo", "int4")


def is_hf_checkpoint(directory: Path) -> bool:
    """An HF checkpoint's config.json names ``architectures``; a TensorRT-LLM checkpoint's names
    ``architecture``."""
    path = Path(directory) / "config.json"
    try:
        return "architectures" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{path}: not a readable HF config.json ({exc})") from None
    quant: dict[str, Any] = {}
    quant_path = path.parent / QUANT_CONFIG
    if quant_path.is_file():
        try:
            quant = dict(json.loads(quant_path.read_text()).get("quantization") or {})
        except (OSError, ValueError) as exc:
            raise ModelSourceError(
                f"{quant_path}: not valid JSON ({exc}); re-export the checkpoint"
            ) from None
    return config, quant, path


def _rope_tables(directory: Path, layer_types: list[str], max_seq_len: int) -> RopeTables:
    """Inverse frequencies and attention scaling per layer type, from transformers' RoPE functions."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    config = getattr(config, "get_text_config", lambda: config)()
    params_all = dict(getattr(config, "rope_parameters", None) or {})
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tables = {}
    for layer_type in sorted(set(layer_types)) or ["default"]:
        per_type = layer_type in params_all and isinstance(params_all[layer_type], dict)
        params = params_all[layer_type] if per_type else params_all
        kind = params.get("rope_type", "default")
        if kind == "default":
            dim = int(head * params.get("partial_rotary_factor", 1.0))
            inv = 1.0 / (
                float(params["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
            )
            tables[layer_type] = (inv, 1.0)
            continue
        if kind not in ROPE_INIT_FUNCTIONS:
            raise ModelSourceError(
                f"{directory}/config.json: rope_type {kind!r} is not one transformers knows "
                f"({', '.join(ROPE_INIT_FUNCTIONS)})"
            )
        inv, scaling = ROPE_INIT_FUNCTIONS[kind](
            config, "cpu", seq_len=max_seq_len, layer_type=layer_type if per_type else None
        )
        tables[layer_type] = (inv.float().cpu(), float(scaling))
    return tables


RopeTables = dict[str, tuple[torch.Tensor, float]]


def read_hf_spec(directory: Path, max_seq_len: int | None = None) -> tuple[ModelSpec, Family, RopeTables]:
    """Parse and check an HF checkpoint's config (and ModelOpt's ``hf_quant_config.json``) into a spec, with
    the RoPE tables for an engine of ``max_seq_len`` (default: the model's maximum)."""
    config, quant, path = _read(directory)
    architecture = (config.get("architectures") or [None])[0]
    family = family_for(architecture, f"{path}: architectures", config.get("model_type"))
    quant_algo, kv_algo = check_quantization(quant, f"{path.parent / QUANT_CONFIG}: quantization.")

    def need(key: str) -> int:
        return config_int(config, key, path)

    num_layers, hidden, heads = need("num_hidden_layers"), need("hidden_size"), need("num_attention_heads")
    head_size = int(config.get("head_dim") or hidden // heads)
    layer_types = list(config.get("layer_types") or [])
    if not layer_types and config.get("sliding_window") and config.get("use_sliding_window", True):
        layer_types = ["sliding_attention"] * num_layers  # Phi-3 / Mistral style: one window for every layer
    if layer_types and len(layer_types) != num_layers:
        raise ModelSourceError(f"{path}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    sliding = "sliding_attention" in layer_types
    max_seq_len = max_seq_len or need("max_position_embeddings")
    # all-full layer types name one table "default" (what rope_kind answers when the spec keeps no layer
    # types)
    tables = _rope_tables(Path(directory), layer_types if sliding else [], max_seq_len)
    rotary = 2 * next(iter(tables.values()))[0].numel()
    numerics = {**family.numerics(config), **family.fixed_numerics}
    spec = ModelSpec(
        architecture=architecture,
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_size=head_size,
        intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(
            (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
        ),
        max_position_embeddings=need("max_position_embeddings"),
        quant_algo=quant_algo,
        kv_cache_quant_algo=kv_algo,
        group_size=quant.get("group_size") if quant_algo and "W4" in quant_algo else None,
        exclude_modules=tuple(quant.get("exclude_modules") or ()),
        family=family.name,
        layer_types=tuple(layer_types) if sliding else (),
        sliding_window=int(config["sliding_window"]) if sliding else None,
        rotary_dim=rotary if rotary != head_size else None,
        rope_tables=tuple(tables),
        rope_attention_scaling={k: v[1] for k, v in tables.items()},
        **numerics,
    )
    return spec, family, tables


def convert_hf(
    directory: Path, spec: ModelSpec, family: Family, rope: RopeTables, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the HF checkpoint in the engine's runtime layout (one rank), and its linear kinds."""
    directory = Path(directory)
    source = _load(directory)
    names = family.hf_names
    out: dict[str, torch.Tensor] = {}
    layout: dict[str, str] = {}
    where = directory / "model.safetensors"

    def take(name: str) -> torch.Tensor:
        if name not in source:
            raise ModelSourceError(
                f"{where}: missing tensor {name!r}; is this a {spec.architecture} checkpoint "
                "exported by ModelOpt export_hf_checkpoint (or save_pretrained)?"
            )
        return source[name]

    def norm(name: str) -> torch.Tensor:
        weight = take(f"{name}.weight")
        # Gemma multiplies by (1 + w) in float32; storing it so keeps its rounding (see model._rms_norm)
        return (1.0 + weight.float()) if spec.norm_offset else weight.to(dtype)

    def linear(hf: str, engine: str, into: dict[str, torch.Tensor] | None = None) -> str:
        prefix = f"{hf}."
        part = {
            f"{engine}.{_QUANT_SUFFIXES.get(k[len(prefix) :], k[len(prefix) :])}": v
            for k, v in source.items()
            if k.startswith(prefix)
        }
        if f"{engine}.weight" not in part:
            take(f"{hf}.weight")
        try:
            kind, tensors = runtime_tensors(engine, part, spec.quant_algo, dtype)
        except (KeyError, ValueError) as exc:
            raise ModelSourceError(f"{where}: {hf}: {exc}") from None
        (out if into is None else into).update({f"{engine}.{k}": t for k, t in tensors.items()})
        return kind

    out["transformer.vocab_embedding.weight"] = take("model.embed_tokens.weight").to(dtype)
    out["transformer.ln_f.weight"] = norm("model.norm")
    head = "lm_head" if "lm_head.weight" in source else "model.embed_tokens"
    layout["lm_head"] = linear(head, "lm_head")
    for kind, (inv_freq, _) in rope.items():
        out[f"rope.{kind}.inv_freq"] = inv_freq
    for i in range(spec.num_layers):
        hf, base = f"model.layers.{i}.", f"transformer.layers.{i}."
        for slot, module in names.norms.items():
            out[f"{base}{slot}.weight"] = norm(hf + module)
        if names.qk_norms:
            out[f"{base}attention.q_layernorm.weight"] = norm(hf + names.qk_norms[0])
            out[f"{base}attention.k_layernorm.weight"] = norm(hf + names.qk_norms[1])
        if len(names.qkv) == 1:
            layout[f"{base}attention.qkv"] = linear(hf + names.qkv[0], f"{base}attention.qkv")
        else:
            parts = [f"{base}attention.{p}" for p in "qkv"]
            for module, engine in zip(names.qkv, parts, strict=True):
                layout[engine] = linear(hf + module, engine)
            fuse_rows(parts, f"{base}attention.qkv", out, layout, ALL_KINDS)
        layout[f"{base}attention.dense"] = linear(hf + names.dense, f"{base}attention.dense")
        if names.router and f"{hf}{names.router}.weight" in source:  # Qwen3-MoE may keep some layers dense
            _experts(spec, names, hf, base, take, linear, out, layout)
        else:
            if len(names.gate_up) == 1:
                layout[f"{base}mlp.gate_up"] = linear(hf + names.gate_up[0], f"{base}mlp.gate_up")
            else:
                # TensorRT-LLM's names: fc is the activated (gate) projection, gate the up projection
                for module, engine in zip(names.gate_up, ("mlp.fc", "mlp.gate"), strict=True):
                    layout[base + engine] = linear(hf + module, base + engine)
                fuse_rows(
                    [f"{base}mlp.fc", f"{base}mlp.gate"], f"{base}mlp.gate_up", out, layout, ("dense", "fp8")
                )
            layout[f"{base}mlp.proj"] = linear(hf + names.down, f"{base}mlp.proj")
        if spec.kv_cache_quant_algo:
            for which in "kv":  # ModelOpt writes k_scale / v_scale on the attention's k and v projections
                found = [
                    k for k in source if k.startswith(f"{hf}self_attn.") and k.endswith(f".{which}_scale")
                ]
                if len(found) != 1:
                    raise ModelSourceError(
                        f"{where}: expected one {hf}self_attn.*.{which}_scale for the FP8 KV "
                        f"cache, found {found}; re-export with the fp8 kv_cache_dtype recipe"
                    )
                out[f"{base}attention.{which}_cache_scale"] = source[found[0]].float().reshape(())
    return out, layout


def _experts(
    spec: ModelSpec,
    names: Any,
    hf: str,
    base: str,
    take: Any,
    linear: Any,
    out: dict[str, torch.Tensor],
    layout: dict[str, str],
) -> None:
    """A MoE layer: the router (kept unquantized, as ModelOpt excludes it) and each projection of every
    expert stacked into ``[experts, ...]`` tensors (``moe.fc|gate|proj``), one kind for all experts."""
    out[f"{base}moe.router.weight"] = take(f"{hf}{names.router}.weight").to(
        out["transformer.vocab_embedding.weight"].dtype
    )
    for slot, template in zip(("fc", "gate", "proj"), names.experts, strict=True):
        per_expert: list[dict[str, torch.Tensor]] = []
        kinds = set()
        for e in range(spec.num_experts):
            tensors: dict[str, torch.Tensor] = {}
            kinds.add(linear(hf + template.format(e=e), "x", into=tensors))
            per_expert.append({k[2:]: v for k, v in tensors.items()})
        if len(kinds) != 1:
            raise ModelSourceError(
                f"{hf}{template}: experts are quantized differently ({sorted(kinds)}); "
                "re-export with one recipe for every expert"
            )
        for field in per_expert[0]:
            out[f"{base}moe.{slot}.{field}"] = torch.stack([t[field] for t in per_expert])
        layout[f"{base}moe.{slot}"] = kinds.pop()


def _load(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in weight_files(directory):  # model.safetensors, or the shards its index lists
        tensors.update(load_file(shard))
    return tensors
