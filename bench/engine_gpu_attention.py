"""Launch shapes of the decode attention kernel on one CUDA GPU (run by hand; not a test): issue 23.

At concurrency 256 the Llama-3.1-8B step spends a third of its time in ``_decode_attention_kernel``
(bench/results/engine_throughput_gpu), which reads the bf16 cache at about 2.6 TB/s of the ~4.4 TB/s
the card reads. This races ``(BLOCK_N, num_warps, num_stages)`` per cache dtype, batch and attended length
on the 8B shape (32 query / 8 KV heads, head 128; random q/k/v), every row attending its whole length,
each launch timed as a CUDA graph replay, and checks each launch's output against the default's.
The winners go into ``kiln.engine.torch.kernels.attention_launch``.

    python bench/engine_gpu_attention.py --out $OUT [--budget-s 120]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.engine.torch import kernels  # noqa: E402

HEADS, KV_HEADS, HEAD = 32, 8, 128
LAUNCHES = [
    (n, w, s) for n in (32, 64, 128) for w, s in ((2, 1), (2, 2), (4, 1), (4, 2), (4, 3), (8, 2), (8, 3))
]
CASES = list(itertools.product((0, 1), (1, 64, 256), (256, 1152)))  # (fp8 cache, batch, attended length)


def case_inputs(fp8: bool, batch: int, length: int) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(batch * 10 + length)
    dev = torch.device("cuda")
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD, generator=g, device=dev).to(torch.bfloat16)
    positions = torch.full((batch,), length - 1, dtype=torch.long, device=dev)
    angles = torch.randn(length, HEAD // 2, generator=g, device=dev)
    angles = torch.cat((angles, angles), -1)
    store = torch.float8_e4m3fn if fp8 else torch.bfloat16
    kc = torch.randn(batch, KV_HEADS, length, HEAD, generator=g, device=dev).to(store)
    vc = torch.randn(batch, KV_HEADS, length, HEAD, generator=g, device=dev).to(store)
    scales = (torch.tensor(0.05, device=dev), torch.tensor(0.04, device=dev)) if fp8 else (None, None)
    return qkv, positions, angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16), kc, vc, *scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--budget-s", type=float, default=120)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows, skipped = [], []
    for fp8, batch, length in CASES:
        if time.monotonic() - start > args.budget_s:
            skipped.append(f"fp8={fp8} batch={batch} length={length}: budget spent")
            continue
        inputs = case_inputs(bool(fp8), batch, length)
        reference = kernels.decode_attention(*inputs, HEADS, KV_HEADS, length, list(kernels.ATTENTION_LAUNCH))
        kv_bytes = 2 * batch * KV_HEADS * length * HEAD * (1 if fp8 else 2)
        for launch in LAUNCHES:

            def step(launch=launch, inputs=inputs, length=length):
                return kernels.decode_attention(*inputs, HEADS, KV_HEADS, length, list(launch))

            try:
                err = (step().float() - reference.float()).abs().max().item()
                ms = kernels.graph_ms(step, iters=30)
            # a launch shape this GPU cannot run (shared memory): recorded, not fatal
            except Exception as exc:
                rows.append(
                    {
                        "fp8": fp8,
                        "batch": batch,
                        "length": length,
                        "launch": launch,
                        "error": f"{type(exc).__name__}: {str(exc)[:160]}",
                    }
                )
                continue
            rows.append(
                {
                    "fp8": fp8,
                    "batch": batch,
                    "length": length,
                    "launch": launch,
                    "us": round(ms * 1e3, 2),
                    "tb_s": round(kv_bytes / ms / 1e9, 3),
                    "max_abs_diff_vs_default": err,
                }
            )
        inputs = reference = None  # the next case's cache may be large
        torch.cuda.empty_cache()
    best = {}
    for row in rows:
        if "us" in row:
            key = f"fp8={row['fp8']} batch={row['batch']} length={row['length']}"
            if key not in best or row["us"] < best[key]["us"]:
                best[key] = row
    default = {
        f"fp8={r['fp8']} batch={r['batch']} length={r['length']}": r
        for r in rows
        if tuple(r["launch"]) == kernels.ATTENTION_LAUNCH and "us" in r
    }
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head": HEAD},
        "default_launch": kernels.ATTENTION_LAUNCH,
        "rows": rows,
        "best": best,
        "skipped": skipped,
        "command": "python bench/engine_gpu_attention.py " + " ".join(sys.argv[1:]),
    }
    (args.out / "engine_gpu_attention.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# decode attention launch shapes ({result['gpu']}, torch {result['torch']}, triton "
        f"{result['triton']})",
        "",
        f"Command: `{result['command']}`; random q/k/v, Llama-3.1-8B heads (32/8, head 128), every row "
        "attending its whole length; KV bytes read / kernel time.",
        "",
        "| cache | batch | length | default us (TB/s) | best launch (BLOCK_N, warps, stages) | best us "
        "(TB/s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, row in best.items():
        d = default.get(key, {})
        lines.append(
            f"| {'fp8' if row['fp8'] else 'bf16'} | {row['batch']} | {row['length']} | "
            f"{d.get('us')} ({d.get('tb_s')}) | {tuple(row['launch'])} | {row['us']} ({row['tb_s']}) |"
        )
    (args.out / "engine_gpu_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
