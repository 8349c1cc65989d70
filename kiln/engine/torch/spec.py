"""The model a checkpoint describes, read from its ``config.json`` and checked up front.

Two sources: a TensorRT-LLM checkpoint (``read_spec``; the families ModelOpt exports that way) and a
ModelOpt unified HF checkpoint (``kiln.engine.torch.hf_checkpoint``; every family). Only what the torch
engine executes is accepted: the families of ``kiln.families`` and the quant algos kiln's recipes
export. Anything else is refused, naming the field and value, before a single weight is read. The
per-family numerics (activation, norms, soft-caps, sliding windows, experts) are ``ModelSpec`` fields whose
defaults are the Llama layout, so engines built before they existed load unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.errors import ModelSourceError
from kiln.families import family_for

QUANT_ALGOS = (None, "FP8", "W8A8_SQ_PER_CHANNEL", "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ")
KV_CACHE_QUANT_ALGOS = (None, "FP8")
ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes, numerics and layout of one checkpoint (all ranks)."""

    architecture: str
    dtype: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int | None = None
    exclude_modules: tuple[str, ...] = ()
    tp_size: int = 1
    pp_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    # family numerics (kiln.families); the defaults are the Llama layout
    family: str = "llama"
    activation: str = "silu"
    """``silu`` (SwiGLU) or ``gelu_tanh`` (GeGLU)."""
    norm_offset: bool = False
    """Gemma's RMSNorm: ``x * (1 + w)`` in float32 (the engine stores ``1 + w`` as float32)."""
    embed_scale: float | None = None
    qk_norm: bool = False
    sandwich_norms: bool = False
    """Norms after attention and after the MLP too (``post_attention_norm``, ``post_mlp_norm``)."""
    attn_scale: float | None = None
    """Softmax scale of attention (None: ``head_size ** -0.5``)."""
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_types: tuple[str, ...] = ()
    """Per layer ``full_attention`` or ``sliding_attention`` (empty: all full)."""
    sliding_window: int | None = None
    rotary_dim: int | None = None
    """Rotated dims per head (None: all; Phi-4-mini's partial rotary rotates fewer)."""
    rope_tables: tuple[str, ...] = ()
    """Layer types whose RoPE inverse frequencies the engine stores (``rope.<type>.inv_freq``), computed at
    compile time by transformers; empty: computed from ``rope_theta`` / ``rope_scaling``."""
    rope_attention_scaling: dict[str, float] = field(default_factory=dict)
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("exclude_modules", "layer_types", "rope_tables"):
            data[key] = list(getattr(self, key))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        tuples = {key: tuple(data.get(key, ())) for key in ("exclude_modules", "layer_types", "rope_tables")}
        return cls(**{**data, **tuples})

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer, or None for full attention."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def rope_kind(self, layer: int) -> str:
        return (
            self.layer_types[layer]
            if self.layer_types and self.layer_types[layer] in self.rope_tables
            else "default"
        )

    def local_heads(self, tp_size: int) -> tuple[int, int]:
        """(query heads, kv heads) one tensor-parallel rank holds; kv heads replicate when fewer than
        ranks."""
        return self.num_heads // tp_size, max(1, self.num_kv_heads // tp_size)

    def kv_bytes_per_token(self, element_size: int) -> int:
        _, kv_local = self.local_heads(self.tp_size)
        return 2 * self.num_layers * kv_local * self.head_size * element_size


def check_quantization(quant: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """(quant_algo, kv_cache_quant_algo) of a checkpoint's quantization record, refused unless the torch
    engine runs them; ``where`` prefixes each field name (the file, and the record's key in it)."""
    quant_algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if quant_algo not in QUANT_ALGOS:
        raise ModelSourceError(
            f"{where}quant_algo: {quant_algo!r} is not supported by the torch engine; "
            f"supported: {', '.join(str(a) for a in QUANT_ALGOS)}"
        )
    if kv_algo not in KV_CACHE_QUANT_ALGOS:
        raise ModelSourceError(
            f"{where}kv_cache_quant_algo: {kv_algo!r}; "
            f"supported: {', '.join(str(a) for a in KV_CACHE_QUANT_ALGOS)}"
        )
    if quant.get("has_zero_point"):
        raise ModelSourceError(
            f"{where}has_zero_point: true is not supported (ModelOpt AWQ exports symmetric "
            "INT4 without zero points)"
        )
    return quant_algo, kv_algo


def read_spec(checkpoint_dir: Path) -> ModelSpec:
    """Parse and validate ``checkpoint_dir/config.json`` (TensorRT-LLM checkpoint format)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ModelSourceError(
            f"{path}: no such file; a TensorRT-LLM checkpoint dir holds config.json + rank<N>.safetensors "
            "(made by `kiln quantize` / ModelOpt export_tensorrt_llm_checkpoint)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{path}: not valid JSON: {exc}") from None

    def need(key: str, kind: type = int) -> Any:
        if key not in config:
            raise ModelSourceError(f"{path}: missing field {key!r}")
        try:
            return kind(config[key])
        except (TypeError, ValueError):
            raise ModelSourceError(f"{path}: {key}: {config[key]!r} is not a {kind.__name__}") from None

    architecture = need("architecture", str)
    family = family_for(architecture, f"{path}: architecture")
    if family.engine_source != "trtllm":
        raise ModelSourceError(
            f"{path}: {architecture} ({family.name}) compiles from ModelOpt's unified HF "
            "checkpoint, not a TensorRT-LLM checkpoint: pass the HF export dir"
        )
    if config.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox":
        raise ModelSourceError(
            f"{path}: position_embedding_type: {config['position_embedding_type']!r}; allowed: rope_gpt_neox"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ModelSourceError(f"{path}: hidden_act: {config['hidden_act']!r}; allowed: silu")
    if float(config.get("rotary_pct", 1.0)) != 1.0:
        raise ModelSourceError(f"{path}: rotary_pct: {config['rotary_pct']!r}; allowed: 1.0")
    window = config.get("sliding_window") or config.get("max_attention_window_size")
    if window and int(window) < need("max_position_embeddings"):
        raise ModelSourceError(
            f"{path}: sliding_window {window} is not supported by the torch engine; "
            "use a checkpoint with full attention"
        )

    quant = config.get("quantization") or {}
    quant_algo, kv_algo = check_quantization(quant, f"{path}: quantization.")
    scaling = config.get("rotary_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ROPE_SCALING_TYPES:
            raise ModelSourceError(
                f"{path}: rotary_scaling.type: {kind!r}; supported: {', '.join(ROPE_SCALING_TYPES)}"
            )
        scaling = {**scaling, "type": kind}

    mapping = config.get("mapping") or {}
    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    spec = ModelSpec(
        architecture=architecture,
        dtype=need("dtype", str),
        num_layers=need("num_hidden_layers"),
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_size=int(config.get("head_size") or hidden // num_heads),
        intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        norm_eps=float(config.get("norm_epsilon", 1e-5)),
        rope_theta=float(config.get("rotary_base", 10000.0)),
        max_position_embeddings=need("max_position_embeddings"),
        rope_scaling=scaling or None,
        quant_algo=quant_algo,
        kv_cache_quant_algo=kv_algo,
        group_size=quant.get("group_size") if quant_algo and "W4" in quant_algo else None,
        exclude_modules=tuple(quant.get("exclude_modules") or ()),
        tp_size=int(mapping.get("tp_size", 1)),
        pp_size=int(mapping.get("pp_size", 1)),
        family=family.name,
        **family.fixed_numerics,
    )
    if not 1 <= spec.pp_size <= spec.num_layers:
        raise ModelSourceError(
            f"{path}: mapping.pp_size {spec.pp_size} must be between 1 and the model's "
            f"{spec.num_layers} layers"
        )
    if spec.num_heads % spec.tp_size or (
        spec.num_kv_heads % spec.tp_size and spec.tp_size % spec.num_kv_heads
    ):
        raise ModelSourceError(
            f"{path}: mapping.tp_size {spec.tp_size} does not divide {spec.num_heads} heads / "
            f"{spec.num_kv_heads} kv heads"
        )
    ranks = spec.tp_size * spec.pp_size
    missing = [
        f"rank{r}.safetensors" for r in range(ranks) if not (path.parent / f"rank{r}.safetensors").is_file()
    ]
    if missing:
        raise ModelSourceError(
            f"{path.parent}: missing {', '.join(missing)} for tp_size {spec.tp_size} x pp_size {spec.pp_size}"
        )
    return spec


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """RoPE inverse frequencies (float32), with the checkpoint's scaling applied exactly as HF transformers
    does."""
    dim = spec.head_size
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if not scaling:
        return inv
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return inv / factor
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
