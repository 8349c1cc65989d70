"""Phi-3 and Phi-4 (``Phi3ForCausalLM``): fused ``qkv_proj`` and ``gate_up_proj`` weights, LongRoPE (``su``)
scaling with short and long factors, partial rotary on Phi-4-mini. ModelOpt 0.47 exports only the unified
HF checkpoint for it. The RoPE tables come from transformers' own ``ROPE_INIT_FUNCTIONS`` at compile time:
the long factors when the target's ``max_seq_len`` exceeds ``original_max_position_embeddings`` (as
transformers picks them for a sequence that long), the short ones otherwise."""

from __future__ import annotations

from kiln.families.base import Family, HFNames

PHI3 = Family(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    summary="Phi-3 / Phi-4: fused qkv and gate_up, LongRoPE short/long factors, partial rotary",
    modelopt_decoder=None,
    hf_names=HFNames(qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",)),
)
