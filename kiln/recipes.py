"""The one table from kiln recipe names to ModelOpt configs and TensorRT-LLM ``quant_algo`` values.

Recipes are named data, as in ModelOpt (``FP8_DEFAULT_CFG``): every other module looks a recipe up
here instead of branching on its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Quantization = Literal["none", "fp8", "int8_sq", "int8_wo", "int4_wo", "int4_awq", "w4a8_awq", "nvfp4"]
KVCacheDtype = Literal["auto", "fp8", "int8"]


@dataclass(frozen=True)
class QuantScheme:
    """How one kiln quantization maps onto ModelOpt and TensorRT-LLM."""

    modelopt_cfg: str | None
    """Attribute of ``modelopt.torch.quantization`` (None: no quantization)."""
    quant_algo: str | None
    """TensorRT-LLM ``QuantAlgo`` value ModelOpt writes into the checkpoint's ``config.json``."""
    needs_activations: bool
    """Whether calibration needs forward passes (weight-only recipes don't)."""
    min_sm: int | None
    """Lowest GPU SM on which kiln's torch backend runs it (None: any). TensorRT-LLM targets are checked
    against the contract's per-artifact, per-SM support facts instead (:mod:`kiln.engine.trtllm.support`: a
    minimum and a maximum SM, e.g. INT8/INT4 engines stop at SM90 because trtllm-build refuses them on
    SM100)."""
    needs_cuda_to_calibrate: bool = False
    group_size: bool = False
    """Whether the recipe's ``group_size`` applies (block-wise INT4)."""


SCHEMES: dict[str, QuantScheme] = {
    "none": QuantScheme(None, None, needs_activations=False, min_sm=None),
    "fp8": QuantScheme("FP8_DEFAULT_CFG", "FP8", needs_activations=True, min_sm=89),
    "int8_sq": QuantScheme(
        "INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL", needs_activations=True, min_sm=None
    ),
    "int8_wo": QuantScheme("INT8_WEIGHT_ONLY_CFG", "W8A16", needs_activations=False, min_sm=None),
    # ModelOpt 0.47 exports block-wise INT4 weight-only as W4A16_AWQ (pre_quant_scale: true) without pre-quant
    # scale tensors; kiln.quantize.fix_pre_quant_scale makes flag and tensors agree for both TensorRT-LLM
    # paths
    "int4_wo": QuantScheme(
        "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_AWQ", needs_activations=False, min_sm=None, group_size=True
    ),
    "int4_awq": QuantScheme(
        "INT4_AWQ_CFG", "W4A16_AWQ", needs_activations=True, min_sm=None, group_size=True
    ),
    "w4a8_awq": QuantScheme(
        "W4A8_AWQ_BETA_CFG", "W4A8_AWQ", needs_activations=True, min_sm=89, group_size=True
    ),
    "nvfp4": QuantScheme(
        "NVFP4_DEFAULT_CFG", "NVFP4", needs_activations=True, min_sm=100, needs_cuda_to_calibrate=True
    ),
}

KV_SCHEMES: dict[str, tuple[str | None, str | None, int | None]] = {
    # kv dtype -> (ModelOpt KV config, TensorRT-LLM kv_cache_quant_algo, min SM of kiln's torch backend;
    # TensorRT-LLM targets: the contract's support facts, e.g. TensorRT-LLM runs an FP8 KV cache on SM80)
    "auto": (None, None, None),
    "fp8": ("FP8_KV_CFG", "FP8", 89),
    "int8": (None, "INT8", None),
}


def scheme(quantization: str) -> QuantScheme:
    """The scheme for a quantization name; raises ``KeyError`` listing the known names."""
    try:
        return SCHEMES[quantization]
    except KeyError:
        raise KeyError(f"unknown quantization {quantization!r}; known: {', '.join(SCHEMES)}") from None


def sm_number(sm: str | None) -> int | None:
    """``'sm90'`` -> 90; None stays None (CPU targets)."""
    if sm is None:
        return None
    return int(sm.lower().removeprefix("sm"))
