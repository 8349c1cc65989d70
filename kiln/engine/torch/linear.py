"""Linear layers for each quant algo: checkpoint tensors -> runtime layout -> matmul.

The numerics follow ModelOpt's fake-quant model (what the checkpoint was calibrated and checked as):
activations are quantized per tensor with the calibrated ``activation_scaling_factor`` after the
AWQ/SmoothQuant ``pre_quant_scale``; weights dequantize as ``q * scale`` in float32. FP8 runs as a real
FP8 GEMM (``torch._scaled_mm``) on CUDA SM >= 89 and is dequantized elsewhere.

Activations quantize in float32 as ``round(x * (1 / scale))``, ModelOpt's fake-quant order: in a
bf16 engine ``x / scale`` would round to bf16 before the FP8/int8 rounding (a double rounding), and
``x / scale`` vs ``x * (1 / scale)`` differ by one float ulp, which moves a value sitting on a rounding
midpoint one quantization step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.engine.torch import kernels
from kiln.engine.torch.kernels import FP8_MAX

KINDS = ("dense", "fp8", "int8_sq", "int8_wo", "int4")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's ``[out/2, in]`` int4 packing (low nibble = even output row) -> int8 ``[out, in]``."""
    low = (packed << 4) >> 4  # arithmetic shifts sign-extend each nibble
    high = packed >> 4
    return torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


def _fp8_round(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def runtime_tensors(name: str, tensors: dict[str, torch.Tensor], quant_algo: str | None,
                    dtype: torch.dtype) -> tuple[str, dict[str, torch.Tensor]]:
    """Convert one checkpoint linear (``name.weight`` + scales) into (kind, runtime tensors).

    W4A8-AWQ becomes an FP8 linear here (its int4 x group scale weights, re-quantized to FP8 with
    ``weights_scaling_factor_2``, are exactly what its fake-quant model computes with), so one FP8 GEMM
    path serves both.
    """
    weight = tensors[f"{name}.weight"]
    get = tensors.get
    out: dict[str, torch.Tensor] = {}
    if (bias := get(f"{name}.bias")) is not None:
        out["bias"] = bias.to(dtype)
    if (pqs := get(f"{name}.prequant_scaling_factor")) is not None:
        out["pre_quant_scale"] = pqs.to(dtype)
    weight_scale = get(f"{name}.weights_scaling_factor")
    input_scale = get(f"{name}.activation_scaling_factor")
    if weight.is_floating_point() and weight.dtype != torch.float8_e4m3fn:
        return "dense", {**out, "weight": weight.to(dtype)}
    if weight_scale is None:
        raise ValueError(f"{name}.weight is {weight.dtype} but {name}.weights_scaling_factor is missing")
    if quant_algo == "FP8":
        return "fp8", {**out, "weight": weight.view(torch.float8_e4m3fn), "weight_scale": weight_scale.float().reshape(()),
                       "input_scale": input_scale.float().reshape(())}
    if quant_algo == "W8A8_SQ_PER_CHANNEL":
        return "int8_sq", {**out, "weight": weight, "weight_scale": weight_scale.float(),
                           "input_scale": input_scale.float().reshape(())}
    if quant_algo == "W8A16":
        return "int8_wo", {**out, "weight": weight, "weight_scale": weight_scale.float()}
    if quant_algo in ("W4A16", "W4A16_AWQ"):
        return "int4", {**out, "weight": weight.view(torch.int8), "weight_scale": weight_scale.float()}
    if quant_algo == "W4A8_AWQ":
        scale2 = tensors[f"{name}.weights_scaling_factor_2"].float().reshape(())
        q = unpack_int4(weight.view(torch.int8)).float()
        group = q.shape[1] // weight_scale.shape[1]
        dequant = q * weight_scale.float().repeat_interleave(group, dim=1)
        return "fp8", {**out, "weight": _fp8_round(dequant / scale2), "weight_scale": scale2,
                       "input_scale": input_scale.float().reshape(())}
    raise ValueError(f"{name}: quant_algo {quant_algo!r} has no runtime layout")


class QuantLinear(nn.Module):
    """``y = reduce(x @ W^T) + b`` for one runtime kind; ``reduce`` is the tensor-parallel all-reduce of row-parallel layers."""

    def __init__(self, kind: str, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype, device: torch.device,
                 scaled_mm: bool, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 gemv: dict[str, list[int] | None] | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown linear kind {kind!r}; known: {', '.join(KINDS)}")
        self.kind, self.dtype, self.reduce = kind, dtype, reduce
        self.bias = tensors["bias"].to(device) if "bias" in tensors else None
        self.pre_quant_scale = tensors["pre_quant_scale"].to(device) if "pre_quant_scale" in tensors else None
        self.input_scale = tensors["input_scale"].to(device) if "input_scale" in tensors else None
        self.inv_input_scale = None if self.input_scale is None else 1.0 / self.input_scale
        weight, scale = tensors["weight"], tensors.get("weight_scale")
        self.scaled_mm = kind == "fp8" and scaled_mm
        if kind == "dense" or self.scaled_mm:
            self.weight, self.weight_scale = weight.to(device), None if scale is None else scale.to(device)
        elif device.type == "cpu" or kind == "fp8":
            # No integer/FP8 GEMM here: dequantize once at load; activation quantization is still applied.
            self.weight, self.weight_scale = self._dequantize(weight, scale).to(device), None
        else:
            self.weight, self.weight_scale = weight.to(device), scale.to(device)
        # batch-1 rows go to the Triton GEMV where the build measured it faster than cuBLAS for this shape
        self.gemv = None
        if gemv and (kind == "dense" or self.scaled_mm) and kernels.available(device, dtype):
            self.gemv = gemv.get(kernels.gemv_key(self.scaled_mm, *self.weight.shape))
        self.out_scale = self.input_scale * self.weight_scale if self.gemv and self.scaled_mm else None

    def _dequantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp8":
            return (weight.float() * scale).to(self.dtype)
        if self.kind == "int4":
            q = unpack_int4(weight).float()
            return (q * scale.repeat_interleave(q.shape[1] // scale.shape[1], dim=1)).to(self.dtype)
        return (weight.float() * scale[:, None]).to(self.dtype)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp8":
            q = _fp8_round(x.float() * self.inv_input_scale)
            return q if self.scaled_mm else (q.float() * self.input_scale).to(self.dtype)
        # int8_sq: scale = amax/127 but the full int8 range -128..127, exactly as ModelOpt's fake quant
        return (torch.round(x.float() * self.inv_input_scale).clamp_(-128, 127) * self.input_scale).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        if self.reduce is not None:
            y = self.reduce(y)
        return y if self.bias is None else y + self.bias

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None and x.dim() == 2 and x.shape[0] == 1:
            return kernels.gemv(x, self.weight, self.pre_quant_scale, self.inv_input_scale, self.out_scale, self.gemv)
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.kind in ("fp8", "int8_sq"):
            x = self._quantize_input(x)
        if self.scaled_mm:
            return self._fp8_gemm(x)
        if self.weight_scale is None:
            return F.linear(x, self.weight)
        return F.linear(x, self._dequantize(self.weight, self.weight_scale))

    def _fp8_gemm(self, xq: torch.Tensor) -> torch.Tensor:
        lead, k = xq.shape[:-1], xq.shape[-1]
        y = torch._scaled_mm(xq.reshape(-1, k), self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                             out_dtype=self.dtype)
        return y.reshape(*lead, -1)
