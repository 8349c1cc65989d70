"""Llama-family decoders (Llama 2/3, Mistral, Qwen2): RMSNorm, SwiGLU, GQA, RoPE with Llama 3 / linear
scaling; Qwen2 adds q/k/v biases. ModelOpt writes their TensorRT-LLM checkpoint, which the torch engine
and ``trtllm-build`` both compile from."""

from __future__ import annotations

from kiln.families.base import Family

LLAMA = Family(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    summary="Llama 2/3.x, Mistral: RMSNorm, SwiGLU, GQA, RoPE (llama3 / linear scaling)",
    modelopt_decoder="llama",
)

QWEN2 = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    summary="Qwen2 / Qwen2.5: the Llama layout with q/k/v biases",
    modelopt_decoder="qwen",
)
