"""kiln's Triton decode kernels on one CUDA GPU: exactness against the torch path, and speed (run by hand).

- ``decode_attention`` (RoPE + K/V cache write + split-KV GQA attention) against the torch path it
  replaces (``model.py``: RoPE in float32, ``index_put`` cache writes, SDPA over the masked cache), bf16
  and FP8 cache, batch 1 and 64: the cache bytes written must be identical, the outputs within bf16
  rounding; and the time of both, each captured in a CUDA graph.
- ``gemv`` (batch-1 ``x @ W^T``; FP8 with the activation quantization fused) against cuBLAS
  (``F.linear`` / ``torch._scaled_mm``) on the Llama-3.2-1B shapes: a sweep of block shapes, each timed
  as a chain over 16 distinct weights (as one decode step reads them, so nothing stays in L2), and the
  whole step's GEMV chain with the best block per shape vs cuBLAS's chain.

    python bench/engine_gpu_kernels.py --out $OUT      # writes engine_gpu_kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_gpu import Run, copy_bandwidth  # noqa: E402

from kiln.engine.torch import kernels  # noqa: E402
from kiln.engine.torch.kernels import graph_ms as _graph_ms  # noqa: E402
from tests.fixtures.kernel_checks import torch_path_qkv  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD, FFN, VOCAB, LAYERS = 2048, 32, 8, 64, 8192, 128256, 16
SHAPES = {
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD, HIDDEN),
    "dense": (HIDDEN, HIDDEN),
    "gate_up": (2 * FFN, HIDDEN),
    "proj": (HIDDEN, FFN),
}
CONFIGS = [(n, k, w) for n, k, w in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8))]


def _attention_case(batch: int, length: int, fp8: bool, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dtype, dev = torch.bfloat16, "cuda"
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD, device=dev, dtype=dtype, generator=g)
    positions = torch.randint(length // 2, length, (batch,), device=dev, generator=g)
    angles = torch.randn(4096, HEAD // 2, device=dev, generator=g)
    angles = torch.cat((angles, angles), -1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    store = torch.float8_e4m3fn if fp8 else dtype
    shape = (64, KV_HEADS, 2048, HEAD)
    kc = (torch.randn(shape, device=dev, generator=g) * (20 if fp8 else 1)).to(store)
    vc = (torch.randn(shape, device=dev, generator=g) * (20 if fp8 else 1)).to(store)
    scales = (torch.tensor(0.05, device=dev), torch.tensor(0.04, device=dev)) if fp8 else (None, None)
    return qkv, positions, cos, sin, kc, vc, scales


def _attention_torch(qkv, positions, cos, sin, kc, vc, scales, length):
    """The torch path of ``DecoderLayer.decode``: RoPE, the cache write, SDPA over the masked cache."""
    b, d = qkv.shape[0], HEAD
    q, k, v = torch_path_qkv(qkv, positions, cos, sin, HEADS, KV_HEADS)
    ks, vs = scales
    if ks is not None:
        k = (k.float() / ks).clamp(-448, 448).to(kc.dtype)
        v = (v.float() / vs).clamp(-448, 448).to(vc.dtype)
    rows = torch.arange(b, device=qkv.device)
    kc[rows, :, positions] = k
    vc[rows, :, positions] = v
    keys, values = kc[:b, :, :length], vc[:b, :, :length]
    if ks is not None:
        keys, values = (keys.to(qkv.dtype) * ks).to(qkv.dtype), (values.to(qkv.dtype) * vs).to(qkv.dtype)
    mask = torch.arange(length, device=qkv.device)[None, :] <= positions[:, None]
    out = F.scaled_dot_product_attention(
        q.view(b, KV_HEADS, HEADS // KV_HEADS, d), keys, values, attn_mask=mask[:, None, None, :]
    )
    return out.reshape(b, HEADS * d)


def attention(batch: int, length: int, fp8: bool) -> dict:
    qkv, positions, cos, sin, kc, vc, scales = _attention_case(batch, length, fp8)
    kc2, vc2 = kc.clone(), vc.clone()
    out = kernels.decode_attention(qkv, positions, cos, sin, kc, vc, *scales, HEADS, KV_HEADS, length)
    ref = _attention_torch(qkv, positions, cos, sin, kc2, vc2, scales, length)
    result = {
        "batch": batch,
        "length": length,
        "fp8_kv": fp8,
        "splits": kernels.attention_splits(batch, KV_HEADS, length, kernels._sm_count(0))[0],
        "k_cache_identical": bool(torch.equal(kc.view(torch.uint8), kc2.view(torch.uint8))),
        "v_cache_identical": bool(torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8))),
        "max_abs_diff": float((out.float() - ref.float()).abs().max()),
        "ref_max_abs": float(ref.float().abs().max()),
    }
    result["kernel_us"] = round(
        1e3
        * _graph_ms(
            lambda: kernels.decode_attention(
                qkv, positions, cos, sin, kc, vc, *scales, HEADS, KV_HEADS, length
            ),
            iters=50,
        ),
        2,
    )
    result["torch_path_us"] = round(
        1e3
        * _graph_ms(lambda: _attention_torch(qkv, positions, cos, sin, kc2, vc2, scales, length), iters=50),
        2,
    )
    return result


def _weights(n: int, k: int, fp8: bool, count: int = LAYERS) -> list[torch.Tensor]:
    out = []
    for _ in range(count):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        out.append((w.float() / (w.float().abs().amax() / 448)).to(torch.float8_e4m3fn) if fp8 else w)
    return out


def gemv_shape(name: str, n: int, k: int, fp8: bool, configs) -> dict:
    weights = _weights(n, k, fp8, 1 if name == "lm_head" else LAYERS)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    inv, ws = torch.tensor(8.0, device="cuda"), torch.tensor(1e-3, device="cuda")
    xs, out_scale = 1 / inv, (1 / inv) * ws
    args = (inv, out_scale) if fp8 else (None, None)
    # exactness on the first weight
    y = kernels.gemv(x, weights[0], None, *args)
    if fp8:
        xq = (x.float() * inv).clamp(-448, 448).to(torch.float8_e4m3fn)
        ref = torch._scaled_mm(xq, weights[0].t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)
    else:
        ref = F.linear(x, weights[0])
    err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())

    def cublas() -> None:
        for w in weights:
            if fp8:
                torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)
            else:
                F.linear(x, w)

    if fp8:
        xq = (x.float() * inv).clamp(-448, 448).to(torch.float8_e4m3fn)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    base = _graph_ms(cublas)
    sweep = {}
    for cfg in configs:
        try:
            sweep[cfg] = _graph_ms(
                lambda cfg=cfg: [kernels.gemv(x, w, None, *args, list(cfg)) for w in weights]
            )
        except Exception as exc:  # a block shape the compiler refuses (registers) is just left out
            sweep[cfg] = None
            print(name, cfg, type(exc).__name__, str(exc)[:200], flush=True)
    ok = {c: t for c, t in sweep.items() if t}
    best = min(ok, key=ok.get)
    per = len(weights)
    return {
        "n": n,
        "k": k,
        "fp8": fp8,
        "weights": per,
        "rel_err_vs_cublas": err,
        "cublas_us_each": round(1e3 * base / per, 2),
        "cublas_TBps": round(nbytes / base / 1e9, 3),
        "best": list(best),
        "best_us_each": round(1e3 * ok[best] / per, 2),
        "best_TBps": round(nbytes / ok[best] / 1e9, 3),
        "sweep_us_each": {
            "x".join(map(str, c)): (round(1e3 * t / per, 2) if t else None) for c, t in sweep.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--budget-s", type=float, default=240)
    args = parser.parse_args()
    run = Run(args.out, args.budget_s, "engine_gpu_kernels.json")
    r = run.results
    import triton

    r["env"] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(sys.argv),
    }
    r["copy_bandwidth_Bps"] = run.stage("copy_bandwidth", copy_bandwidth)
    r["attention"] = [
        run.stage(f"attention_b{b}_l{n}_{'fp8' if f else 'bf16'}", attention, b, n, f)
        for b, n, f in (
            (1, 512, False),
            (1, 2048, False),
            (64, 1024, False),
            (1, 512, True),
            (64, 1024, True),
        )
    ]
    print(json.dumps(r["attention"], indent=1), flush=True)
    r["gemv"] = {}
    for fp8 in (False, True):
        shapes = {**SHAPES, **({} if fp8 else {"lm_head": (VOCAB, HIDDEN)})}
        for name, (n, k) in shapes.items():
            key = f"{'fp8' if fp8 else 'bf16'}/{name}"
            r["gemv"][key] = run.stage(f"gemv_{key}", gemv_shape, name, n, k, fp8, CONFIGS)
            g = r["gemv"][key]
            if g:
                print(key, {k: v for k, v in g.items() if k != "sweep_us_each"}, flush=True)
    for dtype in ("bf16", "fp8"):
        rows = [r["gemv"].get(f"{dtype}/{n}") for n in SHAPES]
        head = r["gemv"].get("bf16/lm_head")
        if all(rows) and head:
            cublas = sum(LAYERS * g["cublas_us_each"] for g in rows) + head["cublas_us_each"]
            best = sum(LAYERS * g["best_us_each"] for g in rows) + min(
                head["best_us_each"], head["cublas_us_each"]
            )
            r[f"chain_{dtype}_us"] = {"cublas": round(cublas, 1), "triton_best": round(best, 1)}
    r["total_s"] = round(time.perf_counter() - run.start, 1)
    run.save()
    print({k: v for k, v in r.items() if k.startswith("chain")}, flush=True)


if __name__ == "__main__":
    main()
