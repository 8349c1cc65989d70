"""kiln torch engine under full load on one CUDA GPU: the Llama-3.1-8B shape at ISL/OSL 128/128 and
1000/1000, concurrency 64..512, FP8 and bf16 (run by hand; not a test).

RANDOM WEIGHTS: a LlamaForCausalLM of the Llama-3.1-8B shape (hidden 4096, 32 layers, 32/8 heads, ffn
14336, vocab 128256, untied) is built on the device, written as the TensorRT-LLM checkpoints ModelOpt
exports (bf16; FP8 per-tensor with scales measured on the same model, lm_head bf16; ``--fp8-kv`` adds the
FP8 KV cache) and compiled once per precision with ``TorchBackend`` for a cuda Target whose limits are
raised for the run (``LIMITS``). Each scenario then loads the engine with its own ``max_batch_size`` /
``max_seq_len`` (the KV cache is allocated from them), as a target built for that load would be.

Per scenario (like ``trtllm-bench``'s max-throughput run): ``engine.generate`` of ``requests x C``
random prompts at concurrency C after a warm-up, end-to-end output tokens/s, TTFT and ITL p50/p99 (from
each request's token times), peak GPU memory. Batch-1 decode in the same run. ``--profile C``: a kernel
table (``torch.profiler``) of one generate at concurrency C with the share of wall time the GPU was busy
and the prefill/decode split, to say where a step's time goes.

    python bench/engine_throughput_gpu.py --out $OUT --budget-s 480
    python bench/engine_throughput_gpu.py --tiny --out /tmp/tp        # logic check on CPU, tiny shape
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_families_gpu import SHAPES, read_bandwidth, work_root  # noqa: E402
from bench.engine_gpu import Run, write_checkpoint  # noqa: E402
from kiln.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from kiln.engine.torch import TorchBackend  # noqa: E402
from kiln.profiles import Target  # noqa: E402

LIMITS = {"max_batch_size": 512, "max_input_len": 1024, "max_seq_len": 2048, "max_num_tokens": 8192}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def build(tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = TINY if tiny else SHAPES["llama3.1-8b"]["config"]
    config = LlamaConfig(**kwargs, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of 8B parameters
    try:
        with torch.device("cpu" if tiny else "cuda"), torch.no_grad():
            return LlamaForCausalLM(config).to(torch.bfloat16).eval()
    finally:
        torch.set_default_dtype(default)


def target(tiny: bool, limits: dict) -> Target:
    if tiny:
        return Target(name="bench-cpu", backend="torch", device="cpu", dtype="bfloat16", limits=limits)
    major, minor = torch.cuda.get_device_capability()
    gpu = next((g for g in ("h200", "h100", "b200") if g in torch.cuda.get_device_name().lower()), None)
    return Target(
        name="bench-throughput-cuda",
        backend="torch",
        device="cuda",
        gpu=gpu,
        sm=f"sm{major}{minor}",
        dtype="bfloat16",
        limits=limits,
        work_pool="bench",
    )


def add_fp8_kv(checkpoint: Path, model) -> None:
    """ModelOpt's FP8 KV export: ``kv_cache_quant_algo: FP8`` and a per-layer K/V scale (amax / 448 of the
    layer's K and V on a calibration batch; here one random batch)."""
    from safetensors.torch import load_file, save_file

    cfg = model.config
    amax: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def hook(_m, _args, out, i=i):
            value = out.detach().abs().amax().float()
            amax[i] = torch.maximum(amax.get(i, value), value)

        hooks += [
            layer.self_attn.k_proj.register_forward_hook(hook),
            layer.self_attn.v_proj.register_forward_hook(hook),
        ]
    with torch.inference_mode():
        model(torch.randint(0, cfg.vocab_size, (2, 128), device=model.device))
    for h in hooks:
        h.remove()
    tensors = load_file(checkpoint / "rank0.safetensors")
    for i in range(cfg.num_hidden_layers):
        tensors[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"] = (
            (amax[i] / 448.0).reshape(1).cpu()
        )
    save_file(tensors, checkpoint / "rank0.safetensors")
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization"]["kv_cache_quant_algo"] = "FP8"
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))


SAMPLED = {"temperature": 0.8, "top_p": 0.95}


def prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def prefill_check(engine, vocab: int, isl: int) -> dict:
    """Admissions of 1 and of 8 prompts: the first prefills compile the fused elementwise steps on CUDA
    (``kiln.engine.torch.fused``); their cost is recorded apart from the measured runs."""
    t0 = time.perf_counter()
    for n in (1, min(8, engine.max_batch_size)):
        engine.generate(
            [GenerationRequest(p, SamplingParams(max_new_tokens=2)) for p in prompts(vocab, n, isl, 9)],
            concurrency=n,
        )
    return {"fused": engine.device.type == "cuda", "first_s": round(time.perf_counter() - t0, 2)}


def load(engine_dir: Path, batch: int, seq: int):
    """The engine loaded with a KV cache for ``batch`` x ``seq`` (its manifest's limits set to them)."""
    path = engine_dir / "kiln-engine.json"
    manifest = json.loads(path.read_text())
    manifest["limits"].update(
        max_batch_size=batch, max_seq_len=seq, max_input_len=min(seq - 1, LIMITS["max_input_len"])
    )
    path.write_text(json.dumps(manifest, indent=2))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return TorchBackend().load(engine_dir)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def throughput(
    engine, conc: int, n_requests: int, isl: int, osl: int, vocab: int, sampled: bool = False
) -> dict:
    """``sampled``: every request samples (temperature 0.8, top-p 0.95, its own seed) instead of greedy."""
    requests = [
        GenerationRequest(
            p,
            SamplingParams(max_new_tokens=osl, **SAMPLED, seed=i)
            if sampled
            else SamplingParams(max_new_tokens=osl),
        )
        for i, p in enumerate(prompts(vocab, n_requests, isl, 3))
    ]
    warm = requests[: min(len(requests), conc)]
    t0 = time.perf_counter()
    engine.generate(
        [GenerationRequest(r.prompt_token_ids, SamplingParams(max_new_tokens=min(osl, 64))) for r in warm],
        concurrency=conc,
    )  # captures the decode graphs of every batch bucket the run touches
    warm_s = time.perf_counter() - t0
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = engine.generate(requests, concurrency=conc)
    wall = time.perf_counter() - t0
    total = sum(len(r.token_ids) for r in res)
    ttft = [r.ttft_s * 1e3 for r in res]
    itl = [1e3 * (b - a) for r in res for a, b in zip(r.token_times_s, r.token_times_s[1:], strict=False)]
    out = {
        "concurrency": conc,
        "requests": n_requests,
        "isl": isl,
        "osl": osl,
        "sampled": sampled,
        "output_tok_s": round(total / wall, 1),
        "wall_s": round(wall, 3),
        "warmup_s": round(warm_s, 2),
        "ttft_ms_p50": round(_pct(ttft, 0.5), 2),
        "ttft_ms_p99": round(_pct(ttft, 0.99), 2),
        "itl_ms_p50": round(_pct(itl, 0.5), 3),
        "itl_ms_p99": round(_pct(itl, 0.99), 3),
    }
    if engine.device.type == "cuda":
        out["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return out


def batch1(engine, vocab: int, new_tokens: int = 128) -> dict:
    request = [GenerationRequest(prompts(vocab, 1, 32, 1)[0], SamplingParams(max_new_tokens=new_tokens))]
    engine.generate(request)
    rates = []
    for _ in range(3):
        r = engine.generate(request)[0]
        rates.append((len(r.token_ids) - 1) / (r.token_times_s[-1] - r.token_times_s[0]))
    return {"tok_s": round(statistics.median(rates), 1), "tok_s_all": [round(x, 1) for x in rates]}


def profile(engine, conc: int, isl: int, osl: int, vocab: int, out_dir: Path, name: str) -> dict:
    """One generate of ``conc`` requests under torch.profiler: GPU-busy share of the wall time, the time in
    prefill vs decode (host ranges), and the top kernels by GPU time."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    requests = [
        GenerationRequest(p, SamplingParams(max_new_tokens=osl)) for p in prompts(vocab, conc, isl, 5)
    ]
    engine.generate(requests, concurrency=conc)
    model = engine.model
    prefill, decode = model.prefill, engine._decode

    def timed_prefill(*a, **k):
        with record_function("kiln.prefill"):
            return prefill(*a, **k)

    def timed_decode(*a, **k):
        with record_function("kiln.decode"):
            return decode(*a, **k)

    model.prefill, engine._decode = timed_prefill, timed_decode
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    try:
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            engine.generate(requests, concurrency=conc)
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        model.prefill, engine._decode = prefill, decode
    events = prof.key_averages()
    kernels = [
        e
        for e in events
        if getattr(e, "device_type", None) is not None
        and str(e.device_type).endswith("CUDA")
        and e.self_device_time_total > 0
        and not e.key.startswith("kiln.")  # the ranges: their device time is their kernels'
    ]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    phases = [e for e in events if e.key in ("kiln.prefill", "kiln.decode")]
    ranges = {e.key: max(e.device_time_total, e.self_device_time_total) / 1e3 for e in phases}
    calls = {e.key: e.count for e in phases}
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total" if kernels else "self_cpu_time_total", row_limit=40
    )
    (out_dir / f"{name}.txt").write_text(table)
    return {
        "concurrency": conc,
        "isl": isl,
        "osl": osl,
        "wall_ms_profiled": round(wall * 1e3, 1),
        "gpu_kernel_ms": round(gpu_us / 1e3, 1),
        "gpu_busy_pct": round(100 * gpu_us / 1e3 / (wall * 1e3), 1),
        "gpu_ms_per_phase": {k: round(v, 1) for k, v in ranges.items()},
        "calls": calls,
        "top_kernels": [
            {
                "name": e.key[:120],
                "ms": round(e.self_device_time_total / 1e3, 2),
                "count": e.count,
                "pct": round(100 * e.self_device_time_total / max(gpu_us, 1), 1),
            }
            for e in top
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--precisions", default="fp8,bf16")
    parser.add_argument("--fp8-kv", action="store_true", help="FP8 engine with the FP8 KV cache")
    parser.add_argument(
        "--scenarios", default="128/128:64,128,256,512;1000/1000:64,128,256", help="ISL/OSL:concurrencies;..."
    )
    parser.add_argument("--requests-per-slot", type=float, default=2.0, help="requests = this x concurrency")
    parser.add_argument("--long-requests-per-slot", type=float, default=1.0, help="the same for OSL >= 512")
    parser.add_argument(
        "--skip", default="", help="PRECISION:ISL/OSL@C,... not to run (e.g. what cannot fit)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="concurrency of a profiled generate at the first scenario's ISL/OSL (0: none)",
    )
    parser.add_argument(
        "--packed-mask-prefill",
        action="store_true",
        help="the earlier prefill: every packed pass attends through one [T, T] mask (before/after)",
    )
    parser.add_argument(
        "--sampled",
        type=int,
        default=0,
        help="concurrency of a second run at the first scenario's ISL/OSL with sampled requests",
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--name", default="engine_throughput_gpu")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --tiny for the CPU logic check")
    if args.packed_mask_prefill:
        from kiln.engine.torch import model as engine_model

        engine_model.Padded.pays = staticmethod(lambda lengths: False)
    run = Run(args.out, args.budget_s, name=f"{args.name}.json")
    r = run.results
    r["env"] = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "weights": "random (Llama-3.1-8B shape)" if not args.tiny else "random (tiny)",
        "limits_compiled": LIMITS,
        "fp8_kv": args.fp8_kv,
        "packed_mask_prefill": args.packed_mask_prefill,
    }
    if not args.tiny:
        r["read_bandwidth"] = run.stage("read_bandwidth", read_bandwidth)
    scenarios = []
    for part in args.scenarios.split(";"):
        lens, concs = part.split(":")
        isl, osl = (int(x) for x in lens.split("/"))
        scenarios += [(isl, osl, int(c)) for c in concs.split(",")]
    if args.tiny:
        scenarios = [(16, 16, c) for c in (2, 4)]
    limits = (
        dict(LIMITS)
        if not args.tiny
        else {"max_batch_size": 8, "max_input_len": 64, "max_seq_len": 128, "max_num_tokens": 256}
    )
    tgt = target(args.tiny, limits)
    model = run.stage("build", build, args.tiny)
    vocab = model.config.vocab_size
    root = work_root(40 << 30) if not args.tiny else Path(tempfile.mkdtemp(prefix="kiln-tp-"))
    checkpoints = {}
    for precision in args.precisions.split(","):

        def write(precision=precision, hf=model):
            path = write_checkpoint(hf, root / f"ckpt-{precision}", fp8=precision == "fp8")
            if precision == "fp8" and args.fp8_kv:
                add_fp8_kv(path, hf)
            return path

        checkpoints[precision] = run.stage(f"checkpoint_{precision}", write)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    r["results"] = {}
    for precision, checkpoint in checkpoints.items():
        if checkpoint is None:
            continue
        engine_dir = run.stage(
            f"compile_{precision}",
            TorchBackend().compile,
            checkpoint,
            tgt,
            root / f"engine-{precision}",
            {"model_sha": "random"},
            precompile=False,
        )
        shutil.rmtree(checkpoint, ignore_errors=True)
        if engine_dir is None:
            continue
        out = r["results"].setdefault(
            precision,
            {"program": json.loads((engine_dir / "kiln-engine.json").read_text())["program"].get("compile")},
        )
        engine = run.stage(f"load_{precision}_b1", load, engine_dir, 1, 512)
        if engine is not None:
            out["batch1"] = run.stage(f"batch1_{precision}", batch1, engine, vocab)
            engine.close()
            del engine
        loaded = None
        for isl, osl, conc in sorted(scenarios, key=lambda s: (s[0] + s[1], -s[2])):
            seq = isl + osl
            if loaded is None or loaded[0] != (conc, seq):
                if loaded is not None:
                    loaded[1].close()
                engine = run.stage(f"load_{precision}_{conc}x{seq}", load, engine_dir, conc, seq)
                if engine is not None and f"prefill_check_{precision}" not in out:
                    out[f"prefill_check_{precision}"] = run.stage(
                        f"prefill_check_{precision}", prefill_check, engine, vocab, isl
                    )
                loaded = None if engine is None else ((conc, seq), engine)
            if loaded is None:
                continue
            if f"{precision}:{isl}/{osl}@{conc}" in args.skip.split(","):
                continue
            per_slot = args.long_requests_per_slot if osl >= 512 else args.requests_per_slot
            key = f"{isl}/{osl}@{conc}"
            sampled_too = args.sampled == conc and (isl, osl) == scenarios[0][:2]
            for sampled in (False, True) if sampled_too else (False,):
                mode = "_sampled" if sampled else ""
                out[key + mode.replace("_", ":")] = run.stage(
                    f"{precision}_{key}{mode}",
                    throughput,
                    loaded[1],
                    conc,
                    max(1, int(per_slot * conc)),
                    isl,
                    osl,
                    vocab,
                    sampled,
                )
            if args.profile == conc and (isl, osl) == scenarios[0][:2]:
                out[f"profile@{conc}"] = run.stage(
                    f"profile_{precision}_{conc}",
                    profile,
                    loaded[1],
                    conc,
                    isl,
                    osl,
                    vocab,
                    args.out,
                    f"{args.name}_profile_{precision}_{conc}",
                )
            run.save()
        if loaded is not None:
            loaded[1].close()
        shutil.rmtree(engine_dir, ignore_errors=True)
    r["total_s"] = round(time.perf_counter() - run.start, 1)
    run.save()
    write_markdown(r, args.out / f"{args.name}.md")
    print((args.out / f"{args.name}.md").read_text(), flush=True)


def write_markdown(r: dict, path: Path) -> None:
    lines = [
        f"# kiln torch engine under load ({r['env']['gpu']}, torch {r['env']['torch']}, "
        f"{r['env']['weights']})",
        "",
        f"Command: `{r['env']['command']}`",
        "",
        "| precision | ISL/OSL | concurrency | requests | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 "
        "ms | peak GPU GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for precision, res in r.get("results", {}).items():
        for v in res.values():
            if not isinstance(v, dict) or "output_tok_s" not in v:
                continue
            mode = " sampled" if v.get("sampled") else ""
            lines.append(
                f"| {precision}{mode} | {v['isl']}/{v['osl']} | {v['concurrency']} | {v['requests']} | "
                f"{v['output_tok_s']:,.0f} | {v['ttft_ms_p50']} / {v['ttft_ms_p99']} | "
                f"{v['itl_ms_p50']} / {v['itl_ms_p99']} | {v.get('peak_gpu_mem_gb', '')} |"
            )
    lines += ["", "Batch-1 decode (32-token prompt, 128 new tokens, median of 3):", ""]
    for precision, res in r.get("results", {}).items():
        check = res.get(f"prefill_check_{precision}")
        if check:
            lines.append(
                f"- {precision}: fused prefill steps: {check['fused']} (first admissions, compiling them: "
                f"{check['first_s']} s)"
            )
        if res.get("batch1"):
            lines.append(f"- {precision}: {res['batch1']['tok_s']} tok/s")
    for precision, res in r.get("results", {}).items():
        for key, v in res.items():
            if key.startswith("profile@") and v:
                lines += [
                    "",
                    f"Profile, {precision}, {v['isl']}/{v['osl']} at concurrency {v['concurrency']}: "
                    f"wall {v['wall_ms_profiled']} ms, GPU kernels {v['gpu_kernel_ms']} ms "
                    f"({v['gpu_busy_pct']}% busy); GPU ms per phase {v.get('gpu_ms_per_phase')} "
                    f"calls {v['calls']}",
                    "",
                    "| kernel | ms | calls | % of GPU time |",
                    "| --- | --- | --- | --- |",
                ]
                lines += [
                    f"| `{k['name'][:90]}` | {k['ms']} | {k['count']} | {k['pct']} |"
                    for k in v["top_kernels"][:15]
                ]
    if r.get("errors"):
        lines += ["", "Errors / skipped: " + "; ".join(f"{k}: {v[:200]}" for k, v in r["errors"].items())]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
