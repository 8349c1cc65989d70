"""Triton kernels for the CUDA decode step, each behind a torch custom op so Inductor and CUDA graphs
call them as single opaque launches.

- ``decode_attention``: one kernel per layer does RoPE on the new token's q and k, writes its K/V
  (FP8-quantized for an FP8 cache) into the cache at its position, and attends over the cache in
  split-KV chunks (flash-decoding), the query heads of one KV head sharing each K/V load (GQA); a
  second small kernel merges the chunks. It replaces the gather of cos/sin, the key mask, two cache
  writes and cuDNN SDPA: 4.8 us of kernels per layer at batch 1 on an H200, against about 11 us for
  those it replaces on an H100 (``bench/results/engine_gpu_kernels/``).
- ``gemv``: ``y = x @ W^T`` for one row (batch-1 decode) over a bf16/fp16 or FP8 weight, the FP8
  activation quantization (and AWQ ``pre_quant_scale``) done in the kernel's prologue, so the weights
  stream at the card's bandwidth without a separate quantize kernel.
- ``qmatmul``: ``y = x @ W^T`` over the integer weights of ``QuantLinear``'s kinds
  ``int8_wo`` (W8A16, per-channel scales), ``int8_sq`` (W8A8 SmoothQuant: the per-tensor activation
  quantization in the prologue, an int8 x int8 dot) and ``int4`` (W4A16 / W4A16_AWQ, ModelOpt's
  ``[out/2, in]`` nibble packing read as stored, per-group scales), the AWQ/SmoothQuant
  ``pre_quant_scale`` fused too; the weight is never materialised in the engine dtype. Two designs,
  raced per weight shape at build time (``linear.tune_quant``): a CUDA-core GEMV for one row
  (``_qgemv_kernel``: float32 FMAs, integers turned into floats by exponent-bit tricks instead of
  conversion instructions) and a tensor-core kernel for any rows (``_qmm_kernel``: the weight tile is
  the dot's M side, "swap AB", so 16-64 rows of activations fill its N side, more rows in more M tiles).
  Both may split K over more programs (split-K: float32 partials, then one small sum kernel), for the
  decode shapes whose row tiles alone leave most SMs idle.

Numerics follow the torch path in ``model.py``/``linear.py``: float32 accumulation, q/k rounded to the
engine dtype after RoPE, the FP8 cache value rounded exactly as ``KVCache.quantize``, int8 activations
rounded exactly as ``QuantLinear._quantize_input``. The integer-weight kernels multiply ``q * scale``
in float32 (or apply the scale to the float32 dot), where the torch path first rounds the dequantized
weight (and SmoothQuant's dequantized activation) to the engine dtype: they differ from it by that
rounding and the summation order, and equal it bit for bit where those roundings are exact. The kernels run on
CPU tensors under ``TRITON_INTERPRET=1``, which is how the tests check them against that path.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves every device
    triton = None

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels can run for this device and engine dtype (CUDA, or the interpreter in tests)."""
    if triton is None or dtype not in KERNEL_DTYPES:
        return False
    return device.type == "cuda" or interpreting()


def attention_supported(head_size: int) -> bool:
    return head_size >= 16 and head_size & (head_size - 1) == 0


@functools.cache
def _sm_count(index: int | None) -> int:
    if index is None:  # the interpreter: a few "SMs" so the split-KV path is exercised
        return 4
    return torch.cuda.get_device_properties(index).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _rope(base, offs_d, cos, sin, HALF: tl.constexpr, D: tl.constexpr):
        x = tl.load(base + offs_d).to(tl.float32)
        partner = tl.load(base + (offs_d + HALF) % D).to(tl.float32)
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        return x * cos + sign * partner * sin

    @triton.jit
    def _dot(a, b, F32: tl.constexpr):
        # The interpreter multiplies bf16 operands wrongly (numpy has no bf16): it gets their exact
        # float32 values; on the GPU the tensor cores take them as they are (float32 accumulation either way).
        if F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _decode_attention_kernel(
        QKV,
        POS,
        COS,
        SIN,
        KC,
        VC,
        K_SCALE,
        V_SCALE,
        OUT,
        ACC,
        ML,
        stride_qkv,
        stride_cb,
        stride_ch,
        stride_cs,
        chunk,
        splits,
        sm_scale,
        H: tl.constexpr,
        KVH: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FP8_KV: tl.constexpr,
        SINGLE: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        b, kvh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        dtype = OUT.dtype.element_ty
        pos = tl.load(POS + b)
        offs_d = tl.arange(0, D)
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < G
        cos = tl.load(COS + pos * D + offs_d).to(tl.float32)
        sin = tl.load(SIN + pos * D + offs_d).to(tl.float32)
        row = QKV + b * stride_qkv
        # q for this KV head's query group, rotated, rounded to the engine dtype as the torch path does
        q_ptr = row + (kvh * G + offs_h)[:, None] * D
        q = tl.load(q_ptr + offs_d[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
        q_partner = tl.load(q_ptr + ((offs_d + D // 2) % D)[None, :], mask=hmask[:, None], other=0.0).to(
            tl.float32
        )
        q = (q * cos[None, :] + tl.where(offs_d < D // 2, -1.0, 1.0)[None, :] * q_partner * sin[None, :]).to(
            dtype
        )
        if FP8_KV:
            # The dots run in fp16: e4m3 -> fp16 is one native conversion per pair (to bf16 it is three, and
            # it made the FP8 cache read no faster than bf16's), exact for cache values and for q (already
            # rounded to the engine dtype) inside fp16's range, which the clamp keeps it in.
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        k_new = _rope(row + (H + kvh) * D, offs_d, cos, sin, D // 2, D).to(dtype)
        v_new = tl.load(row + (H + KVH + kvh) * D + offs_d).to(dtype)
        cache = b.to(tl.int64) * stride_cb + kvh * stride_ch  # int64: a large cache passes 2^31 elements
        score_scale = sm_scale
        if FP8_KV:
            k_scale, v_scale = tl.load(K_SCALE), tl.load(V_SCALE)
            k_store = tl.clamp(k_new.to(tl.float32) / k_scale, -448.0, 448.0).to(KC.dtype.element_ty)
            v_store = tl.clamp(v_new.to(tl.float32) / v_scale, -448.0, 448.0).to(VC.dtype.element_ty)
            # Attention sees what the cache holds, in cache units: e4m3 -> fp16 is exact, and the scales
            # come out of the sums (k_scale into the scores, v_scale into the output), so the loop does no
            # per-element multiply (measured: with one, the FP8 cache read slower than the bf16 one).
            k_new, v_new = k_store.to(tl.float16), v_store.to(tl.float16)
            score_scale = sm_scale * k_scale
        else:
            k_store, v_store = k_new, v_new
        start = s * chunk
        if (pos >= start) & (pos < start + chunk):  # the one program whose chunk holds pos writes the token
            tl.store(KC + cache + pos * stride_cs + offs_d, k_store)
            tl.store(VC + cache + pos * stride_cs + offs_d, v_store)
        # Keys < pos come from the cache, straight into the dots; pos itself joins from registers after the
        # loop. Merging it into its tile (a select on the loaded K and V) kept the tiles out of the dots'
        # operand path: the FP8 cache, half the bytes, read no faster than bf16's (engine_gpu_attention).
        old_end = tl.minimum(start + chunk, pos)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        for n0 in range(start, old_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            old = offs_n < old_end
            kv_ptr = cache + offs_n[:, None] * stride_cs + offs_d[None, :]
            k = tl.load(KC + kv_ptr, mask=old[:, None], other=0.0)
            v = tl.load(VC + kv_ptr, mask=old[:, None], other=0.0)
            if FP8_KV:
                k, v = k.to(tl.float16), v.to(tl.float16)
            scores = _dot(q, tl.trans(k), DOT_F32) * score_scale
            scores = tl.where(old[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every tile holds a key < pos
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
            m_i = m_new
        if (pos >= start) & (pos < start + chunk):
            # p rounded to the value dtype as the tiles' dot operand is, products and sums in float32
            score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * score_scale
            m_new = tl.maximum(m_i, score)
            alpha = tl.exp(m_i - m_new)
            p_new = tl.exp(score - m_new).to(v_new.dtype).to(tl.float32)
            l_i = l_i * alpha + tl.exp(score - m_new)
            acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new
        if FP8_KV:
            acc = acc * v_scale
        if SINGLE:
            out = OUT + b * (H * D) + (kvh * G + offs_h)[:, None] * D + offs_d[None, :]
            tl.store(out, (acc / l_i[:, None]).to(dtype), mask=hmask[:, None])
        else:
            part = (b * KVH + kvh) * splits + s
            tl.store(ACC + (part * BLOCK_H + offs_h)[:, None] * D + offs_d[None, :], acc, mask=hmask[:, None])
            tl.store(ML + (part * 2) * BLOCK_H + offs_h, m_i, mask=hmask)
            tl.store(ML + (part * 2 + 1) * BLOCK_H + offs_h, l_i, mask=hmask)

    @triton.jit
    def _merge_splits_kernel(
        ACC,
        ML,
        OUT,
        splits,
        H: tl.constexpr,
        KVH: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        # one program per query head, every split's partial loaded at once (a loop over splits would
        # serialize one global-load latency per split)
        b, head = tl.program_id(0), tl.program_id(1)
        kvh, h = head // G, head % G
        offs_s = tl.arange(0, SPLITS)
        offs_d = tl.arange(0, D)
        smask = offs_s < splits
        part = (b * KVH + kvh) * splits + offs_s
        m = tl.load(ML + (part * 2) * BLOCK_H + h, mask=smask, other=float("-inf"))
        lsum = tl.load(ML + (part * 2 + 1) * BLOCK_H + h, mask=smask, other=0.0)
        acc = tl.load(
            ACC + ((part * BLOCK_H + h) * D)[:, None] + offs_d[None, :], mask=smask[:, None], other=0.0
        )
        # split 0 always holds key 0, so the max is finite; empty or padded splits weigh exp(-inf) = 0
        w = tl.exp(m - tl.max(m, axis=0))
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
        tl.store(OUT + b * (H * D) + head * D + offs_d, out.to(OUT.dtype.element_ty))

    @triton.jit
    def _gemv_kernel(
        X,
        W,
        Y,
        PQS,
        INV_IN_SCALE,
        OUT_SCALE,
        N,
        K,
        stride_w,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_PQS: tl.constexpr,
        FP8: tl.constexpr,
    ):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if FP8:
            inv_in_scale = tl.load(INV_IN_SCALE)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            x = tl.load(X + offs_k, mask=kmask, other=0.0)
            if HAS_PQS:  # AWQ pre_quant_scale, multiplied in the activation dtype as the torch path does
                x = (x.to(tl.float32) * tl.load(PQS + offs_k, mask=kmask, other=0.0).to(tl.float32)).to(
                    X.dtype.element_ty
                )
            x = x.to(tl.float32)
            if FP8:
                x = tl.clamp(x * inv_in_scale, -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
            w = tl.load(
                W
                + offs_n.to(tl.int64)[:, None] * stride_w
                + offs_k[None, :],  # int64: vocab x hidden may pass 2^31
                mask=nmask[:, None] & kmask[None, :],
                other=0.0,
            )
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if FP8:
            y = y * tl.load(OUT_SCALE)
        tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=nmask)

    # -- integer weights ----------------------------------------------------------------------------
    # An int8 value q becomes a float without a conversion instruction (16 per clock per SM on Hopper,
    # against 64-128 for plain integer/float ops): its bits, offset by 128, are the low mantissa bits of
    # 2^23, so ``bits(2^23) | (q + 128)`` is the float ``2^23 + 128 + q`` and one exact subtraction gives q.
    # A nibble works the same way into the engine dtype: ``bits(BASE) | u`` is ``BASE + u`` for u < 16
    # (bf16 BASE 128, fp16 1024: a binade whose step is 1).

    @triton.jit
    def _i8_to_f32(w):
        return ((w & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _i4_to_f32(nibble):  # the low 4 bits of ``nibble``, a two's-complement int4
        return ((nibble & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0

    @triton.jit
    def _nibble_half(nibble, BITS: tl.constexpr, dtype: tl.constexpr):
        """``BASE + u`` in the engine dtype for u = the low 4 bits of ``nibble`` (``BITS``: BASE's bits, | 8
        for a signed nibble, whose two's-complement bits xor 8 are u = q + 8)."""
        return ((nibble & 0xF) ^ BITS).to(tl.int16).to(dtype, bitcast=True)

    @triton.jit
    def _round_int8(v):
        """``round(v).clamp(-128, 127)`` as ``torch.round`` rounds (half to even): clamped first (the same
        result), then float32 addition of 1.5 * 2^23 rounds to an integer, to nearest even. The clamp
        between the multiply that made ``v`` and the addition keeps the two from fusing into one FMA."""
        return (tl.clamp(v, -128.0, 127.0) + 12582912.0) - 12582912.0

    @triton.jit
    def _qgemv_kernel(
        X,
        W,
        S,
        Y,
        P,
        PQS,
        INV_IN_SCALE,
        N_ROWS,
        K,
        K_SPLIT,
        stride_w,
        stride_sn,
        stride_sg,
        ROWS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr,
        KIND: tl.constexpr,
        HAS_PQS: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):
        """One activation row, CUDA cores. KIND 0 int8_wo, 1 int8_sq, 2 int4. Each program owns ``ROWS``
        weight rows (int4: packed rows, two output rows each) and walks K in ``BLOCK_K`` steps of
        ``GROUP``-wide slices (int4: one scale per row per slice). ``SPLIT_K`` > 1: program ``(i, s)`` walks
        the ``K_SPLIT`` columns from ``s * K_SPLIT`` and stores its float32 sums, scaled, in ``P[s]``."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < N_ROWS
        w_rows = W + rows.to(tl.int64)[:, None] * stride_w  # int64: rows x K may pass 2^31
        acc = tl.zeros([ROWS, GROUP], tl.float32)
        acc_hi = tl.zeros([ROWS, GROUP], tl.float32)  # int4: the odd output rows (high nibbles)
        if KIND == 1:
            inv_in_scale = tl.load(INV_IN_SCALE)
        if SPLIT_K == 1:
            k_lo, k_hi = 0, K
            out = Y
        else:  # K_SPLIT is a multiple of BLOCK_K: no block straddles two splits
            k_lo = tl.program_id(1) * K_SPLIT
            k_hi = tl.minimum(k_lo + K_SPLIT, K)
            if KIND == 2:
                out = P + tl.program_id(1) * (2 * N_ROWS)
            else:
                out = P + tl.program_id(1) * N_ROWS
        for k0 in range(k_lo, k_hi, BLOCK_K):
            for j in tl.static_range(BLOCK_K // GROUP):
                offs_k = k0 + j * GROUP + tl.arange(0, GROUP)
                kmask = offs_k < K
                x = tl.load(X + offs_k, mask=kmask, other=0.0)
                if HAS_PQS:  # multiplied in the activation dtype, as the torch path does
                    x = (x.to(tl.float32) * tl.load(PQS + offs_k, mask=kmask, other=0.0).to(tl.float32)).to(
                        X.dtype.element_ty
                    )
                x = x.to(tl.float32)
                if KIND == 1:
                    x = _round_int8(x * inv_in_scale)
                w = tl.load(w_rows + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0).to(
                    tl.int32
                )
                if KIND == 2:
                    g = (k0 + j * GROUP) // GROUP
                    smask = rmask & (rows * 0 + k0 + j * GROUP < K)  # the slice lies inside K
                    s_lo = tl.load(S + g * stride_sg + (2 * rows) * stride_sn, mask=smask, other=0.0)
                    s_hi = tl.load(S + g * stride_sg + (2 * rows + 1) * stride_sn, mask=smask, other=0.0)
                    acc += (_i4_to_f32(w) * s_lo[:, None]) * x[None, :]
                    acc_hi += (_i4_to_f32(w >> 4) * s_hi[:, None]) * x[None, :]
                else:
                    acc += _i8_to_f32(w) * x[None, :]
        if KIND == 2:
            tl.store(out + 2 * rows, tl.sum(acc, axis=1).to(out.dtype.element_ty), mask=rmask)
            tl.store(out + 2 * rows + 1, tl.sum(acc_hi, axis=1).to(out.dtype.element_ty), mask=rmask)
        else:  # int8_wo: the weight scale; int8_sq: input scale x weight scale (linear: per split too)
            y = tl.sum(acc, axis=1) * tl.load(S + rows * stride_sn, mask=rmask, other=0.0)
            tl.store(out + rows, y.to(out.dtype.element_ty), mask=rmask)

    @triton.jit(
        do_not_specialize=["M"]
    )  # one compile serves every row count (Triton would specialize M == 1, M % 16)
    def _qmm_kernel(
        X,
        W,
        S,
        Y,
        P,
        PQS,
        INV_IN_SCALE,
        M,
        N,
        N_ROWS,
        K,
        K_SPLIT,
        stride_xm,
        stride_w,
        stride_sn,
        stride_sg,
        BLOCK_M: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr,
        KIND: tl.constexpr,
        HAS_PQS: tl.constexpr,
        BASE_BITS: tl.constexpr,
        BASE: tl.constexpr,
        DOT_F32: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):
        """``BLOCK_M`` activation rows (grid axis 0 over M tiles, 1 over weight rows, 2 over K splits as in
        ``_qgemv_kernel``), tensor cores: ``acc[ROWS, BLOCK_M] += W_tile @ x_tile^T``.

        int8_sq: the activations quantized to int8 in the prologue, an int8 x int8 -> int32 dot, exact.
        int4: each nibble as ``BASE + 8 + q`` in the engine dtype (exact), one dot per group for the even
        and one for the odd rows, ``(BASE + 8) * sum(x)`` taken off before the group's scale.
        int8_wo: the byte split into its signed high and unsigned low nibble (``q = 16 h + l``), each
        ``BASE``-offset, two dots, the offsets taken off with ``sum(x)`` at the end, times the row scale.
        """
        dtype = X.dtype.element_ty
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        rmask = rows < N_ROWS
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < M
        w_rows = W + rows.to(tl.int64)[:, None] * stride_w
        x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm  # int64: a long prefill's M x K may pass 2^31
        acc = tl.zeros([ROWS, BLOCK_M], tl.float32)
        acc_hi = tl.zeros([ROWS, BLOCK_M], tl.float32)
        acc_i = tl.zeros([ROWS, BLOCK_M], tl.int32)
        sum_x = tl.zeros([BLOCK_M], tl.float32)
        if KIND == 1:
            inv_in_scale = tl.load(INV_IN_SCALE)
        if SPLIT_K == 1:
            k_lo, k_hi = 0, K
        else:  # K_SPLIT is a multiple of BLOCK_K (int4: of the group too): no block straddles two splits
            k_lo = tl.program_id(2) * K_SPLIT
            k_hi = tl.minimum(k_lo + K_SPLIT, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            for j in tl.static_range(BLOCK_K // GROUP):
                offs_k = k0 + j * GROUP + tl.arange(0, GROUP)
                kmask = offs_k < K
                x = tl.load(x_rows + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
                if HAS_PQS:
                    x = (
                        x.to(tl.float32)
                        * tl.load(PQS + offs_k, mask=kmask, other=0.0).to(tl.float32)[None, :]
                    ).to(dtype)
                w = tl.load(w_rows + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0)
                if KIND == 1:
                    xq = _round_int8(x.to(tl.float32) * inv_in_scale).to(tl.int8)
                    acc_i += tl.dot(w, tl.trans(xq), out_dtype=tl.int32)
                else:
                    w = w.to(tl.int32)
                    xt = tl.trans(x)
                    part_x = tl.sum(x.to(tl.float32), axis=1)
                    if KIND == 2:
                        g = (k0 + j * GROUP) // GROUP
                        smask = rmask & (rows * 0 + k0 + j * GROUP < K)  # the slice lies inside K
                        s_lo = tl.load(S + g * stride_sg + (2 * rows) * stride_sn, mask=smask, other=0.0)
                        s_hi = tl.load(S + g * stride_sg + (2 * rows + 1) * stride_sn, mask=smask, other=0.0)
                        offset = (BASE + 8.0) * part_x[None, :]
                        lo = _dot(_nibble_half(w, BASE_BITS | 8, dtype), xt, DOT_F32)
                        hi = _dot(_nibble_half(w >> 4, BASE_BITS | 8, dtype), xt, DOT_F32)
                        acc += (lo - offset) * s_lo[:, None]
                        acc_hi += (hi - offset) * s_hi[:, None]
                    else:
                        acc += _dot(_nibble_half(w, BASE_BITS, dtype), xt, DOT_F32)
                        acc_hi += _dot(_nibble_half(w >> 4, BASE_BITS | 8, dtype), xt, DOT_F32)
                        sum_x += part_x
        out_mask = rmask[:, None] & mmask[None, :]
        if SPLIT_K == 1:
            y_rows = Y + offs_m.to(tl.int64)[None, :] * N
        else:
            y_rows = P + (tl.program_id(2) * M + offs_m).to(tl.int64)[None, :] * N
        out_dtype = y_rows.dtype.element_ty
        if KIND == 2:
            tl.store(y_rows + (2 * rows)[:, None], acc.to(out_dtype), mask=out_mask)
            tl.store(y_rows + (2 * rows + 1)[:, None], acc_hi.to(out_dtype), mask=out_mask)
        else:  # a split's int32 (int8_sq) or offset-corrected sums times the row scale: linear, so per split
            scale = tl.load(S + rows * stride_sn, mask=rmask, other=0.0)
            if KIND == 1:
                y = acc_i.to(tl.float32) * scale[:, None]
            else:  # 16 (BASE + 8 + h) + (BASE + l) = q + (17 BASE + 128)
                y = (16.0 * acc_hi + acc - (17.0 * BASE + 128.0) * sum_x[None, :]) * scale[:, None]
            tl.store(y_rows + rows[:, None], y.to(out_dtype), mask=out_mask)

    @triton.jit
    def _split_sum_kernel(P, Y, NUMEL, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """``Y = P[0] + ... + P[SPLIT_K - 1]`` in Y's dtype: split-K's float32 partials, in split order."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < NUMEL
        part = P + offs
        acc = tl.load(part, mask=mask, other=0.0)
        for _ in tl.static_range(1, SPLIT_K):
            part += NUMEL  # on the pointers: SPLIT_K x NUMEL may pass 2^31
            acc += tl.load(part, mask=mask, other=0.0)
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


# -- decode attention --------------------------------------------------------------------------------

ATTENTION_BLOCK_N = 32


def attention_splits(batch: int, kv_heads: int, length: int, sm_count: int) -> tuple[int, int]:
    """(splits, keys per split) for a (batch, attended length) bucket: enough programs to fill the
    card twice over at small batch, never a split shorter than one key block."""
    blocks = -(-length // ATTENTION_BLOCK_N)
    want = max(1, -(-2 * sm_count // (batch * kv_heads)))
    per_split = -(-blocks // min(blocks, want))
    chunk = per_split * ATTENTION_BLOCK_N
    return -(-length // chunk), chunk


# (BLOCK_N keys per loop step, num_warps, num_stages) of the attention kernel: the default, and the winners
# of bench/engine_gpu_attention.py on the H200 at batch >= 64 (bench/results/engine_gpu_attention_h200.md:
# a third pipeline stage for the bf16 cache, larger key blocks on fewer warps for the FP8 one)
ATTENTION_LAUNCH = (32, 4, 2)
LARGE_BATCH_LAUNCH = {False: (32, 4, 3), True: (64, 2, 2)}
LARGE_BATCH = 64


def attention_launch(batch: int, fp8: bool) -> tuple[int, int, int]:
    """The attention kernel's launch shape for a decode batch with a bf16 or FP8 cache."""
    return LARGE_BATCH_LAUNCH[fp8] if batch >= LARGE_BATCH else ATTENTION_LAUNCH


@torch.library.custom_op("kiln::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    heads: int,
    kv_heads: int,
    length: int,
    launch: list[int] | None = None,
) -> torch.Tensor:
    """Attention output ``[B, heads * D]`` of one decode token per row of
    ``qkv [B, (heads + 2 kv_heads) * D]`` (pre-RoPE), each at ``positions[b] < length``; writes the new K/V
    into ``k_cache/v_cache[b, :, pos]``. ``launch``: an explicit ``(BLOCK_N, num_warps, num_stages)`` instead
    of ``attention_launch``'s (benchmarks race them); any BLOCK_N gives the same result (the split chunks
    are masked per key), only the speed differs."""
    batch = qkv.shape[0]
    d = k_cache.shape[-1]
    group = heads // kv_heads
    block_h = max(16, _next_pow2(group))
    block_n, warps, stages = launch or attention_launch(batch, k_scale is not None)
    out = torch.empty(batch, heads * d, dtype=qkv.dtype, device=qkv.device)
    sms = _sm_count(None if interpreting() else qkv.device.index)
    splits, chunk = attention_splits(batch, kv_heads, length, sms)
    single = splits == 1
    acc = (
        out
        if single
        else torch.empty(batch * kv_heads * splits * block_h, d, dtype=torch.float32, device=qkv.device)
    )
    ml = (
        out
        if single
        else torch.empty(batch * kv_heads * splits * 2, block_h, dtype=torch.float32, device=qkv.device)
    )
    fp8 = k_scale is not None
    _decode_attention_kernel[(batch, kv_heads, splits)](
        qkv,
        positions,
        cos,
        sin,
        k_cache,
        v_cache,
        k_scale if fp8 else out,
        v_scale if fp8 else out,
        out,
        acc,
        ml,
        qkv.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        chunk,
        splits,
        d**-0.5,
        H=heads,
        KVH=kv_heads,
        G=group,
        D=d,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        FP8_KV=fp8,
        SINGLE=single,
        DOT_F32=interpreting(),
        num_warps=warps,
        num_stages=stages,
    )
    if not single:
        _merge_splits_kernel[(batch, heads)](
            acc,
            ml,
            out,
            splits,
            H=heads,
            KVH=kv_heads,
            G=group,
            D=d,
            BLOCK_H=block_h,
            SPLITS=_next_pow2(splits),
            num_warps=2,
        )
    return out


@decode_attention.register_fake
def _(qkv, positions, cos, sin, k_cache, v_cache, k_scale, v_scale, heads, kv_heads, length, launch=None):
    return qkv.new_empty(qkv.shape[0], heads * k_cache.shape[-1])


# -- batch-1 GEMV ------------------------------------------------------------------------------------


@torch.library.custom_op("kiln::gemv", mutates_args=())
def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    pre_quant_scale: torch.Tensor | None,
    inv_input_scale: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    config: list[int] | None = None,
) -> torch.Tensor:
    """``x [1, K] @ weight[N, K]^T`` (``config``: BLOCK_N, BLOCK_K, num_warps) in float32 accumulation,
    returned in ``x``'s dtype. FP8 ``weight``:
    ``x`` is quantized as ``fp8(x * inv_input_scale)`` first and the sum scaled by ``out_scale``
    (input scale x weight scale)."""
    n, k = weight.shape
    fp8 = weight.dtype == torch.float8_e4m3fn
    block_n, block_k, warps = config or GEMV_CANDIDATES[0]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        y,
        pre_quant_scale if pre_quant_scale is not None else x,
        inv_input_scale if fp8 else x,
        out_scale if fp8 else x,
        n,
        k,
        weight.stride(0),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        HAS_PQS=pre_quant_scale is not None,
        FP8=fp8,
        num_warps=warps,
    )
    return y


@gemv.register_fake
def _(x, weight, pre_quant_scale, inv_input_scale, out_scale, config=None):
    return x.new_empty(1, weight.shape[0])


# -- build-time choice of the GEMV per weight shape ----------------------------------------------------

GEMV_CANDIDATES = ((4, 1024, 8), (4, 512, 4), (8, 1024, 8), (8, 512, 4), (16, 256, 4))


def gemv_key(fp8: bool, n: int, k: int) -> str:
    return f"{'fp8' if fp8 else 'dense'}:{n}x{k}"


def graph_ms(step, iters: int = 20) -> float:
    """Median ms of one replay of ``step()`` captured as a CUDA graph (warm-up on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(iters):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _chain_ms(fn, copies: int) -> float:
    """ms of ``fn(i)`` for every ``i`` in ``range(copies)``, as one graph."""
    return graph_ms(lambda: [fn(i) for i in range(copies)])


def tune_gemv(
    shapes: set[tuple[bool, int, int]], device: torch.device, dtype: torch.dtype
) -> dict[str, list[int] | None]:
    """For each (fp8, N, K) weight shape: the fastest batch-1 GEMV on this GPU, a Triton block shape or
    ``None`` for cuBLAS, each timed over enough distinct weights that none stays in L2 (as a decode step
    reads them). What a TensorRT build does with its tactics, at the scale of five shapes."""
    chosen: dict[str, list[int] | None] = {}
    for fp8, n, k in sorted(shapes):
        times = _time_gemv(fp8, n, k, device, dtype)
        best = min(times, key=times.get)
        chosen[gemv_key(fp8, n, k)] = None if best is None else list(best)
    return chosen


def _time_gemv(
    fp8: bool, n: int, k: int, device: torch.device, dtype: torch.dtype
) -> dict[tuple[int, int, int] | None, float]:
    """ms per chain for cuBLAS (key ``None``) and each Triton candidate that fits ``k``."""
    copies = max(2, min(16, (256 << 20) // (n * k * (1 if fp8 else 2))))
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device=device, dtype=dtype)
    one = torch.ones((), device=device)
    if fp8:
        weights = [(w.float() * (FP8_MAX / w.float().abs().amax())).to(torch.float8_e4m3fn) for w in weights]
        xq = x.to(torch.float8_e4m3fn)
        times = {
            None: _chain_ms(
                lambda i: torch._scaled_mm(xq, weights[i].t(), scale_a=one, scale_b=one, out_dtype=dtype),
                copies,
            )
        }
    else:
        times = {None: _chain_ms(lambda i: torch.nn.functional.linear(x, weights[i]), copies)}
    scales = (one, one) if fp8 else (None, None)
    for cfg in GEMV_CANDIDATES:
        if cfg[1] <= _next_pow2(k):
            times[cfg] = _chain_ms(lambda i, cfg=cfg: gemv(x, weights[i], None, *scales, list(cfg)), copies)
    return times


# -- integer-weight GEMV / small-batch GEMM ------------------------------------------------------------

QUANT_KINDS = ("int8_wo", "int8_sq", "int4")
_QUANT_KIND_IDS = {"int8_wo": 0, "int8_sq": 1, "int4": 2}
QMM_BLOCK_M = 16  # rows of activations one tensor-core program takes in the 2-16 row bucket (a decode batch)
GEMV, QMM = 0, 1  # ``config[0]``: the CUDA-core GEMV (one row) or the tensor-core kernel (any rows)
# (BLOCK_N output rows, BLOCK_K, num_warps, num_stages) per design and weight kind, raced at build time.
# Each holds 16-32 weight bytes per thread per load (int4's group-wide slices: BLOCK_N / 2 rows x group
# bytes over the program's threads), so loads stay 16 bytes wide.
QGEMV_CANDIDATES = {
    "int8": ((4, 1024, 4, 3), (4, 2048, 8, 3), (8, 1024, 8, 3), (8, 512, 4, 3), (16, 512, 8, 3)),
    "int4": ((8, 1024, 1, 3), (16, 512, 2, 3), (16, 1024, 2, 3), (32, 256, 4, 3), (32, 512, 4, 3)),
}
# The tensor-core kernel's tiles are at least 16 weight rows (the dot's M; int4: 32 output rows, two dots),
# so an N of 4096 gives only 128-256 programs: long K steps and deep pipelines keep ~32 KB per SM in flight.
QMM_CANDIDATES = {
    "int8_wo": ((16, 512, 4, 4), (16, 1024, 4, 3), (32, 256, 4, 4), (32, 512, 4, 3), (64, 256, 4, 3)),
    "int8_sq": ((16, 512, 4, 4), (16, 1024, 4, 3), (32, 256, 4, 4), (32, 512, 4, 3), (64, 256, 4, 3)),
    "int4": ((32, 256, 4, 4), (32, 512, 4, 4), (32, 1024, 4, 3), (64, 256, 4, 3), (64, 512, 4, 3)),
}
# Above 16 rows: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The x tile (BLOCK_M x BLOCK_K in the
# engine dtype) now outweighs the weight tile, so K steps shrink as BLOCK_M grows (~32-48 KB per stage).
QMM_M_CANDIDATES = {
    "int8": (
        (16, 32, 512, 4, 3),
        (32, 32, 256, 4, 3),
        (32, 64, 256, 4, 3),
        (64, 32, 256, 4, 3),
        (64, 64, 128, 4, 3),
        (64, 128, 128, 8, 3),
    ),
    "int4": (
        (16, 64, 512, 4, 3),
        (32, 64, 256, 4, 3),
        (32, 128, 256, 8, 3),
        (64, 64, 128, 4, 3),
        (64, 128, 128, 8, 3),
    ),
}
SPLIT_KS = (2, 4, 8)  # split-K candidates, for shapes with fewer than ~2 row tiles per SM
_HALF_BASE = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}
_CONFIG_DEFAULTS = (None, None, None, None, None, 1, QMM_BLOCK_M)


def quant_key(kind: str, n: int, k: int, group: int = 0) -> str:
    """``program.gemv`` key of an integer-weight linear: kind (int4 with its group size) and ``N x K``."""
    return f"{kind}_g{group}:{n}x{k}" if kind == "int4" else f"{kind}:{n}x{k}"


def quant_shape(kind: str, weight: torch.Tensor, scale: torch.Tensor) -> tuple[str, int, int, int]:
    """(kind, N, K, group) of a runtime-layout linear (int4's packed weight holds ``N / 2`` rows)."""
    if kind == "int4":
        return kind, 2 * weight.shape[0], weight.shape[1], weight.shape[1] // scale.shape[1]
    return kind, weight.shape[0], weight.shape[1], 0


def quant_config(config: list[int]) -> tuple[int, int, int, int, int, int, int]:
    """``(design, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K, BLOCK_M)`` of a recorded config; engines
    built before split-K and M tiles recorded the first five (SPLIT_K 1, BLOCK_M ``QMM_BLOCK_M``)."""
    if not 5 <= len(config) <= len(_CONFIG_DEFAULTS):
        raise ValueError(f"an integer-weight config has 5-7 entries, got {config}")
    return (*config, *_CONFIG_DEFAULTS[len(config) :])


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (a few under the interpreter, as for split-KV attention)."""
    if device.type != "cuda":
        return _sm_count(None)
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _split_ks(k: int, block_k: int, tiles: int, sms: int) -> list[int]:
    """Split-K counts worth racing for ``tiles`` programs on ``sms`` SMs: while the grid is under ~2 programs
    per SM (the card otherwise mostly idle on a decode batch), and only counts that ``qmatmul``'s whole
    ``BLOCK_K`` steps per split give exactly (others repeat a smaller count)."""
    steps = triton.cdiv(k, block_k)
    exact = [s for s in SPLIT_KS if triton.cdiv(steps, triton.cdiv(steps, s)) == s]
    return [s for s in exact if tiles * s // 2 < 2 * sms]


def quant_candidates(kind: str, k: int, group: int, m: int, n: int = 0, sms: int = 0) -> list[list[int]]:
    """Configs ``[design, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K]`` (tensor-core designs above 16
    rows add ``BLOCK_M``) that fit a shape, for ``m`` rows (the CUDA-core GEMV only for one row). int4 needs
    ``BLOCK_K`` a multiple of its group (one scale per slice). With ``n`` and ``sms`` (``sm_count``) given,
    split-K variants for the configs whose grid leaves the SMs idle."""
    table: list[tuple[int, int, int, int, int, int]] = []  # design, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    if m == 1:
        table += [(GEMV, 1, *c) for c in QGEMV_CANDIDATES["int4" if kind == "int4" else "int8"]]
    if m <= QMM_BLOCK_M:
        table += [(QMM, QMM_BLOCK_M, *c) for c in QMM_CANDIDATES[kind]]
    else:
        table += [(QMM, *c) for c in QMM_M_CANDIDATES["int4" if kind == "int4" else "int8"]]
    out = []
    for design, block_m, block_n, block_k, warps, stages in table:
        if kind == "int4" and (block_k % group or k % group):
            continue
        if block_k > max(_next_pow2(k), 64) or (design == QMM and block_m > max(_next_pow2(m), 16)):
            continue
        if kind == "int8_wo" and design == QMM:
            # Triton 3.6 miscompiles its pipelined loop on an H200: num_stages 3 left the torch path by up to
            # 1.7x the output range (BLOCK_M 64, or split-K at BLOCK_K 256), num_stages 1 never did
            # (bench/results/engine_gpu_qmm_sweep_h200.json); the build's race would drop such a config, so
            # no engine ran one, but it would waste the race's time
            stages = 1
        config = [design, block_n, block_k, warps, stages, 1] + ([block_m] if m > QMM_BLOCK_M else [])
        if config in out:
            continue
        out.append(config)
        if n and sms:
            rows = block_n // 2 if kind == "int4" else block_n
            tiles = triton.cdiv(n // (2 if kind == "int4" else 1), rows) * triton.cdiv(m, block_m)
            out += [[*config[:5], s, *config[6:]] for s in _split_ks(k, block_k, tiles, sms)]
    return out


@torch.library.custom_op("kiln::qmatmul", mutates_args=())
def qmatmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    pre_quant_scale: torch.Tensor | None,
    inv_input_scale: torch.Tensor | None,
    kind: str,
    config: list[int],
) -> torch.Tensor:
    """``x [M, K] @ W^T`` in ``x``'s dtype for an integer weight ``W`` of ``kind`` (``QUANT_KINDS``), never
    dequantized to memory. ``weight``: int8 ``[N, K]`` or int4 packed ``[N/2, K]``; ``scale``: int8_wo the
    weight scale ``[N]``, int8_sq input scale x weight scale ``[N]``, int4 the group scales ``[N, K/group]``
    (any strides: ``QuantLinear`` keeps them group-major). int8_sq quantizes ``x`` (after
    ``pre_quant_scale``) as ``round(x * inv_input_scale).clamp(-128, 127)``. ``config``: see
    ``quant_config``; the CUDA-core GEMV takes one row, the tensor-core kernel any number in ``BLOCK_M``
    tiles. ``SPLIT_K`` > 1 sums float32 partials over K ranges (a ``[SPLIT_K, M, N]`` workspace) in one
    more small kernel."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    kid = _QUANT_KIND_IDS[kind]
    int4 = kind == "int4"
    n = weight.shape[0] * (2 if int4 else 1)
    design, block_n, block_k, warps, stages, split_k, block_m = quant_config(config)
    group = k // scale.shape[1] if int4 else block_k
    rows = block_n // 2 if int4 else block_n
    stride_sg = scale.stride(1) if int4 else 0
    # whole BLOCK_K steps per split (so whole int4 groups); a short K may leave fewer splits than asked
    k_split = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    splits = triton.cdiv(k, k_split)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    pqs = pre_quant_scale if pre_quant_scale is not None else x
    inv = inv_input_scale if inv_input_scale is not None else scale
    # the two kernels share their leading pointers and their meta-parameters
    head = (x, weight, scale, y, part, pqs, inv)
    meta = dict(
        ROWS=rows,
        BLOCK_K=block_k,
        GROUP=group,
        KIND=kid,
        HAS_PQS=pre_quant_scale is not None,
        SPLIT_K=splits,
        num_warps=warps,
        num_stages=stages,
    )
    strides = (weight.stride(0), scale.stride(0), stride_sg)
    if design == GEMV:
        if m != 1:
            raise ValueError(f"the CUDA-core GEMV takes one row, got {m}")
        grid = (triton.cdiv(weight.shape[0], rows), splits)
        _qgemv_kernel[grid](*head, weight.shape[0], k, k_split, *strides, **meta)
    else:
        base_bits, base = _HALF_BASE[x.dtype]
        grid = (triton.cdiv(m, block_m), triton.cdiv(weight.shape[0], rows), splits)
        _qmm_kernel[grid](
            *head,
            m,
            n,
            weight.shape[0],
            k,
            k_split,
            x.stride(0),
            *strides,
            BLOCK_M=block_m,
            BASE_BITS=base_bits,
            BASE=base,
            DOT_F32=interpreting(),
            **meta,
        )
    if splits > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(m * n, block),)](
            part, y, m * n, SPLIT_K=splits, BLOCK=block, num_warps=4
        )
    return y


@qmatmul.register_fake
def _(x, weight, scale, pre_quant_scale, inv_input_scale, kind, config):
    return x.new_empty(x.shape[0], weight.shape[0] * (2 if kind == "int4" else 1))


# -- int4 through torch's tinygemm, one-pass dequantization, Inductor-fused GEMVs --------------------------
# Options of ``linear.tune_quant``'s race besides the Triton configs above (strings in ``program.gemv``):
# "tinygemm" (int4: ``torch._weight_int4pack_mm``, the tensor-core int4 GEMM torchao and gpt-fast use),
# "dequant" (int4/int8_wo above 16 rows: the weight dequantized by one Triton pass, then cuBLAS) and
# "fused" (one row: ``x * W`` summed over K as Inductor compiles it, one reduction kernel reading the
# integer weight as stored: what torchao's int8 weight-only decode is).

TINYGEMM, DEQUANT, FUSED, INT_MM = "tinygemm", "dequant", "fused", "int_mm"
TINYGEMM_GROUPS = (32, 64, 128, 256)


def tinygemm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """tinygemm runs bf16 activations on CUDA SM >= 80; its CPU variant serves the tests (under the
    interpreter, as the Triton kernels do: a CPU engine keeps dequantizing once at load)."""
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and interpreting() and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def tinygemm_fits(n: int, k: int, group: int) -> bool:
    return group in TINYGEMM_GROUPS and n % 8 == 0 and k % 32 == 0 and k % group == 0


def int4pack(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt's symmetric int4 (``[N/2, K]`` nibbles, low = even output row, q in [-8, 7]; float32 group
    scales ``[N, K/group]``) -> tinygemm's (packed weight, ``[K/group, N, 2]`` scales and zeros in ``dtype``).

    tinygemm dequantizes ``(u - 8) * scale + zero`` with ``u`` in [0, 15]: ``u = q + 8`` and ``zero = 0`` is
    ModelOpt's ``q * scale`` exactly, except that the scale is rounded to ``dtype`` (the kernel takes it
    so)."""
    low = (weight << 4) >> 4  # arithmetic shifts sign-extend each nibble
    q = torch.stack((low, weight >> 4), dim=1).reshape(2 * weight.shape[0], weight.shape[1]).to(torch.int32)
    u = q + 8
    k = u.shape[1]
    inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
    if weight.device.type == "cuda":  # [N, K/2] bytes, the even k in the high nibble
        packed = torch._convert_weight_to_int4pack(
            ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8).contiguous(), inner_k_tiles
        )
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(u.contiguous(), inner_k_tiles)
    scale = scale.float()
    scales_and_zeros = (
        torch.stack((scale, torch.zeros_like(scale)), dim=-1).transpose(0, 1).contiguous().to(dtype)
    )
    return packed, scales_and_zeros


@torch.library.custom_op("kiln::int4pack_mm", mutates_args=())
def int4pack_mm(
    x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """``x [M, K] @ W^T`` over tinygemm's packed int4 ``W`` (``int4pack``), in ``x``'s dtype."""
    x = x.contiguous()
    if x.is_cuda:
        return torch._weight_int4pack_mm(x, packed, group, scales_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)


@int4pack_mm.register_fake
def _(x, packed, group, scales_and_zeros):
    return x.new_empty(x.shape[0], scales_and_zeros.shape[1])


if triton is not None:

    @triton.jit
    def _dequant_kernel(
        W,
        S,
        OUT,
        N_ROWS,
        K,
        stride_w,
        stride_sn,
        stride_sg,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INT4: tl.constexpr,
    ):
        """``q * scale`` in float32, rounded to OUT's dtype (the torch path's ``_dequantize``). int4: ``ROWS``
        packed rows (two output rows each), one scale per row per ``GROUP``; int8: one scale per row."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < N_ROWS)[:, None] & (offs_k < K)[None, :]
        w = tl.load(W + rows.to(tl.int64)[:, None] * stride_w + offs_k[None, :], mask=mask, other=0).to(
            tl.int32
        )
        dtype = OUT.dtype.element_ty
        if INT4:
            g = (offs_k // GROUP)[None, :] * stride_sg
            s_lo = tl.load(S + (2 * rows)[:, None] * stride_sn + g, mask=mask, other=0.0)
            s_hi = tl.load(S + (2 * rows + 1)[:, None] * stride_sn + g, mask=mask, other=0.0)
            lo = ((w << 28) >> 28).to(tl.float32) * s_lo
            hi = ((w << 24) >> 28).to(tl.float32) * s_hi
            out = OUT + (2 * rows).to(tl.int64)[:, None] * K + offs_k[None, :]
            tl.store(out, lo.to(dtype), mask=mask)
            tl.store(out + K, hi.to(dtype), mask=mask)
        else:
            s = tl.load(S + rows * stride_sn, mask=rows < N_ROWS, other=0.0)
            tl.store(
                OUT + rows.to(tl.int64)[:, None] * K + offs_k[None, :],
                (w.to(tl.float32) * s[:, None]).to(dtype),
                mask=mask,
            )


@torch.library.custom_op("kiln::dequantize", mutates_args=())
def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The integer ``weight`` (int8 ``[N, K]`` with ``[N]`` scales, or ModelOpt int4 ``[N/2, K]`` with
    ``[N, K/group]`` scales, any strides) as ``[N, K]`` in ``dtype``, in one pass; equal to
    ``QuantLinear._dequantize`` bit for bit (the same float32 product, rounded once)."""
    int4 = scale.dim() == 2
    rows, k = weight.shape
    out = torch.empty(rows * (2 if int4 else 1), k, dtype=dtype, device=weight.device)
    group = k // scale.shape[1] if int4 else 1
    block_rows, block_k = 16, 256
    _dequant_kernel[(triton.cdiv(rows, block_rows), triton.cdiv(k, block_k))](
        weight,
        scale,
        out,
        rows,
        k,
        weight.stride(0),
        scale.stride(0),
        scale.stride(1) if int4 else 0,
        GROUP=group,
        ROWS=block_rows,
        BLOCK_K=block_k,
        INT4=int4,
        num_warps=4,
    )
    return out


@dequantize.register_fake
def _(weight, scale, dtype):
    return weight.new_empty(weight.shape[0] * (2 if scale.dim() == 2 else 1), weight.shape[1], dtype=dtype)


def fused_math(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    pre_quant_scale: torch.Tensor | None,
    inv_input_scale: torch.Tensor | None,
    kind: str,
) -> torch.Tensor:
    """One row ``x [1, K] @ W^T`` written as a product summed over K, in float32 (``qmatmul``'s arguments and
    numerics: ``q * scale`` or the scale after the integer dot). Inductor makes it one reduction kernel."""
    if pre_quant_scale is not None:
        x = x * pre_quant_scale
    xf = x.reshape(-1).float()
    if kind == "int8_sq":
        xf = torch.round(xf * inv_input_scale).clamp(-128, 127)
    if kind == "int4":
        n2, k = weight.shape
        group = k // scale.shape[1]
        s = scale.reshape(n2, 2, -1, 1).expand(n2, 2, k // group, group).reshape(n2, 2, k)
        lo = (((weight << 4) >> 4).float() * s[:, 0] * xf).sum(-1)
        hi = ((weight >> 4).float() * s[:, 1] * xf).sum(-1)
        y = torch.stack((lo, hi), dim=-1).reshape(1, 2 * n2)
    else:
        y = ((weight.float() * xf).sum(-1) * scale).reshape(1, -1)
    return y.to(x.dtype)


_FUSED: dict[tuple, object] = {}


def _fused_fn(key: tuple):
    """A compiled ``fused_math`` per shape. Each gets a code object of its own: Dynamo caches compiled
    graphs per code object (and stops recompiling after a few), so one shared function would fall back to
    eager after a handful of weight shapes."""
    if key not in _FUSED:
        import types

        code = fused_math.__code__.replace(co_name=f"fused_math_{len(_FUSED)}")
        fn = types.FunctionType(code, fused_math.__globals__, code.co_name)
        _FUSED[key] = torch.compile(
            fn, dynamic=False, fullgraph=True, options={"coordinate_descent_tuning": True}
        )
    return _FUSED[key]


@torch.library.custom_op("kiln::fused_gemv", mutates_args=())
def fused_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    pre_quant_scale: torch.Tensor | None,
    inv_input_scale: torch.Tensor | None,
    kind: str,
) -> torch.Tensor:
    """``fused_math`` compiled by Inductor on CUDA for this weight's shape (the engine's own compile would
    fold it into its graph with its own settings: opaque here, it keeps the coordinate-descent-tuned
    reduction); eager elsewhere (the tests check the math)."""
    if not x.is_cuda:
        return fused_math(x, weight, scale, pre_quant_scale, inv_input_scale, kind)
    key = (
        kind,
        tuple(weight.shape),
        tuple(scale.shape),
        tuple(scale.stride()),
        x.dtype,
        pre_quant_scale is not None,
        x.device.index,
    )
    return _fused_fn(key)(x, weight, scale, pre_quant_scale, inv_input_scale, kind)


@fused_gemv.register_fake
def _(x, weight, scale, pre_quant_scale, inv_input_scale, kind):
    return x.new_empty(1, weight.shape[0] * (2 if kind == "int4" else 1))
