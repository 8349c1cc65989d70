"""Gemma 2 and Gemma 3 (text) decoders.

What sets them apart from Llama, each read from the HF config: GeGLU with tanh-approximated GELU;
RMSNorm that multiplies by ``1 + w`` in float32; the embedding scaled by ``sqrt(hidden_size)``; sandwich
norms (after attention and after the MLP as well as before them); attention scaled by
``query_pre_attn_scalar ** -0.5``; sliding-window layers interleaved with global ones (``layer_types``),
with their own RoPE base on Gemma 3 (``rope_parameters`` per layer type); attention and final-logit
soft-capping on Gemma 2; per-head q/k norms on Gemma 3. ModelOpt 0.47 refuses to write their
TensorRT-LLM checkpoint ("not supported by TensorRT-LLM yet ... deploy with the PyTorch backend"), so the
engine compiles from the unified HF export.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from kiln.families.base import Family, HFNames

_SANDWICH = MappingProxyType(
    {
        "input_layernorm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_layernorm": "pre_feedforward_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    }
)
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def gemma_numerics(config: Mapping[str, Any]) -> dict[str, Any]:
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    return {
        "activation": "gelu_tanh" if activation in GELU_TANH else activation,
        "norm_offset": True,
        "embed_scale": float(config["hidden_size"]) ** 0.5,
        "sandwich_norms": True,
        "attn_scale": float(config.get("query_pre_attn_scalar") or config["head_dim"]) ** -0.5,
        "attn_softcap": config.get("attn_logit_softcapping"),
        "final_softcap": config.get("final_logit_softcapping"),
    }


GEMMA2 = Family(
    name="gemma2",
    architectures=("Gemma2ForCausalLM",),
    summary="Gemma 2: GeGLU, (1 + w) RMSNorm, sandwich norms, sliding/global layers, logit soft-capping",
    modelopt_decoder=None,
    hf_names=HFNames(norms=_SANDWICH),
    numerics=gemma_numerics,
)

GEMMA3 = Family(
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    summary="Gemma 3 text: Gemma 2's layout plus q/k norms and a RoPE base per layer type",
    modelopt_decoder=None,
    hf_names=HFNames(norms=_SANDWICH, qk_norms=("self_attn.q_norm", "self_attn.k_norm")),
    numerics=gemma_numerics,
    fixed_numerics={"qk_norm": True},
)
