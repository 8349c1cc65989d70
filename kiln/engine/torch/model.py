"""The Llama-family decoder executed straight from runtime-layout tensors, with a preallocated KV cache.

Two entry points share the layer code: ``prefill`` (one or more sequences packed into one token row,
each attending causally to its own tokens, K/V written into its cache slot) and ``decode`` (one token for
each of the first ``B`` slots, attention over the first ``L`` cache positions). ``decode`` takes and
returns fixed-shape tensors so it can be captured in a CUDA graph per (B, L) bucket.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.engine.torch import kernels
from kiln.engine.torch.linear import FP8_MAX, QuantLinear
from kiln.engine.torch.parallel import PipelineParallel, TensorParallel
from kiln.engine.torch.spec import ModelSpec, rope_inv_freq

LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
ROW_PARALLEL = ("attention.dense", "mlp.proj")


def layer_count(layout: dict[str, str]) -> int:
    """Decoder layers in one rank's layout (a pipeline stage holds its own slice, numbered from 0)."""
    return len({name.split(".")[2] for name in layout if name.startswith("transformer.layers.")})


class KVCache:
    """``[max_batch, kv_heads, max_seq, head]`` K and V per layer, allocated once from the build limits.

    With an FP8 cache the values are stored as ``round_fp8(x / scale)`` with ModelOpt's calibrated
    per-layer K and V scales.
    """

    def __init__(self, spec: ModelSpec, tp: TensorParallel, num_layers: int, max_batch: int, max_seq: int,
                 dtype: torch.dtype, device: torch.device, scales: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        _, kv_heads = spec.local_heads(tp.world_size)
        shape = (max_batch, kv_heads, max_seq, spec.head_size)
        store = torch.float8_e4m3fn if scales else dtype
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.scales = [(k.to(device), v.to(device)) for k, v in scales] if scales else None
        self.dtype = dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def quantize(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scales is None:
            return k, v
        k_scale, v_scale = self.scales[layer]
        return ((k / k_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),
                (v / v_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))

    def dequantize(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scales is None:
            return k, v
        k_scale, v_scale = self.scales[layer]
        return (k.to(self.dtype) * k_scale).to(self.dtype), (v.to(self.dtype) * v_scale).to(self.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, index: int, spec: ModelSpec, linears: dict[str, QuantLinear], norms: tuple[torch.Tensor, torch.Tensor],
                 tp: TensorParallel, attention_kernel: bool) -> None:
        super().__init__()
        self.index, self.eps = index, spec.norm_eps
        self.heads, self.kv_heads = spec.local_heads(tp.world_size)
        self.head_size = spec.head_size
        self.input_norm, self.post_norm = norms
        self.qkv, self.dense, self.proj = linears["attention.qkv"], linears["attention.dense"], linears["mlp.proj"]
        # Unquantized gate/fc are fused into one GEMM at build time (runtime layout ``mlp.gate_up``).
        self.gate_up = linears.get("mlp.gate_up")
        self.fc, self.gate = linears.get("mlp.fc"), linears.get("mlp.gate")
        self.attention_kernel = attention_kernel  # decode through kernels.decode_attention

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, d = x.shape[0], self.head_size
        qkv = self.qkv(_rms_norm(x, self.input_norm, self.eps))
        q, k, v = qkv.split((self.heads * d, self.kv_heads * d, self.kv_heads * d), dim=-1)
        q = _rotate(q.view(n, self.heads, d), cos, sin)
        k = _rotate(k.view(n, self.kv_heads, d), cos, sin)
        return q, k, v.view(n, self.kv_heads, d)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        x = _rms_norm(h, self.post_norm, self.eps)
        if self.gate_up is not None:
            act, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            act, up = self.fc(x), self.gate(x)
        return h + self.proj(F.silu(act) * up)

    def prefill(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                where: tuple[torch.Tensor | int, torch.Tensor | None] | None, mask: torch.Tensor | None) -> torch.Tensor:
        """``h [T, hidden]``: packed sequences; ``where`` = (slot, position) per token for the cache write
        (``(slot, None)``: one sequence at positions ``0..T-1``);
        ``mask [T, T]`` keeps each sequence causal and to itself (None: one sequence, plain causal)."""
        q, k, v = self._qkv(h, cos, sin)
        n = h.shape[0]
        if cache is not None and cache.scales is not None:
            kq, vq = cache.quantize(self.index, k, v)
            k, v = cache.dequantize(self.index, kq, vq)  # attention sees what the cache will hold
        else:
            kq, vq = k, v
        if cache is not None and where is not None:
            slots, positions = where
            if positions is None:  # one sequence from position 0: a plain slice write
                cache.k[self.index][slots, :, :n] = kq.transpose(0, 1)
                cache.v[self.index][slots, :, :n] = vq.transpose(0, 1)
            else:
                cache.k[self.index][slots, :, positions] = kq
                cache.v[self.index][slots, :, positions] = vq
        if mask is None:
            attn = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                                  is_causal=True, enable_gqa=self.heads != self.kv_heads)
        else:
            # K/V repeated to every query head: a few MB, and it keeps the masked call on a fused kernel
            group = self.heads // self.kv_heads
            k, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k, v))
            attn = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                                  attn_mask=mask)
        h = h + self.dense(attn[0].transpose(0, 1).reshape(n, -1))
        return self._mlp(h)

    def decode(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               cache: KVCache, length: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        """One token per row of ``h``; ``cos``/``sin``: rows for ``positions``, or with the attention
        kernel the whole tables (it gathers them itself and needs no ``key_mask``)."""
        if self.attention_kernel:
            qkv = self.qkv(_rms_norm(h, self.input_norm, self.eps))
            k_scale, v_scale = cache.scales[self.index] if cache.scales else (None, None)
            attn = kernels.decode_attention(qkv, positions, cos, sin, cache.k[self.index], cache.v[self.index],
                                            k_scale, v_scale, self.heads, self.kv_heads, length)
            return self._mlp(h + self.dense(attn))
        b, d = h.shape[0], self.head_size
        q, k, v = self._qkv(h, cos, sin)
        kq, vq = cache.quantize(self.index, k, v)
        rows = torch.arange(b, device=h.device)
        cache.k[self.index][rows, :, positions] = kq
        cache.v[self.index][rows, :, positions] = vq
        keys, values = cache.dequantize(self.index, cache.k[self.index][:b, :, :length], cache.v[self.index][:b, :, :length])
        # GQA without copying K/V: a KV head's query group is the "query length" of one fused attention call
        group = self.heads // self.kv_heads
        attn = F.scaled_dot_product_attention(q.view(b, self.kv_heads, group, d), keys, values,
                                              attn_mask=key_mask[:, None, None, :])
        h = h + self.dense(attn.reshape(b, self.heads * d))
        return self._mlp(h)


class DecoderModel(nn.Module):
    """Embedding -> decoder layers -> final norm -> lm_head, for one rank: with pipeline parallelism the
    first stage embeds, every stage runs its own layers, and the last applies the norm and lm_head; the
    others return ``None`` where logits would be."""

    def __init__(self, spec: ModelSpec, layout: dict[str, str], tensors: dict[str, torch.Tensor], *,
                 dtype: torch.dtype, device: torch.device, tp: TensorParallel, pp: PipelineParallel,
                 scaled_mm: bool, program: dict | None = None) -> None:
        """``program``: the engine's kernel choices (``attention: triton``, ``gemv`` per weight shape);
        they apply where ``kernels.available`` (CUDA with Triton), the torch path serves elsewhere."""
        super().__init__()
        program = program or {}
        gemv = program.get("gemv")
        self.spec, self.tp, self.pp, self.dtype, self.device = spec, tp, pp, dtype, device

        def linear(name: str, reduce: bool = False) -> QuantLinear:
            prefix = f"{name}."
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            return QuantLinear(layout[name], part, dtype=dtype, device=device, scaled_mm=scaled_mm,
                               reduce=tp.all_reduce if reduce else None, gemv=gemv)

        self.embedding = tensors["transformer.vocab_embedding.weight"].to(device) if self.pp.first else None
        self.vocab_start = tp.rank * self.embedding.shape[0] if self.pp.first else 0
        self.attention_kernel = (program.get("attention") == "triton" and kernels.available(device, dtype)
                                 and kernels.attention_supported(spec.head_size))
        self.layers = nn.ModuleList()
        for i in range(layer_count(layout)):
            base = f"transformer.layers.{i}"
            names = [n for n in (*LINEARS, "mlp.gate_up") if f"{base}.{n}" in layout]
            linears = {n: linear(f"{base}.{n}", reduce=n in ROW_PARALLEL) for n in names}
            norms = (tensors[f"{base}.input_layernorm.weight"].to(device), tensors[f"{base}.post_layernorm.weight"].to(device))
            self.layers.append(DecoderLayer(i, spec, linears, norms, tp, self.attention_kernel))
        self.final_norm = tensors["transformer.ln_f.weight"].to(device) if self.pp.last else None
        self.lm_head = linear("lm_head") if self.pp.last else None
        positions = torch.arange(spec.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(spec))
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos = angles.cos().to(dtype).to(device)
        self.sin = angles.sin().to(dtype).to(device)

    def weight_bytes(self) -> int:
        seen = {id(t): t for t in self._tensors()}
        return sum(t.numel() * t.element_size() for t in seen.values())

    def _tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.embedding, self.final_norm) if t is not None]
        for module in self.modules():
            out += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        return out

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(tokens, self.embedding)
        local = tokens - self.vocab_start
        inside = (local >= 0) & (local < self.embedding.shape[0])
        h = F.embedding(local.clamp(0, self.embedding.shape[0] - 1), self.embedding) * inside[:, None].to(self.dtype)
        return self.tp.all_reduce(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(_rms_norm(h, self.final_norm, self.spec.norm_eps))
        return self.tp.all_gather_last(logits)[..., : self.spec.vocab_size]

    def _stage_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """The hidden states this stage starts from: embedded tokens, or the previous stage's output."""
        if self.pp.first:
            return self._embed(tokens)
        return self.pp.recv_forward((tokens.shape[0], self.spec.hidden_size), self.dtype, self.device)

    def _last_stage(self, h: torch.Tensor) -> bool:
        """Hand ``h`` to the next stage unless this is the last one (which goes on to the logits)."""
        if not self.pp.last:
            self.pp.send_forward(h)
        return self.pp.last

    def prefill(self, tokens: torch.Tensor, cache: KVCache | None, slots: list[int] | None, last_only: bool,
                lengths: list[int] | None = None) -> torch.Tensor | None:
        """Logits for sequences packed in ``tokens [T]`` (``lengths``; default one sequence), writing each
        one's K/V into its cache slot. ``last_only``: ``[n_seq, vocab]``, each sequence's last position."""
        lengths = lengths or [tokens.shape[0]]
        device = tokens.device
        if len(lengths) == 1:  # the common single-prompt case: slices, no index tensors (TTFT)
            n = tokens.shape[0]
            h = self._stage_input(tokens)
            where1 = None if slots is None else (slots[0], None)
            for layer in self.layers:
                h = layer.prefill(h, self.cos[:n, None, :], self.sin[:n, None, :], cache, where1, None)
            return self._logits(h[-1:] if last_only else h) if self._last_stage(h) else None
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        where = None if slots is None else (torch.tensor(slots, device=device)[seq], positions)
        mask = (seq[:, None] == seq[None, :]) & (positions[:, None] >= positions[None, :])
        h = self._stage_input(tokens)
        for layer in self.layers:
            h = layer.prefill(h, cos, sin, cache, where, mask)
        if not self._last_stage(h):
            return None
        if last_only:
            h = h[torch.tensor(lengths, device=device).cumsum(0) - 1]
        return self._logits(h)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, length: int) -> torch.Tensor | None:
        """Next-token logits ``[B, vocab]`` for slots ``0..B-1``, each at its own position (< ``length``)."""
        if self.attention_kernel:
            cos, sin, key_mask = self.cos, self.sin, None
        else:
            cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
            key_mask = torch.arange(length, device=tokens.device)[None, :] <= positions[:, None]
        h = self._stage_input(tokens)
        for layer in self.layers:
            h = layer.decode(h, cos, sin, positions, cache, length, key_mask)
        return self._logits(h) if self._last_stage(h) else None
