"""kiln torch engine on one CUDA GPU for the newer model families: Llama-3.1-8B, Qwen3-8B and a reduced
Mixtral-8x7B (run by hand; not a test).

Every model is built with RANDOM WEIGHTS on the device from the real transformers config class
(``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ``MixtralForCausalLM``, bf16), saved with ``save_pretrained``
(the HF checkpoint path: ``TorchBackend.compile`` reads an HF dir directly) to /dev/shm when it fits,
compiled for a cuda Target (bf16, max_batch_size 64, max_input_len 512, max_seq_len 1024,
max_num_tokens 8192) and loaded with the built program. The Mixtral is reduced in depth only: 8 of its
32 layers, every per-layer size real (hidden 4096, 8 experts top-2, expert ffn 14336, 32/8 heads,
vocab 32000).

Measures, per shape: batch-1 decode tok/s (warm-up, then the median of a few runs); end-to-end tok/s of
128 requests (128 prompt + 128 new tokens) at concurrency 64; bytes read per decode step against the
read bandwidth measured in the same run (% of roofline); peak GPU memory; the engine's program
(``kiln-engine.json`` "program": Inductor / CUDA graphs / kernels). For the MoE also a one-layer probe:
the engine's batch-1 ``gather`` MoE against three GEMVs per active expert on its weights in place.

    python bench/engine_families_gpu.py --out $OUT --budget-s 520      # on the GPU
    python bench/engine_families_gpu.py --tiny --out /tmp/fam           # logic check on CPU, tiny shapes
    python bench/engine_families_gpu.py --render bench/results/engine_families_gpu_h200.json  # JSON -> .md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_gpu import Run, copy_bandwidth, decode_rate  # noqa: E402
from kiln.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from kiln.engine.torch import TorchBackend  # noqa: E402
from kiln.profiles import Target  # noqa: E402

REF_TOKENS = 32
LIMITS = {"max_batch_size": 64, "max_input_len": 512, "max_seq_len": 1024, "max_num_tokens": 8192}
MIXTRAL_FULL_LAYERS = 32
SHAPES = {
    "llama3.1-8b": {
        "architecture": "LlamaForCausalLM",
        "label": "Llama-3.1-8B shape",
        "config": {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    },
    "qwen3-8b": {
        "architecture": "Qwen3ForCausalLM",
        "label": "Qwen3-8B shape",
        "config": {
            "hidden_size": 4096,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 12288,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
    "mixtral-8x7b-8l": {
        "architecture": "MixtralForCausalLM",
        "label": "Mixtral-8x7B shape, 8 of 32 layers",
        "config": {
            "hidden_size": 4096,
            "num_hidden_layers": 8,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "vocab_size": 32000,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
}
ORDER = ["llama3.1-8b", "mixtral-8x7b-8l", "qwen3-8b"]  # the reference first, then the MoE (new code paths)
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
}


def shape_config(key: str, tiny: bool, mixtral_layers: int) -> dict:
    config = dict(SHAPES[key]["config"])
    if key.startswith("mixtral"):
        config["num_hidden_layers"] = mixtral_layers
    if tiny:
        config.update(TINY)
        if "head_dim" in config:
            config["head_dim"] = 16
    return config


def checkpoint_bytes(config: dict) -> int:
    """bf16 bytes of the model (untied embeddings and lm_head; every expert)."""
    h, layers, vocab, ffn = (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["vocab_size"],
        config["intermediate_size"],
    )
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    experts = config.get("num_local_experts", 1)
    per_layer = (
        h * d * (heads + 2 * kv) + heads * d * h + 3 * h * ffn * experts + (h * experts if experts > 1 else 0)
    )
    return 2 * (2 * vocab * h + layers * per_layer)


def cost_units(config: dict) -> float:
    """A rough time model for one shape: its GB (build, save, convert, hash, load) plus its layers
    (Inductor)."""
    return checkpoint_bytes(config) / 1e9 + config["num_hidden_layers"]


def read_bandwidth() -> dict:
    """Read-only bytes per second: a float32-accumulated sum and an amax over 2 GiB of random bf16 (the
    batch-1 decode limit: weight bytes / this); the median of 20 timed passes after 3 warm-ups each."""

    def passes(x: torch.Tensor, name: str) -> float:
        fn = {"sum": lambda: x.sum(dtype=torch.float32), "amax": x.amax}[name]
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        return x.numel() * x.element_size() / statistics.median(times)

    x = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")
    out = {f"{name}_Bps": passes(x, name) for name in ("sum", "amax")}
    del x
    torch.cuda.empty_cache()
    out["read_Bps"] = max(out["sum_Bps"], out["amax_Bps"])
    return out


def build_and_save(architecture: str, config_kwargs: dict, out_dir: Path, device: str) -> dict:
    """A random-weight HF model built on ``device`` in bf16, written with ``save_pretrained``."""
    import transformers

    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_class(**config_kwargs, architectures=[architecture])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no fp32 copy of 8B parameters
    try:
        with torch.device(device), torch.no_grad():
            model = getattr(transformers, architecture)(config).to(torch.bfloat16).eval()
    finally:
        torch.set_default_dtype(default)
    if device == "cuda":
        torch.cuda.synchronize()
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    # HF's own bf16 logits on a short prompt, to check the engine runs the same model (prefill path)
    ids = prompts(config.vocab_size, 1, REF_TOKENS, 7)[0]
    with torch.inference_mode():
        reference = model(torch.tensor([ids], device=device)).logits[0].float().cpu()
    t0 = time.perf_counter()
    model.save_pretrained(out_dir, max_shard_size="5GB")
    saved = time.perf_counter() - t0
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    files = [p for p in out_dir.iterdir() if p.suffix == ".safetensors"]
    return {
        "reference": (ids, reference),
        "dir": str(out_dir),
        "params": params,
        "build_s": round(built, 2),
        "save_pretrained_s": round(saved, 2),
        "checkpoint_bytes": sum(p.stat().st_size for p in files),
        "shards": len(files),
        "config_json": json.loads((out_dir / "config.json").read_text()),
    }


def target(tiny: bool) -> Target:
    if tiny:
        return Target(name="bench-cpu", backend="torch", device="cpu", dtype="bfloat16", limits=LIMITS)
    major, minor = torch.cuda.get_device_capability()
    gpu = next(
        (g for g in ("h200", "h100", "b200", "a100", "l40s") if g in torch.cuda.get_device_name().lower()),
        None,
    )
    return Target(
        name="bench-families-cuda",
        backend="torch",
        device="cuda",
        gpu=gpu,
        sm=f"sm{major}{minor}",
        dtype="bfloat16",
        limits=LIMITS,
        work_pool="bench",
    )


def prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def prefill_vs_hf(engine, ids: list[int], reference: torch.Tensor) -> dict:
    """The engine's prefill logits against HF's on the same random weights (both bf16): top-1 agreement and
    gaps. Near-ties are common with random weights, so top-1 can differ where HF's margin is tiny."""
    got = engine.logits(ids)
    gap = (got - reference).abs()
    return {
        "tokens": len(ids),
        "top1_agreement": round(float((got.argmax(-1) == reference.argmax(-1)).float().mean()), 4),
        "max_abs_gap": round(float(gap.max()), 4),
        "mean_abs_gap": round(float(gap.mean()), 5),
        "reference_max_abs": round(float(reference.abs().max()), 3),
    }


def step_bytes(engine, prompt_len: int, new_tokens: int, batch: int = 1) -> dict:
    """Bytes one decode step must read at ``batch`` (each unique byte once): every weight except the
    embedding table, of which ``batch`` rows; for a MoE layer at batch 1 only the top-k experts' share of
    its stacked experts (all of them at larger batches: the engine's dense path); the K/V cache up to
    each request's position (mean over the measured steps)."""
    model = engine.model
    spec = model.spec
    emb = model.embedding
    element = emb.element_size()
    weights = model.weight_bytes() - emb.numel() * element + batch * spec.hidden_size * element
    # weight_bytes() also counts the RoPE cos/sin tables (max_position_embeddings rows): a step reads a row
    rope = {id(t): t for t in (model.cos, model.sin)}
    weights -= sum(
        t.numel() * t.element_size() - batch * t.shape[-1] * t.element_size() for t in rope.values()
    )
    experts_all = experts_read = 0
    for layer in model.layers:
        moe = getattr(layer, "moe", None)
        if moe is None:
            continue
        stacked = sum(
            t.numel() * t.element_size()
            for p in (moe.fc, moe.gate, moe.proj)
            for t in (p.weight, p.weight_scale)
            if t is not None
        )
        experts_all += stacked
        active = min(moe.num_experts, batch * moe.top_k)
        experts_read += (
            stacked * active // moe.num_experts if batch * moe.top_k < moe.num_experts else stacked
        )
    weights = weights - experts_all + experts_read
    mean_position = prompt_len + (new_tokens - 1) / 2
    kv_store = engine.cache.k[0].element_size()
    kv = int(
        2 * spec.num_layers * spec.num_kv_heads * spec.head_size * kv_store * (mean_position + 1) * batch
    )
    return {
        "batch": batch,
        "weights_read": weights,
        "kv_read": kv,
        "bytes_per_step": weights + kv,
        "experts_all_bytes": experts_all,
        "experts_read_bytes": experts_read,
        "formula": (
            "weight_bytes - embedding_table + batch*hidden*2 (embedding rows) "
            "- RoPE cos/sin tables + batch rows - stacked_expert_bytes + "
            "stacked_expert_bytes*min(top_k*batch,E)/E (gather path, top_k*batch<E; else all experts) + "
            "2*layers*kv_heads*head_dim*2B*(mean_position+1)*batch (K/V)"
        ),
    }


def batch1(
    engine, vocab: int, prompt_len: int, new_tokens: int, runs: int, read_bps: float | None, nbytes: int
) -> dict:
    request = [
        GenerationRequest(prompts(vocab, 1, prompt_len, 1)[0], SamplingParams(max_new_tokens=new_tokens))
    ]
    t0 = time.perf_counter()
    engine.generate(request)  # Inductor compile + CUDA-graph capture of every bucket these runs touch
    first = time.perf_counter() - t0
    engine.generate(request)
    rates = []
    for _ in range(runs):
        res = engine.generate(request)
        rates.append(decode_rate(res))
    rate = statistics.median(rates)
    out = {
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "runs": runs,
        "tok_s": round(rate, 1),
        "tok_s_all": [round(r, 1) for r in rates],
        "step_ms": round(1e3 / rate, 3),
        "first_generate_s": round(first, 2),
        "token_ids_head": res[0].token_ids[:16],
    }
    if read_bps:
        out["roofline_pct"] = round(100 * nbytes * rate / read_bps, 1)
        out["achieved_TBps"] = round(nbytes * rate / 1e12, 3)
    return out


def concurrency(
    engine,
    vocab: int,
    conc: int,
    n_requests: int,
    prompt_len: int,
    new_tokens: int,
    read_bps: float | None,
    nbytes: int,
) -> dict:
    requests = [
        GenerationRequest(p, SamplingParams(max_new_tokens=new_tokens))
        for p in prompts(vocab, n_requests, prompt_len, 3)
    ]
    t0 = time.perf_counter()
    engine.generate(requests, concurrency=conc)  # warm-up: compiles and captures the batch-64 step
    first = time.perf_counter() - t0
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = engine.generate(requests, concurrency=conc)
    wall = time.perf_counter() - t0
    total = sum(len(r.token_ids) for r in res)
    # decode ms/step of a full batch: each request's steady inter-token time (first token = prefill excluded)
    per_step = statistics.median(
        (r.token_times_s[-1] - r.token_times_s[0]) / (len(r.token_times_s) - 1) for r in res
    )
    out = {
        "concurrency": conc,
        "requests": n_requests,
        "prompt_tokens": prompt_len,
        "new_tokens_each": new_tokens,
        "end_to_end_tok_s": round(total / wall, 1),
        "decode_tok_s": round(decode_rate(res), 1),
        "decode_step_ms": round(1e3 * per_step, 3),
        "wall_s": round(wall, 3),
        "first_generate_s": round(first, 2),
    }
    if read_bps:
        out["decode_step_roofline_pct"] = round(100 * nbytes / per_step / read_bps, 1)
    return out


def _cpu_ms(step, iters: int = 20) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def moe_probe(engine, read_bps: float | None) -> dict:
    """Layer 0's MoE at batch 1, each in a CUDA graph: the engine's decode MoE (``gather``: router, gathered
    top-k weights, batched matmul; eager here, the engine's step runs it Inductor-compiled), against the
    same layer with the two chosen experts' GEMVs on their weights in place (expert ids read on the host
    once, so no gather) — what reading only the active experts once costs."""
    from kiln.engine.torch.kernels import graph_ms

    timer = graph_ms if engine.device.type == "cuda" else _cpu_ms  # CPU: the --tiny logic check
    moe = engine.model.layers[0].moe
    hidden = engine.model.spec.hidden_size
    x = torch.randn(1, hidden, dtype=engine.model.dtype, device=engine.device) * 0.5
    with torch.inference_mode():
        weights, ids = moe.route(x)
        chosen = [int(e) for e in ids[0]]
        gather_ms = timer(lambda: moe(x, True))
        fc = [moe.fc.weight[e] for e in chosen]
        gate = [moe.gate.weight[e] for e in chosen]
        proj = [moe.proj.weight[e] for e in chosen]
        w = weights[0]

        def in_place() -> torch.Tensor:
            out = None
            for i in range(len(chosen)):
                h = moe.activation(torch.nn.functional.linear(x, fc[i])) * torch.nn.functional.linear(
                    x, gate[i]
                )
                y = torch.nn.functional.linear(h, proj[i]) * w[i]
                out = y if out is None else out + y
            return out

        in_place_ms = timer(in_place)
        ref = in_place()
        got = moe(x, True)
    active = sum(t.numel() * t.element_size() for t in (*fc, *gate, *proj))
    out = {
        "layer": 0,
        "experts_chosen": chosen,
        "active_expert_bytes": active,
        "gather_eager_graph_ms": round(gather_ms, 4),
        "experts_in_place_graph_ms": round(in_place_ms, 4),
        "gather_over_in_place": round(gather_ms / in_place_ms, 2),
        "max_abs_diff": round(float((got.float() - ref.float()).abs().max()), 5),
    }
    if read_bps:
        out["gather_TBps_of_active_bytes"] = round(active / gather_ms / 1e9, 3)
        out["in_place_TBps"] = round(active / in_place_ms / 1e9, 3)
    return out


def work_root(need_bytes: int) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes * 1.15:
        return Path(tempfile.mkdtemp(prefix="kiln-families-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="kiln-families-"))


def bench_shape(run: Run, key: str, args, bandwidth: dict | None, tgt: Target) -> None:
    info = SHAPES[key]
    cuda = not args.tiny
    device = "cuda" if cuda else "cpu"
    config = shape_config(key, args.tiny, args.mixtral_layers)
    r = run.results["shapes"].setdefault(key, {})
    label = info["label"]
    if key.startswith("mixtral"):
        label = f"Mixtral-8x7B shape, {config['num_hidden_layers']} of {MIXTRAL_FULL_LAYERS} layers"
    r["label"] = label + (" (tiny)" if args.tiny else "")
    r["architecture"] = info["architecture"]
    r["config"] = config
    r["weights"] = "random (torch.manual_seed(0), transformers' own init), built on the device"
    if key.startswith("mixtral"):
        r["reduction"] = (
            f"num_hidden_layers {config['num_hidden_layers']} of the real {MIXTRAL_FULL_LAYERS}; "
            "every per-layer size as Mixtral-8x7B"
        )
    read_bps = bandwidth["read_Bps"] if bandwidth else None
    # checkpoint + engine side by side on /dev/shm if both fit there
    root = (
        work_root(2 * checkpoint_bytes(config)) if cuda else Path(tempfile.mkdtemp(prefix="kiln-families-"))
    )
    r["work_dir"] = str(root)
    try:
        saved = run.stage(
            f"{key}/build_save", build_and_save, info["architecture"], config, root / "hf", device
        )
        if saved is None:
            return
        reference = saved.pop("reference")
        r["checkpoint"] = {k: v for k, v in saved.items() if k != "config_json"}
        r["checkpoint"]["dtype_in_config"] = saved["config_json"].get("dtype")
        backend = TorchBackend()
        lineage = {"model_sha": f"random-{key}"}
        eng_dir = run.stage(
            f"{key}/compile", backend.compile, root / "hf", tgt, root / "engine", lineage, precompile=False
        )
        shutil.rmtree(root / "hf", ignore_errors=True)
        if eng_dir is None:
            return
        r["engine_bytes"] = sum(p.stat().st_size for p in Path(eng_dir).iterdir() if p.is_file())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        engine = run.stage(f"{key}/load", backend.load, eng_dir)
        if engine is None:
            return
        try:
            manifest = engine.manifest.to_dict()
            r["program"] = manifest["program"]
            print(f"[{key}] kiln-engine.json program: {json.dumps(manifest['program'])}", flush=True)
            r["engine_weight_bytes"] = engine.model.weight_bytes()
            r["kv_cache_bytes"] = engine.cache.nbytes()
            r["attention_kernel"] = bool(engine.model.attention_kernel)
            r["cuda_graphs"] = bool(engine.cuda_graphs)
            r["compiled"] = engine._decode_fn != engine.model.decode
            r["prefill_vs_hf"] = run.stage(f"{key}/prefill_vs_hf", prefill_vs_hf, engine, *reference)
            b1 = step_bytes(engine, args.prompt_tokens, args.new_tokens, batch=1)
            r["batch1_bytes"] = b1
            r["batch1"] = run.stage(
                f"{key}/batch1",
                batch1,
                engine,
                config["vocab_size"],
                args.prompt_tokens,
                args.new_tokens,
                args.runs,
                read_bps,
                b1["bytes_per_step"],
            )
            bc = step_bytes(engine, args.conc_prompt_tokens, args.conc_new_tokens, batch=args.concurrency)
            r["concurrency_bytes"] = bc
            r["concurrency"] = run.stage(
                f"{key}/c{args.concurrency}",
                concurrency,
                engine,
                config["vocab_size"],
                args.concurrency,
                args.requests,
                args.conc_prompt_tokens,
                args.conc_new_tokens,
                read_bps,
                bc["bytes_per_step"],
            )
            if engine.model.layers[0].moe is not None:
                r["moe_probe"] = run.stage(f"{key}/moe_probe", moe_probe, engine, read_bps)
            if cuda:
                r["peak_gpu_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
                r["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
            else:
                r["engine_memory_bytes"] = engine.memory_bytes()
        finally:
            engine.close()
            del engine
    finally:
        shutil.rmtree(root, ignore_errors=True)
        gc.collect()
        if cuda:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        run.save()


def environment(args) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "limits": LIMITS,
        "tiny": args.tiny,
        "weights": "random weights built on the device from transformers config classes; no trained model",
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        try:
            env["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
    env["cpu_count"] = os.cpu_count()
    # which engine sources ran (other work changes them while benches run): sha256[:12] per file
    import hashlib

    root = Path(__file__).resolve().parents[1]
    env["engine_sources_sha256"] = {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()[:12]
        for f in sorted([*(root / "kiln/engine/torch").glob("*.py"), root / "kiln/engine/base.py"])
    }
    shm = Path("/dev/shm")
    if shm.is_dir():
        env["dev_shm_free_bytes"] = shutil.disk_usage(shm).free
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--budget-s", type=float, default=520)
    parser.add_argument(
        "--shapes", default=",".join(ORDER), help=f"comma-separated, in order; known: {', '.join(ORDER)}"
    )
    parser.add_argument("--mixtral-layers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32, help="batch-1 prompt length")
    parser.add_argument("--new-tokens", type=int, default=128, help="batch-1 new tokens per run")
    parser.add_argument("--runs", type=int, default=3, help="timed batch-1 runs (median)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--conc-prompt-tokens", type=int, default=128)
    parser.add_argument("--conc-new-tokens", type=int, default=128)
    parser.add_argument(
        "--min-shape-s",
        type=float,
        default=60,
        help="do not start another shape with less than this much of the budget left",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on a cpu Target (logic check)")
    parser.add_argument("--name", default="engine_families_gpu")
    parser.add_argument("--render", type=Path, help="only write the .md next to this JSON")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        write_markdown(results, args.render.with_suffix(".md"))
        return
    keys = [k for k in args.shapes.split(",") if k]
    unknown = set(keys) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; known: {', '.join(ORDER)}")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --tiny for the CPU logic check")
    run = Run(args.out, args.budget_s, name=f"{args.name}.json")
    r = run.results
    r["env"] = environment(args)
    r["shapes"] = {}
    print(json.dumps(r["env"], indent=1), flush=True)
    bandwidth = None
    if not args.tiny:
        r["copy_bandwidth_Bps"] = run.stage("copy_bandwidth", copy_bandwidth)
        bandwidth = run.stage("read_bandwidth", read_bandwidth)
        r["read_bandwidth"] = bandwidth
    tgt = target(args.tiny)
    rate = None  # seconds per cost unit, from the shapes done so far
    for key in keys:
        config = shape_config(key, args.tiny, args.mixtral_layers)
        left = args.budget_s - (time.perf_counter() - run.start)
        need = max(args.min_shape_s, 0.8 * rate * cost_units(config)) if rate else args.min_shape_s
        if left < need:
            run.results["errors"][key] = (
                f"skipped: {left:.0f} s of the budget left, about {need:.0f} s needed "
                "(run it alone with --shapes)"
            )
            run.save()
            continue
        t0 = time.perf_counter()
        bench_shape(run, key, args, bandwidth, tgt)
        rate = (time.perf_counter() - t0) / cost_units(config)
        run.results["shapes"][key]["wall_s"] = round(time.perf_counter() - t0, 1)
    r["total_s"] = round(time.perf_counter() - run.start, 1)
    run.save()
    md = args.out / f"{args.name}.md"
    write_markdown(r, md)
    print(md.read_text(), flush=True)


def _gb(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def write_markdown(r: dict, path: Path) -> None:
    env = r.get("env", {})
    bw = r.get("read_bandwidth") or {}
    copy = r.get("copy_bandwidth_Bps")
    lines = [
        f"# kiln torch engine, new families, on {env.get('gpu', 'CPU (tiny logic check)')} "
        f"(torch {env.get('torch')}, CUDA {env.get('cuda')}, transformers {env.get('transformers')})",
        "",
        "Random weights built on the device from the transformers config classes (no trained model; "
        "throughput only), saved with `save_pretrained` (bf16) and compiled by `TorchBackend` from that HF "
        "dir.",
        "",
        f"Command: `{env.get('command')}`",
        "",
    ]
    if env.get("nvidia_smi"):
        lines += [f"Device: {env['nvidia_smi']}", ""]
    if bw:
        lines += [
            f"Read bandwidth (2 GiB bf16, sum {bw['sum_Bps'] / 1e12:.2f} / amax {bw['amax_Bps'] / 1e12:.2f} "
            f"TB/s): roofline = {bw['read_Bps'] / 1e12:.2f} TB/s"
            + (f"; device-to-device copy {copy / 1e12:.2f} TB/s (read+write)." if copy else "."),
            "",
        ]
    lines += [
        "| shape | dtype | batch-1 tok/s | ms/step | bytes/step | % roofline | c=64 tok/s (end to end) | "
        "c=64 decode ms/step | peak GPU mem |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, s in (r.get("shapes") or {}).items():
        b1, c = s.get("batch1") or {}, s.get("concurrency") or {}
        nbytes = (s.get("batch1_bytes") or {}).get("bytes_per_step")
        peak = s.get("peak_gpu_allocated_bytes")
        peak_s = (
            f"{peak / 2**30:.1f} GiB"
            if peak
            else (
                "-" if "engine_memory_bytes" not in s else f"{s['engine_memory_bytes'] / 2**20:.1f} MiB (CPU)"
            )
        )
        lines.append(
            f"| {s.get('label', key)} | bf16 | {b1.get('tok_s', '-')} | {b1.get('step_ms', '-')} | "
            f"{_gb(nbytes)} | {b1.get('roofline_pct', '-')} | {c.get('end_to_end_tok_s', '-')} | "
            f"{c.get('decode_step_ms', '-')} | {peak_s} |"
        )
    lines += [
        "",
        "Batch 1: prompt {p} tokens, {n} new tokens, median of {k} runs after a warm-up; c=64: {q} requests "
        "of {cp} prompt + {cn} new tokens at concurrency 64, end to end (prefill included) after a warm-up "
        "run.".format(
            p=_first(r, "batch1", "prompt_tokens"),
            n=_first(r, "batch1", "new_tokens"),
            k=_first(r, "batch1", "runs"),
            q=_first(r, "concurrency", "requests"),
            cp=_first(r, "concurrency", "prompt_tokens"),
            cn=_first(r, "concurrency", "new_tokens_each"),
        ),
        "Bytes/step (batch 1): " + str(_first(r, "batch1_bytes", "formula")) + ".",
        "",
    ]
    for key, s in (r.get("shapes") or {}).items():
        lines.append(f"## {s.get('label', key)}")
        lines.append("")
        if s.get("reduction"):
            lines.append(f"- reduced: {s['reduction']}")
        ck = s.get("checkpoint") or {}
        if ck:
            lines.append(
                f"- {ck.get('params', 0) / 1e9:.2f}B parameters; built in {ck.get('build_s')} s, "
                f"save_pretrained {ck.get('save_pretrained_s')} s ({_gb(ck.get('checkpoint_bytes'))}, "
                f"{ck.get('shards')} shards)"
            )
        stages = {
            k.split("/", 1)[1]: v for k, v in (r.get("stages") or {}).items() if k.startswith(f"{key}/")
        }
        if stages:
            lines.append(
                f"- stage seconds ({s.get('wall_s', '-')} s for the shape): "
                + ", ".join(f"{k} {v}" for k, v in stages.items())
            )
        ref = s.get("prefill_vs_hf") or {}
        if ref:
            lines.append(
                f"- engine prefill logits vs HF's (same random weights, bf16, {ref['tokens']} tokens): top-1 "
                f"agreement {ref['top1_agreement']}, max gap {ref['max_abs_gap']} (mean "
                f"{ref['mean_abs_gap']}; logits up to {ref['reference_max_abs']})"
            )
        if s.get("program") is not None:
            lines.append(
                f"- program (kiln-engine.json): `{json.dumps(s['program'])}`; decode step compiled: "
                f"{s.get('compiled')}, CUDA graphs: {s.get('cuda_graphs')}, Triton attention kernel: "
                f"{s.get('attention_kernel')}"
            )
        b1b = s.get("batch1_bytes") or {}
        if b1b:
            lines.append(
                f"- batch-1 bytes/step {_gb(b1b.get('bytes_per_step'))} = weights "
                f"{_gb(b1b.get('weights_read'))} + K/V {_gb(b1b.get('kv_read'))}"
                + (
                    f" (experts: {_gb(b1b['experts_read_bytes'])} read of {_gb(b1b['experts_all_bytes'])} "
                    "stacked)"
                    if b1b.get("experts_all_bytes")
                    else ""
                )
            )
        b1 = s.get("batch1") or {}
        if b1:
            lines.append(
                f"- batch 1: runs {b1.get('tok_s_all')} tok/s, first generate (compile + capture) "
                f"{b1.get('first_generate_s')} s, achieved {b1.get('achieved_TBps', '-')} TB/s"
            )
        c = s.get("concurrency") or {}
        if c:
            lines.append(
                f"- c=64: decode {c.get('decode_tok_s')} tok/s, decode step {c.get('decode_step_ms')} ms "
                f"({c.get('decode_step_roofline_pct', '-')}% of roofline for "
                f"{_gb((s.get('concurrency_bytes') or {}).get('bytes_per_step'))}), wall {c.get('wall_s')} "
                f"s, first generate {c.get('first_generate_s')} s"
            )
        p = s.get("moe_probe") or {}
        if p:
            lines.append(
                f"- MoE probe (layer 0, batch 1, CUDA graph, eager): gather {p['gather_eager_graph_ms']} ms "
                f"vs the two experts' GEMVs in place {p['experts_in_place_graph_ms']} ms "
                f"({p['gather_over_in_place']}x; {_gb(p['active_expert_bytes'])} active expert weights; "
                f"{p.get('gather_TBps_of_active_bytes', '-')} vs {p.get('in_place_TBps', '-')} TB/s; "
                f"max abs diff {p['max_abs_diff']})"
            )
        if s.get("peak_gpu_allocated_bytes"):
            lines.append(
                f"- peak GPU memory allocated {s['peak_gpu_allocated_bytes'] / 2**30:.1f} GiB (reserved "
                f"{s['peak_gpu_reserved_bytes'] / 2**30:.1f} GiB; engine weights "
                f"{_gb(s.get('engine_weight_bytes'))}, KV cache {_gb(s.get('kv_cache_bytes'))})"
            )
        lines.append("")
    if r.get("errors"):
        lines += ["Errors / skipped stages:", ""] + [
            f"- {k}: {v.splitlines()[0][:400]}" for k, v in r["errors"].items()
        ]
        lines.append("")
    if r.get("total_s"):
        lines.append(f"Total {r['total_s']} s.")
    path.write_text("\n".join(lines) + "\n")


def _first(r: dict, field: str, key: str):
    for s in (r.get("shapes") or {}).values():
        v = (s.get(field) or {}).get(key)
        if v is not None:
            return v
    return "-"


if __name__ == "__main__":
    main()
