"""Qwen3 dense decoders: the Llama layout without qkv bias, plus a per-head RMSNorm on q and k before RoPE.
ModelOpt's TensorRT-LLM export (decoder ``qwen``) writes those norms as ``attention.q_layernorm`` /
``attention.k_layernorm``; the HF export keeps ``self_attn.q_norm`` / ``k_norm``.

TensorRT-LLM's TensorRT-backend Qwen model builds those norms (``qk_layernorm``) and drops the qkv bias only
when the checkpoint's ``qwen_type`` is ``qwen3`` (tensorrt_llm/models/qwen/config.py @373970a8,
models/qwen/convert.py @65b31db1; kiln/contracts/tensorrt_llm-1.2.json ``architectures.engine``); ModelOpt
0.47's export writes no ``qwen_type``, so kiln adds it.
"""

from __future__ import annotations

from kiln.families.base import Family, HFNames

QWEN3 = Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    summary="Qwen3 dense: per-head q/k RMSNorm, no qkv bias, GQA, RoPE",
    modelopt_decoder="qwen",
    hf_names=HFNames(qk_norms=("self_attn.q_norm", "self_attn.k_norm")),
    fixed_numerics={"qk_norm": True},
    trtllm_config={"qwen_type": "qwen3"},
)
