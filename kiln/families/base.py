"""What a model family declares: architectures, export path, recipes, and how its checkpoint maps onto the
engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

Export = Literal["trtllm", "hf"]

ALL_RECIPES = ("none", "fp8", "int8_sq", "int8_wo", "int4_wo", "int4_awq", "w4a8_awq", "nvfp4")


@dataclass(frozen=True)
class HFNames:
    """Where a family's HF checkpoint keeps each engine tensor, relative to ``model.layers.{i}.``.

    A one-element ``qkv`` or ``gate_up`` is a fused HF weight (Phi-3); ``norms`` maps the engine's norm
    slots to the HF module names (Gemma's sandwich norms use all four); ``experts`` are the gate, up and
    down projections of expert ``{e}`` in a MoE layer, routed by ``router``.
    """

    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    dense: str = "self_attn.o_proj"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"
    norms: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType(
            {"input_layernorm": "input_layernorm", "post_layernorm": "post_attention_layernorm"}
        )
    )
    qk_norms: tuple[str, str] | None = None
    router: str | None = None
    experts: tuple[str, str, str] | None = None


def no_numerics(config: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Family:
    """One family of HF architectures that kiln quantizes, exports and runs the same way."""

    name: str
    architectures: tuple[str, ...]
    summary: str
    modelopt_decoder: str | None
    """``decoder_type`` of ModelOpt's ``export_tensorrt_llm_checkpoint``; None where ModelOpt 0.47 refuses
    to write a TensorRT-LLM checkpoint for the family (it says to export the unified HF checkpoint)."""
    refused: Mapping[str, str] = field(default_factory=dict)
    """kiln quantization -> why ModelOpt or the engine cannot do it for this family."""
    hf_names: HFNames = field(default_factory=HFNames)
    numerics: Callable[[Mapping[str, Any]], dict[str, Any]] = no_numerics
    """HF ``config.json`` -> the family's ``ModelSpec`` fields (activation, norms, soft-caps, experts ...)."""
    fixed_numerics: Mapping[str, Any] = field(default_factory=dict)
    """``ModelSpec`` fields true of every model of the family (also for its TensorRT-LLM checkpoint, whose
    config.json does not carry them)."""
    trtllm_config: Mapping[str, Any] = field(default_factory=dict)
    """Keys kiln adds to the TensorRT-LLM checkpoint's config.json that TensorRT-LLM reads but ModelOpt's
    export (without tensorrt_llm installed) leaves out (evidence in the family's module)."""
    moe: bool = False

    @property
    def exports(self) -> tuple[Export, ...]:
        """The checkpoints ModelOpt writes for it: the TensorRT-LLM checkpoint where it can, the HF one
        always."""
        return ("trtllm", "hf") if self.modelopt_decoder else ("hf",)

    @property
    def engine_source(self) -> Export:
        """Which export the torch engine compiles from (the TensorRT-LLM checkpoint where there is one)."""
        return self.exports[0]

    @property
    def recipes(self) -> tuple[str, ...]:
        return tuple(r for r in ALL_RECIPES if r not in self.refused)

    def recipe_problem(self, quantization: str) -> str | None:
        """Why this family cannot be quantized with ``quantization``, or None."""
        why = self.refused.get(quantization)
        return None if why is None else f"{self.name} models: {quantization} is not supported: {why}"
