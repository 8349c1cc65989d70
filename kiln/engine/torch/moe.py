"""Mixture-of-experts MLP: softmax router, top-k experts per token, experts run batched.

The experts' projections are stacked ``[experts, out, in]`` tensors of one kind (dense, FP8, INT8
weight-only or SmoothQuant; the numerics of ``linear.QuantLinear``, per expert). Three ways to run them,
all with static shapes except the first:

- ``grouped`` (prefill): token-expert pairs sorted by expert, one GEMM per expert over its rows;
- ``gather`` (decode, few pairs): each token-expert pair through its expert, so a batch-1 step reads only its
  top-k experts' weights: on CUDA one Triton GEMV (``kiln::expert_gemv``) reads each pair's rows of the
  stacked weights in place (dequantizing 8-bit ones in registers); elsewhere the weights are gathered for
  one batched matmul (a copy of the chosen experts, which on a GPU would triple the bytes moved);
- ``dense`` (decode, pairs >= experts): every expert over the whole batch, weighted by the routing matrix
  (zero for experts a token did not pick); each expert's weights are read once.

None loops over tokens in Python; the router's choices stay on the device (CUDA-graph safe in decode).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.engine.torch import kernels
from kiln.engine.torch.linear import FP8_MAX

if kernels.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _expert_gemv_kernel(
        X,
        W,
        IDS,
        SCALE,
        Y,
        N,
        K,
        stride_we,
        stride_wn,
        SCALE_ROWS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pair = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        expert = tl.load(IDS + pair).to(tl.int64)
        rows = W + expert * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            x = tl.load(X + pair * K + offs_k, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(rows + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:  # 8-bit experts: per-expert (FP8) or per-row (INT8) weight scale, applied to the sum
            if SCALE_ROWS:
                y = y * tl.load(SCALE + expert * N + offs_n, mask=nmask, other=0.0)
            else:
                y = y * tl.load(SCALE + expert)
        tl.store(Y + pair * N + offs_n, y.to(Y.dtype.element_ty), mask=nmask)


@torch.library.custom_op("kiln::expert_gemv", mutates_args=())
def expert_gemv(
    x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """Row ``p`` of ``x [P, K]`` times ``weight[experts[p]]^T`` (``weight [E, N, K]``, read in place), float32
    accumulation, in ``x``'s dtype; ``scale`` ``[E]`` or ``[E, N]`` dequantizes 8-bit weights."""
    pairs, k = x.shape
    n = weight.shape[1]
    y = torch.empty(pairs, n, dtype=x.dtype, device=x.device)
    block_n, block_k = 16, 256
    _expert_gemv_kernel[(pairs, triton.cdiv(n, block_n))](
        x.contiguous(),
        weight,
        experts.contiguous(),
        scale if scale is not None else x,
        y,
        n,
        k,
        weight.stride(0),
        weight.stride(1),
        SCALE_ROWS=scale is not None and scale.dim() == 2,
        HAS_SCALE=scale is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return y


@expert_gemv.register_fake
def _(x, weight, experts, scale):
    return x.new_empty(x.shape[0], weight.shape[1])


SLOTS = ("fc", "gate", "proj")
KINDS = ("dense", "fp8", "int8_sq", "int8_wo")


class StackedExperts(nn.Module):
    """One projection (gate, up or down) of every expert: ``[E, out, in]`` weights and their scales."""

    def __init__(
        self, kind: str, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"MoE experts of kind {kind!r} are not supported; supported: {', '.join(KINDS)}")
        self.kind, self.dtype = kind, dtype
        get = tensors.get
        self.pre_quant_scale = (
            None if get("pre_quant_scale") is None else tensors["pre_quant_scale"].to(device, dtype)
        )
        self.input_scale = None if get("input_scale") is None else tensors["input_scale"].float().to(device)
        weight, scale = tensors["weight"], get("weight_scale")
        self.kernel = kernels.available(device, dtype)  # pairs through expert_gemv, weights read in place
        if kind == "dense":
            self.weight, self.weight_scale = weight.to(device, dtype), None
        elif device.type == "cpu":  # no low-precision GEMM here: dequantize once at load
            self.weight, self.weight_scale = self._dequantize(weight, scale.float()).to(device), None
        else:  # stay in 8 bits; a gather dequantizes only the experts it reads
            self.weight, self.weight_scale = weight.to(device), scale.float().to(device)

    def _dequantize(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp8":
            return (weight.float() * scale.reshape(-1, 1, 1)).to(self.dtype)
        return (weight.float() * scale[..., None]).to(self.dtype)

    def weights(self, experts: torch.Tensor | int) -> torch.Tensor:
        """The dequantized weights of ``experts`` (an index tensor, or one expert id)."""
        weight = self.weight[experts]
        if self.weight_scale is None:
            return weight
        return self._dequantize(
            weight if weight.dim() == 3 else weight[None],
            self.weight_scale[experts].reshape((-1,) + self.weight_scale.shape[1:]),
        ).reshape(weight.shape)

    def quantize_input(self, x: torch.Tensor, experts: torch.Tensor | int) -> torch.Tensor:
        """The activations each expert sees: AWQ/SmoothQuant pre-quant scale, then its per-tensor
        quantizer."""
        if self.pre_quant_scale is not None:
            pqs = self.pre_quant_scale[experts]
            x = x * (pqs if pqs.dim() == x.dim() else pqs[None])
        if self.kind not in ("fp8", "int8_sq"):
            return x
        scale = self.input_scale[experts]
        scale = scale[:, None] if scale.dim() == 1 else scale
        if self.kind == "fp8":
            q = (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        else:  # scale = amax/127 but the full int8 range, as ModelOpt's fake quant
            q = torch.round(x.float() * (1.0 / scale)).clamp_(-128, 127)
        return (q * scale).to(self.dtype)

    def apply(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(self.quantize_input(x, expert), self.weights(expert))

    def apply_pairs(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Row ``i`` of ``x`` through expert ``experts[i]``."""
        x = self.quantize_input(x, experts)
        if self.kernel:
            return expert_gemv(x, self.weight, experts, self.weight_scale)
        return torch.bmm(self.weights(experts), x[:, :, None])[:, :, 0]


class MoE(nn.Module):
    """Router + experts of one layer; ``activation`` is the family's (SwiGLU for Mixtral and Qwen3-MoE)."""

    def __init__(
        self,
        router: torch.Tensor,
        experts: dict[str, StackedExperts],
        top_k: int,
        normalize: bool,
        activation: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.router, self.top_k, self.normalize, self.activation = router, top_k, normalize, activation
        self.fc, self.gate, self.proj = (experts[s] for s in SLOTS)
        self.num_experts = router.shape[0]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights ``[T, k]`` in the engine dtype, expert ids ``[T, k]``), as transformers' routers compute
        them."""
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.proj.apply(self.activation(self.fc.apply(x, e)) * self.gate.apply(x, e), e)

    def forward(self, x: torch.Tensor, decode: bool) -> torch.Tensor:
        weights, ids = self.route(x)
        tokens = x.shape[0]
        if decode and tokens * self.top_k < self.num_experts:
            return self._gather(x, weights, ids)
        if decode:
            return self._dense(x, weights, ids)
        return self._grouped(x, weights, ids)

    def _gather(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = x.repeat_interleave(self.top_k, dim=0)
        hidden = self.activation(self.fc.apply_pairs(rows, flat)) * self.gate.apply_pairs(rows, flat)
        out = self.proj.apply_pairs(hidden, flat) * weights.reshape(-1, 1)
        return out.view(x.shape[0], self.top_k, -1).sum(dim=1)

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        routing = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device).scatter(
            1, ids, weights
        )
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            out = out + self._expert(x, e) * routing[:, e : e + 1]
        return out

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # one host read per layer (prefill)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // self.top_k
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = token_of[start : start + count]
                y = self._expert(x[rows], e) * weights.reshape(-1)[order[start : start + count], None]
                out.index_add_(0, rows, y)
            start += count
        return out
