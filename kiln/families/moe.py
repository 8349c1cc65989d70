"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE.

Both route each token to its top-k experts by a softmax over the router logits; Mixtral always
renormalises the k weights, Qwen3-MoE only with ``norm_topk_prob``; Qwen3-MoE has no shared expert and
adds Qwen3's q/k norms, and layers in ``mlp_only_layers`` (or off ``decoder_sparse_step``) keep a dense MLP.
ModelOpt 0.47 quantizes the experts (transformers 5's fused expert modules) with FP8 and INT8 and
exports them per expert in the unified HF checkpoint; its TensorRT-LLM export fails for them, and its
block-quantized INT4 export fails on the fused experts ("object of type 'QuantMixtralExperts' has no
len()"), so those recipes are refused up front.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kiln.families.base import Family, HFNames

_INT4 = (
    "ModelOpt 0.47's export of block-quantized INT4 fails on fused MoE experts (TypeError: object of "
    "type 'Quant...Experts' has no len()); use fp8, int8_wo or int8_sq"
)
_REFUSED = {
    "int4_wo": _INT4,
    "int4_awq": _INT4,
    "w4a8_awq": _INT4,
    "nvfp4": "not verified for MoE experts in kiln (needs a CUDA calibration run); use fp8",
}


def mixtral_numerics(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "num_experts": int(config["num_local_experts"]),
        "experts_per_token": int(config["num_experts_per_tok"]),
        "norm_topk_prob": True,
        "moe_intermediate_size": int(config["intermediate_size"]),
    }


def qwen3_moe_numerics(config: Mapping[str, Any]) -> dict[str, Any]:
    # transformers 5 writes num_local_experts; Qwen's own configs say num_experts
    experts = config.get("num_local_experts") or config["num_experts"]
    return {
        "num_experts": int(experts),
        "experts_per_token": int(config["num_experts_per_tok"]),
        "norm_topk_prob": bool(config.get("norm_topk_prob", False)),
        "moe_intermediate_size": int(config["moe_intermediate_size"]),
    }


MIXTRAL = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    summary="Mixtral: top-2 of 8 SwiGLU experts per layer, renormalised softmax router",
    modelopt_decoder=None,
    refused=_REFUSED,
    hf_names=HFNames(
        router="block_sparse_moe.gate",
        experts=(
            "block_sparse_moe.experts.{e}.w1",
            "block_sparse_moe.experts.{e}.w3",
            "block_sparse_moe.experts.{e}.w2",
        ),
    ),
    numerics=mixtral_numerics,
    moe=True,
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    summary="Qwen3-MoE: top-k of many experts, no shared expert, q/k norms, optional dense layers",
    modelopt_decoder=None,
    refused=_REFUSED,
    hf_names=HFNames(
        qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
        router="mlp.gate",
        experts=("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
    ),
    numerics=qwen3_moe_numerics,
    fixed_numerics={"qk_norm": True},
    moe=True,
)
