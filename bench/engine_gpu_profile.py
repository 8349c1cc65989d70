"""Where the torch engine's decode step spends its time on one CUDA GPU (run by hand; not a test).

Same model and checkpoints as ``bench/engine_gpu.py`` (random-weight Llama-3.2-1B shape). For each
compiled-program variant it records the batch-1 decode rate, the step time of a 64-request batch at
attended length 256, and (first variant) a kernel table from ``torch.profiler`` of both steps, with the
GEMM share, so a program choice in ``kiln.engine.torch.backend.default_program`` rests on numbers.

    python bench/engine_gpu_profile.py --out $OUT      # writes engine_gpu_profile.json + *.txt kernel tables
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_gpu import (  # noqa: E402
    Run,
    build_hf,
    concurrency,
    copy_bandwidth,
    engine_batch1,
    target,
    ttft,
    weight_read_bytes,
    write_checkpoint,
)

from kiln.engine.torch import TorchBackend  # noqa: E402

VARIANTS = {
    "inductor_dynamic": {"compile": "inductor", "cuda_graphs": True},
    "inductor_dynamic_cdt": {
        "compile": "inductor",
        "cuda_graphs": True,
        "inductor_options": {"coordinate_descent_tuning": True},
    },
    "inductor_static_cdt": {
        "compile": "inductor",
        "cuda_graphs": True,
        "dynamic": False,
        "inductor_options": {"coordinate_descent_tuning": True},
    },
}
GEMM_HINTS = ("gemm", "gemv", "sm90_", "cutlass", "cublas", "xmma", "splitk", "nvjet")


def step_ms(engine, batch: int, length: int, iters: int = 50) -> float:
    """Replay time of one decode step for ``batch`` requests attending ``length`` cache positions."""
    g = torch.Generator().manual_seed(7)
    engine._inputs[0, :batch] = torch.randint(0, engine.model.spec.vocab_size, (batch,), generator=g).to(
        engine.device
    )
    engine._inputs[1, :batch] = torch.randint(length // 2, length, (batch,), generator=g).to(engine.device)
    with torch.inference_mode():
        engine._decode(batch, length)
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            engine._decode(batch, length)
        end.record()
        torch.cuda.synchronize()
    return begin.elapsed_time(end) / iters


def kernel_table(engine, batch: int, length: int, path: Path) -> dict:
    """Per-kernel CUDA time of 10 replayed steps, top rows written to ``path``; GEMM share returned."""
    from torch.profiler import ProfilerActivity, profile

    step_ms(engine, batch, length, iters=3)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine._decode(batch, length)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append((e.key, e.count / 10, t / 10))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    gemm = sum(r[2] for r in rows if any(h in r[0].lower() for h in GEMM_HINTS))
    lines = [
        f"batch {batch}, length {length}: {total:.1f} us of kernels per step, GEMM-like {gemm:.1f} us",
        f"{'us/step':>9} {'calls':>6}  kernel",
    ]
    lines += [f"{t:9.1f} {c:6.0f}  {k[:150]}" for k, c, t in rows[:40]]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:25]), flush=True)
    return {
        "kernel_us_per_step": round(total, 1),
        "gemm_us_per_step": round(gemm, 1),
        "kernels_per_step": round(sum(r[1] for r in rows)),
        "table": path.name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--budget-s", type=float, default=520)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--fp8-variants", default="inductor_dynamic,inductor_dynamic_cdt")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64  # static variants compile once per (batch, length) bucket
    run = Run(args.out, args.budget_s, "engine_gpu_profile.json")
    run.results["env"] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(sys.argv),
    }
    r = run.results
    bw = run.stage("copy_bandwidth", copy_bandwidth)
    r["copy_bandwidth_Bps"] = bw
    model = run.stage("build_hf", build_hf)
    work = Path(tempfile.mkdtemp(prefix="kiln-profile-"))
    ck16 = run.stage("checkpoint_bf16", write_checkpoint, model, work / "ck-bf16", False)
    ck8 = run.stage("checkpoint_fp8", write_checkpoint, model, work / "ck-fp8", True)
    del model
    torch.cuda.empty_cache()
    backend = TorchBackend()
    dirs = {
        "bf16": run.stage(
            "compile_bf16", backend.compile, ck16, target(), work / "e16", {}, precompile=False
        ),
        "fp8": run.stage("compile_fp8", backend.compile, ck8, target(), work / "e8", {}, precompile=False),
    }
    plan = [("bf16", v) for v in args.variants.split(",")] + [
        ("fp8", v) for v in args.fp8_variants.split(",")
    ]
    r["variants"] = {}
    for dtype, variant in plan:
        key = f"{dtype}/{variant}"
        engine = run.stage(f"load_{key}", backend.load, dirs[dtype], program=VARIANTS[variant])
        if engine is None:
            continue
        out: dict = {}
        t0 = time.perf_counter()
        out["batch1"] = run.stage(f"batch1_{key}", engine_batch1, engine, 128, weight_read_bytes(engine), bw)
        out["batch1_first_call_s"] = round(time.perf_counter() - t0, 1)
        for batch, length in ((1, 256), (64, 256), (64, 1024)):
            out[f"step_ms_b{batch}_l{length}"] = run.stage(
                f"step_{key}_{batch}_{length}", step_ms, engine, batch, length
            )
        if variant == "inductor_dynamic":
            for batch in (1, 64):
                out[f"kernels_b{batch}"] = run.stage(
                    f"profile_{key}_{batch}",
                    kernel_table,
                    engine,
                    batch,
                    256,
                    args.out / f"kernels_{dtype}_b{batch}.txt",
                )
            if dtype == "bf16":
                out["ttft_512"] = run.stage("ttft_512", ttft, engine, 512)
                out["concurrency"] = [
                    run.stage(f"concurrency_{c}", concurrency, engine, c, 128) for c in (1, 8, 32, 64)
                ]
        r["variants"][key] = out
        run.save()
        print(
            key,
            json.dumps({k: v for k, v in out.items() if k != "concurrency"}, default=str)[:600],
            flush=True,
        )
        engine.close()
        torch._dynamo.reset()
    r["total_s"] = round(time.perf_counter() - run.start, 1)
    run.save()


if __name__ == "__main__":
    main()
