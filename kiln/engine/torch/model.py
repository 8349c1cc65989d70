"""The decoder of every family executed straight from runtime-layout tensors, with a preallocated KV cache.

The layer is the Llama layout; what a family changes is data on ``ModelSpec`` (activation, Gemma's
``1 + w`` norms and sandwich norms, q/k norms, attention scale and soft-caps, sliding windows per layer
type with their own RoPE tables, partial rotary, MoE experts) and tensors the layer finds in the layout:
nothing here branches on a family's name.

Two entry points share the layer code: ``prefill`` (one or more sequences packed into one token row,
each attending causally to its own tokens, K/V written into its cache slot) and ``decode`` (one token for
each of the first ``B`` slots, attention over the first ``L`` cache positions). ``decode`` takes and
returns fixed-shape tensors so it can be captured in a CUDA graph per (B, L) bucket.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kiln.engine.torch import kernels
from kiln.engine.torch.fused import on_cuda
from kiln.engine.torch.linear import FP8_MAX, QuantLinear, _fp8_quantize
from kiln.engine.torch.moe import SLOTS, MoE, StackedExperts
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

    def __init__(
        self,
        spec: ModelSpec,
        tp: TensorParallel,
        num_layers: int,
        max_batch: int,
        max_seq: int,
        dtype: torch.dtype,
        device: torch.device,
        scales: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> None:
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
        return _to_fp8_cache(k, k_scale), _to_fp8_cache(v, v_scale)

    def dequantize(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scales is None:
            return k, v
        k_scale, v_scale = self.scales[layer]
        return _from_fp8_cache(k, k_scale, self.dtype), _from_fp8_cache(v, v_scale, self.dtype)


# A prefill's attention never goes to cuDNN, torch's first choice on SM90+: cuDNN builds an execution plan for
# every new shape (hundreds of ms each, as public reports on H100/B200 measured), and a prefill's (sequences,
# length) changes with every admission wave. Flash (causal, GQA) or memory-efficient (masks) need no plans.
PREFILL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# one kernel each on CUDA: eager, a prefill's FP8 cache round trip is five passes over its K and V
@on_cuda
def _to_fp8_cache(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@on_cuda
def _from_fp8_cache(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x.to(dtype) * scale).to(dtype)


@on_cuda
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (``w * normed.to(dtype)``); a float32 weight in a lower-precision engine is Gemma's
    ``1 + w``, which transformers multiplies in float32 before rounding once."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == torch.float32:
        return (normed * weight).to(x.dtype)
    return weight * normed.to(x.dtype)


@on_cuda
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE over the first ``cos.shape[-1]`` dims of each head (all of them but for partial rotary)."""
    dim = cos.shape[-1]
    if dim != x.shape[-1]:
        return torch.cat((_rotate(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _activation(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"activation {name!r} is not supported; supported: silu, gelu_tanh")


@on_cuda
def _gate(act: torch.Tensor, up: torch.Tensor, name: str) -> torch.Tensor:
    """The gated MLP's ``act(gate) * up`` (SwiGLU, or GeGLU with tanh GELU)."""
    return _activation(name)(act) * up


@on_cuda
def _rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, inv_scale: torch.Tensor) -> torch.Tensor:
    """``_rms_norm`` and the FP8 input quantization of the linear it feeds, in one kernel on CUDA."""
    return _fp8_quantize(_rms_norm(x, weight, eps), inv_scale)


@on_cuda
def _gate_fp8(act: torch.Tensor, up: torch.Tensor, name: str, inv_scale: torch.Tensor) -> torch.Tensor:
    """``_gate`` and the FP8 input quantization of the down projection, in one kernel on CUDA (in a
    prefill of 8192 tokens apart they took 0.6 ms of a layer's 4.5 ms on an H200)."""
    return _fp8_quantize(_gate(act, up, name), inv_scale)


def _fuses_quant(x: torch.Tensor, linear: QuantLinear) -> torch.Tensor | None:
    """The FP8 input scale to fuse into the op that makes ``linear``'s input: eager CUDA passes over more
    than one row (the compiled decode step fuses by itself; one row takes the GEMV, quantizing in its
    prologue); else None."""
    if not x.is_cuda or x.shape[0] < 2 or torch.compiler.is_compiling():
        return None
    return linear.fp8_input_scale()


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """``q [..., H, Tq, d]`` over ``k``/``v [..., Hkv, Tk, d]`` (H a multiple of Hkv); ``mask`` True where a
    query may attend (None: causal). A soft-cap (Gemma 2) caps the scores before the float32 softmax, as
    transformers' eager attention does; SDPA has no soft-cap."""
    group = q.shape[-3] // k.shape[-3]
    if softcap is None and mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)
    if (
        group > 1
    ):  # K/V repeated to every query head: a few MB, and it keeps the masked call on a fused kernel
        k, v = (t.repeat_interleave(group, dim=-3) for t in (k, v))
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = (torch.tanh(scores / softcap) * softcap).masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class Padded:
    """Sequences packed in ``[T, ...]`` attended as a right-padded batch ``[n, H, L, d]`` with a plain causal
    mask: padding sits after each sequence's last key, so causality alone keeps it out of every real query,
    and the fused (flash) kernel does ``n * L^2`` work where a packed ``[T, T]`` mask costs ``T^2`` and runs
    on a slower masked kernel. Used for full-attention layers without a soft-cap."""

    def __init__(self, seq: torch.Tensor, positions: torch.Tensor, count: int, length: int) -> None:
        self.index, self.count, self.length = seq * length + positions, count, length
        self.full = count * length == seq.shape[0]  # equal lengths: the packed rows already are the batch

    @staticmethod
    def pays(lengths: list[int]) -> bool:
        """Whether padding costs less attention work than one packed mask (it does unless lengths vary a
        lot)."""
        return len(lengths) * max(lengths) ** 2 <= sum(lengths) ** 2

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        out = t
        if not self.full:
            out = t.new_zeros(self.count * self.length, *t.shape[1:])
            out[self.index] = t
        return out.view(self.count, self.length, *t.shape[1:]).transpose(1, 2)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None
    ) -> torch.Tensor:
        """``q [T, H, d]``, ``k``/``v [T, Hkv, d]`` -> ``[T, H * d]``."""
        out = F.scaled_dot_product_attention(
            self._pad(q),
            self._pad(k),
            self._pad(v),
            is_causal=True,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        out = out.transpose(1, 2).reshape(self.count * self.length, -1)
        return out if self.full else out[self.index]


Rope = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""RoPE kind -> (cos, sin): whole tables, or the rows of the positions being computed."""
NORMS = (
    "input_layernorm",
    "post_layernorm",
    "post_attention_norm",
    "post_mlp_norm",
    "attention.q_layernorm",
    "attention.k_layernorm",
)
OPTIONAL_LINEARS = ("mlp.gate_up", "attention.q", "attention.k", "attention.v")


class DecoderLayer(nn.Module):
    def __init__(
        self,
        index: int,
        spec: ModelSpec,
        linears: dict[str, QuantLinear],
        norms: dict[str, torch.Tensor],
        tp: TensorParallel,
        attention_kernel: bool,
        moe: MoE | None = None,
    ) -> None:
        super().__init__()
        self.index, self.eps = index, spec.norm_eps
        self.heads, self.kv_heads = spec.local_heads(tp.world_size)
        self.head_size = spec.head_size
        self.input_norm, self.post_norm = norms["input_layernorm"], norms["post_layernorm"]
        self.post_attention_norm, self.post_mlp_norm = (
            norms.get("post_attention_norm"),
            norms.get("post_mlp_norm"),
        )
        self.q_norm, self.k_norm = norms.get("attention.q_layernorm"), norms.get("attention.k_layernorm")
        # one fused qkv GEMM, or q/k/v apart where their HF export scales differ (FP8 per tensor)
        self.qkv = linears.get("attention.qkv")
        self.q_k_v = None if self.qkv is not None else tuple(linears[f"attention.{p}"] for p in "qkv")
        self.dense, self.proj = linears["attention.dense"], linears.get("mlp.proj")
        # Unquantized gate/fc are fused into one GEMM at build time (runtime layout ``mlp.gate_up``).
        self.gate_up = linears.get("mlp.gate_up")
        self.fc, self.gate = linears.get("mlp.fc"), linears.get("mlp.gate")
        _activation(spec.activation)  # an unsupported name fails here, at load
        self.moe, self.act = moe, spec.activation
        self.window, self.rope = spec.window(index), spec.rope_kind(index)
        self.scale, self.softcap = spec.attn_scale, spec.attn_softcap
        self.attention_kernel = attention_kernel  # decode through kernels.decode_attention

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, weight, self.eps)

    def _normed_linear(self, h: torch.Tensor, weight: torch.Tensor, linear: QuantLinear) -> torch.Tensor:
        """``linear(norm(h))``, the norm fused with ``linear``'s FP8 input quantization where that pays."""
        if (inv := _fuses_quant(h, linear)) is not None:
            return linear.forward_quantized(_rms_norm_fp8(h, weight, self.eps, inv))
        return linear(self._norm(h, weight))

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        if self.qkv is not None:
            return self._normed_linear(h, self.input_norm, self.qkv)
        x = self._norm(h, self.input_norm)
        return torch.cat([lin(x) for lin in self.q_k_v], dim=-1)

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v of fused projections, q and k through their norms (Qwen3, Gemma 3) if any."""
        n, d = qkv.shape[0], self.head_size
        q, k, v = qkv.split((self.heads * d, self.kv_heads * d, self.kv_heads * d), dim=-1)
        q, k, v = q.view(n, self.heads, d), k.view(n, self.kv_heads, d), v.view(n, self.kv_heads, d)
        if self.q_norm is not None:
            q, k = self._norm(q, self.q_norm), self._norm(k, self.k_norm)
        return q, k, v

    def _qkv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, ...]:
        q, k, v = self._split(self._project(x))
        cos, sin = rope[self.rope]
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _attention_out(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        out = self.dense(attn)
        return h + (out if self.post_attention_norm is None else self._norm(out, self.post_attention_norm))

    def _mlp(self, h: torch.Tensor, decode: bool = False) -> torch.Tensor:
        if self.moe is not None:
            out = self.moe(self._norm(h, self.post_norm), decode)
        else:
            if self.gate_up is not None:
                act, up = self._normed_linear(h, self.post_norm, self.gate_up).chunk(2, dim=-1)
            else:
                x = self._norm(h, self.post_norm)
                act, up = self.fc(x), self.gate(x)
            if (inv := _fuses_quant(act, self.proj)) is not None:
                out = self.proj.forward_quantized(_gate_fp8(act, up, self.act, inv))
            else:
                out = self.proj(_gate(act, up, self.act))
        return h + (out if self.post_mlp_norm is None else self._norm(out, self.post_mlp_norm))

    def prefill(
        self,
        h: torch.Tensor,
        rope: Rope,
        cache: KVCache | None,
        where: tuple[torch.Tensor | int, torch.Tensor | None] | None,
        masks: dict[int | None, torch.Tensor | Padded | None],
    ) -> torch.Tensor:
        """``h [T, hidden]``: packed sequences; ``where`` = (slot, position) per token for the cache write
        (``(slot, None)``: one sequence at positions ``0..T-1``); ``masks[window]`` ``[T, T]`` keeps each
        sequence causal, to itself and inside the layer's window (None: one sequence, plain causal)."""
        q, k, v = self._qkv(h, rope)
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
        mask = masks[self.window]
        if isinstance(mask, Padded):
            attn = mask.attend(q, k, v, scale=self.scale)
        else:
            attn = (
                _attend(
                    q.transpose(0, 1)[None],
                    k.transpose(0, 1)[None],
                    v.transpose(0, 1)[None],
                    mask,
                    scale=self.scale,
                    softcap=self.softcap,
                )[0]
                .transpose(0, 1)
                .reshape(n, -1)
            )
        return self._mlp(self._attention_out(h, attn))

    def decode(
        self,
        h: torch.Tensor,
        rope: Rope,
        positions: torch.Tensor,
        cache: KVCache,
        length: int,
        key_masks: dict[int | None, torch.Tensor | None],
    ) -> torch.Tensor:
        """One token per row of ``h``; ``rope``: rows for ``positions``, or with the attention kernel the
        whole tables (it gathers them itself and needs no key mask)."""
        if self.attention_kernel:
            qkv = self._project(h)
            if self.q_norm is not None:
                qkv = torch.cat([t.reshape(h.shape[0], -1) for t in self._split(qkv)], dim=-1)
            k_scale, v_scale = cache.scales[self.index] if cache.scales else (None, None)
            cos, sin = rope[self.rope]
            attn = kernels.decode_attention(
                qkv,
                positions,
                cos,
                sin,
                cache.k[self.index],
                cache.v[self.index],
                k_scale,
                v_scale,
                self.heads,
                self.kv_heads,
                length,
            )
            return self._mlp(self._attention_out(h, attn), decode=True)
        b, d = h.shape[0], self.head_size
        q, k, v = self._qkv(h, rope)
        kq, vq = cache.quantize(self.index, k, v)
        rows = torch.arange(b, device=h.device)
        cache.k[self.index][rows, :, positions] = kq
        cache.v[self.index][rows, :, positions] = vq
        keys, values = cache.dequantize(
            self.index, cache.k[self.index][:b, :, :length], cache.v[self.index][:b, :, :length]
        )
        # GQA without copying K/V: a KV head's query group is the "query length" of one fused attention call
        group = self.heads // self.kv_heads
        attn = _attend(
            q.view(b, self.kv_heads, group, d),
            keys,
            values,
            key_masks[self.window][:, None, None, :],
            scale=self.scale,
            softcap=self.softcap,
        )
        h = self._attention_out(h, attn.reshape(b, self.heads * d))
        return self._mlp(h, decode=True)


class DecoderModel(nn.Module):
    """Embedding -> decoder layers -> final norm -> lm_head, for one rank: with pipeline parallelism the
    first stage embeds, every stage runs its own layers, and the last applies the norm and lm_head; the
    others return ``None`` where logits would be."""

    def __init__(
        self,
        spec: ModelSpec,
        layout: dict[str, str],
        tensors: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype,
        device: torch.device,
        tp: TensorParallel,
        pp: PipelineParallel,
        scaled_mm: bool,
        program: dict | None = None,
    ) -> None:
        """``program``: the engine's kernel choices (``attention: triton``, ``gemv`` per weight shape);
        they apply where ``kernels.available`` (CUDA with Triton), the torch path serves elsewhere."""
        super().__init__()
        program = program or {}
        gemv = program.get("gemv")
        self.spec, self.tp, self.pp, self.dtype, self.device = spec, tp, pp, dtype, device

        def linear(name: str, reduce: bool = False) -> QuantLinear:
            prefix = f"{name}."
            part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            return QuantLinear(
                layout[name],
                part,
                dtype=dtype,
                device=device,
                scaled_mm=scaled_mm,
                reduce=tp.all_reduce if reduce else None,
                gemv=gemv,
            )

        self.embedding = tensors["transformer.vocab_embedding.weight"].to(device) if self.pp.first else None
        self.vocab_start = tp.rank * self.embedding.shape[0] if self.pp.first else 0
        # kiln's decode kernel fuses plain RoPE attention: not windows, soft-caps, other scales or partial
        # rotary
        plain = (
            not spec.layer_types
            and spec.attn_softcap is None
            and spec.rotary_dim is None
            and spec.attn_scale in (None, spec.head_size**-0.5)
        )
        self.attention_kernel = (
            program.get("attention") == "triton"
            and kernels.available(device, dtype)
            and kernels.attention_supported(spec.head_size)
            and plain
        )
        self.layers = nn.ModuleList()
        for i in range(layer_count(layout)):
            base = f"transformer.layers.{i}"
            names = [n for n in (*LINEARS, *OPTIONAL_LINEARS) if f"{base}.{n}" in layout]
            linears = {n: linear(f"{base}.{n}", reduce=n in ROW_PARALLEL) for n in names}
            norms = {
                n: tensors[f"{base}.{n}.weight"].to(device) for n in NORMS if f"{base}.{n}.weight" in tensors
            }
            moe = None
            if f"{base}.moe.router.weight" in tensors:
                experts = {}
                for slot in SLOTS:
                    prefix = f"{base}.moe.{slot}."
                    part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                    experts[slot] = StackedExperts(
                        layout[f"{base}.moe.{slot}"], part, dtype=dtype, device=device
                    )
                moe = MoE(
                    tensors[f"{base}.moe.router.weight"].to(device),
                    experts,
                    spec.experts_per_token,
                    spec.norm_topk_prob,
                    _activation(spec.activation),
                )
            self.layers.append(DecoderLayer(i, spec, linears, norms, tp, self.attention_kernel, moe))
        self.final_norm = tensors["transformer.ln_f.weight"].to(device) if self.pp.last else None
        self.lm_head = linear("lm_head") if self.pp.last else None
        self.windows = sorted({layer.window for layer in self.layers} - {None})
        positions = torch.arange(spec.max_position_embeddings, dtype=torch.float32)
        tables = {
            kind: (tensors[f"rope.{kind}.inv_freq"], spec.rope_attention_scaling.get(kind, 1.0))
            for kind in spec.rope_tables
        } or {"default": (rope_inv_freq(spec), 1.0)}
        self.rope: Rope = {}
        for kind, (inv_freq, scaling) in tables.items():
            freqs = torch.outer(positions, inv_freq.float())
            angles = torch.cat((freqs, freqs), dim=-1)
            # transformers scales cos/sin (LongRoPE's attention factor) in float32, then rounds
            self.rope[kind] = (
                (angles.cos() * scaling).to(dtype).to(device),
                (angles.sin() * scaling).to(dtype).to(device),
            )
        # the first table under its own name too (engines without layer types have only "default"); held as
        # attributes so weight_bytes counts the tables once
        self.cos, self.sin = self.rope.get("default") or next(iter(self.rope.values()))

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
        h = F.embedding(local.clamp(0, self.embedding.shape[0] - 1), self.embedding) * inside[:, None].to(
            self.dtype
        )
        return self.tp.all_reduce(h)

    def _embed_scaled(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self._embed(tokens)
        if self.spec.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the engine dtype first
            h = h * torch.tensor(self.spec.embed_scale, dtype=h.dtype)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(_rms_norm(h, self.final_norm, self.spec.norm_eps))
        logits = self.tp.all_gather_last(logits)[..., : self.spec.vocab_size]
        if (cap := self.spec.final_softcap) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _rows(self, positions: torch.Tensor) -> Rope:
        return {
            kind: (cos[positions][:, None, :], sin[positions][:, None, :])
            for kind, (cos, sin) in self.rope.items()
        }

    def _windowed(
        self, causal: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, full: torch.Tensor | None
    ) -> dict[int | None, torch.Tensor | None]:
        """The attention masks by window: ``full`` for full layers, ``causal`` cut to the last ``w`` keys
        (``q - k < w``, transformers' sliding window) for each sliding window."""
        masks: dict[int | None, torch.Tensor | None] = {None: full}
        for w in self.windows:
            masks[w] = causal & (q_pos[:, None] - k_pos[None, :] < w)
        return masks

    def _stage_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """The hidden states this stage starts from: embedded tokens, or the previous stage's output."""
        if self.pp.first:
            return self._embed_scaled(tokens)
        return self.pp.recv_forward((tokens.shape[0], self.spec.hidden_size), self.dtype, self.device)

    def _last_stage(self, h: torch.Tensor) -> bool:
        """Hand ``h`` to the next stage unless this is the last one (which goes on to the logits)."""
        if not self.pp.last:
            self.pp.send_forward(h)
        return self.pp.last

    def prefill(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None,
        slots: list[int] | None,
        last_only: bool,
        lengths: list[int] | None = None,
    ) -> torch.Tensor | None:
        """Logits for sequences packed in ``tokens [T]`` (``lengths``; default one sequence), writing each
        one's K/V into its cache slot. ``last_only``: ``[n_seq, vocab]``, each sequence's last position."""
        with sdpa_kernel(PREFILL_SDPA):
            return self._prefill(tokens, cache, slots, last_only, lengths or [tokens.shape[0]])

    def _prefill(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None,
        slots: list[int] | None,
        last_only: bool,
        lengths: list[int],
    ) -> torch.Tensor | None:
        device = tokens.device
        if len(lengths) == 1:  # the common single-prompt case: slices, no index tensors (TTFT)
            n = tokens.shape[0]
            h = self._stage_input(tokens)
            where1 = None if slots is None else (slots[0], None)
            rope = {kind: (cos[:n, None, :], sin[:n, None, :]) for kind, (cos, sin) in self.rope.items()}
            masks: dict[int | None, torch.Tensor | Padded | None] = {None: None}
            if self.windows:
                pos = torch.arange(n, device=device)
                masks = self._windowed(pos[:, None] >= pos[None, :], pos, pos, None)
            for layer in self.layers:
                h = layer.prefill(h, rope, cache, where1, masks)
            return self._logits(h[-1:] if last_only else h) if self._last_stage(h) else None
        # built on the host and copied once: per-sequence device aranges cost a launch each
        positions = torch.tensor([i for n in lengths for i in range(n)], device=device)
        seq = torch.tensor([s for s, n in enumerate(lengths) for _ in range(n)], device=device)
        where = None if slots is None else (torch.tensor(slots, device=device)[seq], positions)
        padded = self.spec.attn_softcap is None and Padded.pays(lengths)
        masks = {}
        if self.windows or not padded:
            # sliding windows and soft-caps need the packed mask (SDPA's causal flag has neither)
            mask = (seq[:, None] == seq[None, :]) & (positions[:, None] >= positions[None, :])
            masks.update(self._windowed(mask, positions, positions, mask))
        if padded:
            masks[None] = Padded(seq, positions, len(lengths), max(lengths))
        h = self._stage_input(tokens)
        rope = self._rows(positions)
        for layer in self.layers:
            h = layer.prefill(h, rope, cache, where, masks)
        if not self._last_stage(h):
            return None
        if last_only:
            h = h[torch.tensor(lengths, device=device).cumsum(0) - 1]
        return self._logits(h)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, length: int
    ) -> torch.Tensor | None:
        """Next-token logits ``[B, vocab]`` for slots ``0..B-1``, each at its own position (< ``length``)."""
        if self.attention_kernel:
            rope, key_masks = self.rope, {None: None}
        else:
            rope = self._rows(positions)
            keys = torch.arange(length, device=tokens.device)
            key_mask = keys[None, :] <= positions[:, None]
            key_masks = self._windowed(key_mask, positions, keys, key_mask)
        h = self._stage_input(tokens)
        for layer in self.layers:
            h = layer.decode(h, rope, positions, cache, length, key_masks)
        return self._logits(h) if self._last_stage(h) else None
