"""kiln torch engine on one CUDA GPU vs HF transformers eager generate (run by hand; not a test).

Model: a Llama-3.2-1B-shaped LlamaForCausalLM with random weights built on the device (hidden 2048,
16 layers, 32/8 heads, ffn 8192, vocab 128256, tied embeddings, llama3 RoPE scaling), written as a
TensorRT-LLM checkpoint (bf16, and FP8 per-tensor with scales measured on the same model) and compiled
with ``TorchBackend``; HF eager generate runs on the very same weights.

Measures: copy bandwidth; decode tok/s at batch 1 (engine programs eager+CUDA graphs and
Inductor+CUDA graphs); TTFT of a 512-token prompt; in-flight throughput at concurrency 1/8/32/64;
% of the HBM roofline (weights + KV bytes read per step / step time vs measured copy bandwidth);
FP8 batch-1 rate; greedy agreement with HF; NCCL init + collectives at world size 1.

    python bench/engine_gpu.py --out bench/results        # writes engine_gpu.json + engine_gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from kiln.engine.torch import TorchBackend  # noqa: E402
from kiln.engine.torch.kernels import FP8_MAX  # noqa: E402
from kiln.engine.torch.kernels import graph_ms as _graph_ms  # noqa: E402
from kiln.profiles import Target  # noqa: E402

SHAPE = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
LIMITS = {"max_batch_size": 64, "max_input_len": 1024, "max_seq_len": 2048, "max_num_tokens": 8192}


class Run:
    def __init__(self, out: Path, budget_s: float, name: str = "engine_gpu.json") -> None:
        self.out, self.start, self.budget, self.name = out, time.perf_counter(), budget_s, name
        self.results: dict = {"stages": {}, "errors": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def stage(self, name: str, fn, *args, needs_s: float = 0.0, **kwargs):
        """``fn(*args, **kwargs)``, or None (recorded) once less than ``needs_s`` of the budget is left."""
        if self.elapsed() + needs_s > self.budget:
            self.results["errors"][name] = "skipped: time budget spent"
            self.save()
            return None
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - self.start:6.1f}s] {name} ...", flush=True)
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:  # one failed stage must not lose the others' numbers
            traceback.print_exc()
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            value = None
        self.results["stages"][name] = round(time.perf_counter() - t0, 2)
        self.save()
        return value

    def save(self) -> None:
        self.results["total_s"] = round(self.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / self.name).write_text(json.dumps(self.results, indent=2, default=str))


def copy_bandwidth() -> float:
    """Read+write bytes per second of a 1 GiB device-to-device copy (the issue's reference: 3.02 TB/s)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (begin.elapsed_time(end) / 1e3)


def gemv_ceiling(model) -> dict:
    """The practical batch-1 decode ceiling on this card: one token's chain of cuBLAS GEMVs over every
    weight the step reads (qkv, o, gate+up, down per layer, lm_head), captured as a CUDA graph; and the
    same chain in FP8 (``torch._scaled_mm``, per-tensor scales), with the lm_head in FP8 or kept bf16.
    The issue's H100 references (1.045 ms bf16, 0.659 ms FP8) were measured this way."""
    sd = model.state_dict()
    cfg = model.config
    mats = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        mats += [
            torch.cat([sd[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"]),
            sd[f"{p}.self_attn.o_proj.weight"],
            torch.cat((sd[f"{p}.mlp.gate_proj.weight"], sd[f"{p}.mlp.up_proj.weight"])),
            sd[f"{p}.mlp.down_proj.weight"],
        ]
    lm_head = sd["model.embed_tokens.weight"]
    xs = {
        k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for k in {m.shape[1] for m in [*mats, lm_head]}
    }

    def bf16_chain() -> None:
        for w in (*mats, lm_head):
            torch.nn.functional.linear(xs[w.shape[1]], w)

    def to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (w.float().abs().amax() / FP8_MAX).reshape(())
        return (w.float() / scale).to(torch.float8_e4m3fn), scale

    fp8 = [to_fp8(w) for w in mats]
    head8 = to_fp8(lm_head)
    xs8 = {k: v.to(torch.float8_e4m3fn) for k, v in xs.items()}
    one = torch.ones((), device="cuda")

    def fp8_chain(head_fp8: bool):
        def run() -> None:
            for w, s in fp8:
                torch._scaled_mm(xs8[w.shape[1]], w.t(), scale_a=one, scale_b=s, out_dtype=torch.bfloat16)
            if head_fp8:
                torch._scaled_mm(
                    xs8[head8[0].shape[1]],
                    head8[0].t(),
                    scale_a=one,
                    scale_b=head8[1],
                    out_dtype=torch.bfloat16,
                )
            else:
                torch.nn.functional.linear(xs[lm_head.shape[1]], lm_head)

        return run

    weight_bytes = sum(m.numel() * m.element_size() for m in (*mats, lm_head))
    bf16_ms = _graph_ms(bf16_chain)
    fp8_ms, fp8_head16_ms = _graph_ms(fp8_chain(True)), _graph_ms(fp8_chain(False))
    return {
        "bf16_ms": round(bf16_ms, 4),
        "bf16_tok_s": round(1e3 / bf16_ms, 1),
        "fp8_ms": round(fp8_ms, 4),
        "fp8_bf16_lm_head_ms": round(fp8_head16_ms, 4),
        "fp8_over_bf16_ceiling": round(bf16_ms / fp8_ms, 3),
        "fp8_bf16_lm_head_over_bf16_ceiling": round(bf16_ms / fp8_head16_ms, 3),
        "weight_bytes": weight_bytes,
        "bf16_chain_TBps": round(weight_bytes / bf16_ms / 1e9, 3),
    }


def build_hf():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"])
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def checkpoint_config(cfg, quantization: dict) -> dict:
    """The TensorRT-LLM checkpoint config.json of a Llama-shaped ``cfg`` (HF config) with ``quantization``."""
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": "bfloat16",
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "norm_epsilon": cfg.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": SHAPE["rope_theta"],
        "rotary_scaling": {
            "type": "llama3",
            **{k: v for k, v in SHAPE["rope_scaling"].items() if k != "rope_type"},
        },
        "head_size": cfg.hidden_size // cfg.num_attention_heads,
        "quantization": quantization,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
    }


def write_checkpoint(model, out_dir: Path, fp8: bool) -> Path:
    """The TensorRT-LLM checkpoint ModelOpt's export writes for this model (names, fused qkv,
    fc=gate_proj)."""
    from safetensors.torch import save_file

    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items()}
    amax = _activation_amax(model) if fp8 else {}
    tensors: dict[str, torch.Tensor] = {
        "transformer.vocab_embedding.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["model.embed_tokens.weight"].clone(),
    }

    def linear(name: str, weights: list[torch.Tensor], inputs: list[str]) -> None:
        weight = torch.cat(weights)
        if not fp8:
            tensors[f"{name}.weight"] = weight
            return
        w_scale = (weight.float().abs().amax() / FP8_MAX).reshape(1)
        x_scale = (torch.stack([amax[i] for i in inputs]).amax() / FP8_MAX).reshape(1)
        tensors[f"{name}.weight"] = (
            (weight.float() / w_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        )
        tensors[f"{name}.weights_scaling_factor"] = w_scale
        tensors[f"{name}.activation_scaling_factor"] = x_scale

    for i in range(cfg.num_hidden_layers):
        hf, trt = f"model.layers.{i}", f"transformer.layers.{i}"
        tensors[f"{trt}.input_layernorm.weight"] = sd[f"{hf}.input_layernorm.weight"]
        tensors[f"{trt}.post_layernorm.weight"] = sd[f"{hf}.post_attention_layernorm.weight"]
        attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
        linear(f"{trt}.attention.qkv", [sd[f"{attn}.{p}_proj.weight"] for p in "qkv"], [f"{attn}.q_proj"])
        linear(f"{trt}.attention.dense", [sd[f"{attn}.o_proj.weight"]], [f"{attn}.o_proj"])
        # ModelOpt gives fused gate/up one shared weight scale: do the same (fc = gate_proj in TRT-LLM naming)
        if fp8:
            both = torch.cat((sd[f"{mlp}.gate_proj.weight"], sd[f"{mlp}.up_proj.weight"]))
            linear(f"{trt}.mlp.fc", [both], [f"{mlp}.gate_proj"])
            fused = tensors.pop(f"{trt}.mlp.fc.weight")
            n = cfg.intermediate_size
            tensors[f"{trt}.mlp.fc.weight"], tensors[f"{trt}.mlp.gate.weight"] = fused[:n], fused[n:]
            for key in ("weights_scaling_factor", "activation_scaling_factor"):
                tensors[f"{trt}.mlp.gate.{key}"] = tensors[f"{trt}.mlp.fc.{key}"].clone()
        else:
            linear(f"{trt}.mlp.fc", [sd[f"{mlp}.gate_proj.weight"]], [])
            linear(f"{trt}.mlp.gate", [sd[f"{mlp}.up_proj.weight"]], [])
        linear(f"{trt}.mlp.proj", [sd[f"{mlp}.down_proj.weight"]], [f"{mlp}.down_proj"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, out_dir / "rank0.safetensors")
    config = checkpoint_config(
        cfg,
        {
            "quant_algo": "FP8" if fp8 else None,
            "kv_cache_quant_algo": None,
            "exclude_modules": ["lm_head"] if fp8 else [],
        },
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _activation_amax(model) -> dict[str, torch.Tensor]:
    """Per-linear input amax over a few random prompts (the FP8 calibration a checkpoint carries)."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def hook(_m, args, _out, name=name):
                value = args[0].detach().abs().amax().float()
                amax[name] = torch.maximum(amax.get(name, value), value)

            hooks.append(module.register_forward_hook(hook))
    with torch.inference_mode():
        model(torch.randint(0, model.config.vocab_size, (4, 128), device=model.device))
    for h in hooks:
        h.remove()
    return amax


def target() -> Target:
    major, minor = torch.cuda.get_device_capability()
    gpu = next(
        (g for g in ("h200", "h100", "b200", "a100", "l40s") if g in torch.cuda.get_device_name().lower()),
        None,
    )
    return Target(
        name="bench-cuda",
        backend="torch",
        device="cuda",
        gpu=gpu,
        sm=f"sm{major}{minor}",
        dtype="bfloat16",
        limits=LIMITS,
        work_pool="bench",
    )


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE["vocab_size"], (length,), generator=g).tolist() for _ in range(n)]


def hf_eager(model, new_tokens: int) -> dict:
    ids = torch.tensor(prompts(1, 32, 1), device="cuda")
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "tok_s": round(new_tokens / dt, 1),
        "new_tokens": new_tokens,
        "seconds": round(dt, 3),
        "token_ids": out[0, 32:].tolist(),
    }


def hf_reference_logits(model, token_ids: list[int]) -> torch.Tensor:
    """HF's logits at each position of prompt + its own greedy tokens (one forward pass), on the GPU."""
    ids = torch.tensor([prompts(1, 32, 1)[0] + token_ids], device="cuda")
    with torch.inference_mode():
        return model(ids).logits[0, 31:-1].float()


def teacher_forced(engine, hf_tokens: list[int], hf_logits: torch.Tensor) -> dict:
    """The engine's decode-step logits (its CUDA-graph path) fed HF's greedy tokens, vs HF's logits at the
    same positions: top-1 agreement and logit gaps. Random weights make near-ties common, so free-running
    greedy runs part early; this compares every step on the same inputs instead."""
    prompt = prompts(1, 32, 1)[0]
    rows = []
    with torch.inference_mode():
        rows.append(
            engine.model.prefill(torch.tensor(prompt, device="cuda"), engine.cache, [0], last_only=True)[
                0
            ].float()
        )
        for i, token in enumerate(hf_tokens[:-1]):
            position = len(prompt) + i
            engine._inputs[0, 0], engine._inputs[1, 0] = token, position
            length = next(n for n in engine._length_buckets if n > position)
            rows.append(engine._decode(1, length)[0].float().clone())
    got = torch.stack(rows)
    ref = hf_logits[: len(rows)]
    gap = (got - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    disagree = got.argmax(-1) != ref.argmax(-1)
    return {
        "steps": len(rows),
        "top1_agreement": round(float((~disagree).float().mean()), 4),
        "max_abs_logit_gap": round(float(gap.max()), 4),
        "mean_abs_logit_gap": round(float(gap.mean()), 5),
        "hf_top2_margin_where_disagree": [
            round(float(m), 4) for m in (top2[:, 0] - top2[:, 1])[disagree][:8]
        ],
        "logits": got,
    }


def decode_rate(results) -> float:
    """Steady-state decode tokens/s over all requests (first token = prefill excluded)."""
    tokens = sum(len(r.token_ids) - 1 for r in results)
    span = max(r.token_times_s[-1] for r in results) - min(r.token_times_s[0] for r in results)
    return tokens / span


def engine_batch1(engine, new_tokens: int, weight_read: int, bandwidth: float | None) -> dict:
    request = [GenerationRequest(prompts(1, 32, 1)[0], SamplingParams(max_new_tokens=new_tokens))]
    engine.generate(request)  # capture / compile every bucket this run touches
    res = engine.generate(request)
    rate = decode_rate(res)
    step = 1 / rate
    spec = engine.model.spec
    length = 512  # attended-length bucket of positions 32..32+new_tokens
    kv_read = 2 * spec.num_layers * spec.num_kv_heads * spec.head_size * length * 2
    out = {
        "tok_s": round(rate, 1),
        "step_ms": round(step * 1e3, 3),
        "bytes_per_step": weight_read + kv_read,
        "token_ids": res[0].token_ids,
    }
    if bandwidth:
        out["hbm_roofline_pct"] = round(100 * (weight_read + kv_read) / step / bandwidth, 1)
    return out


def weight_read_bytes(engine) -> int:
    """Bytes the decode step reads: every weight except the embedding table (one row per token)."""
    emb = engine.model.embedding
    return engine.model.weight_bytes() - emb.numel() * emb.element_size()


def ttft(engine, length: int) -> dict:
    request = [GenerationRequest(prompts(1, length, 2)[0], SamplingParams(max_new_tokens=2))]
    engine.generate(request)
    values = []
    for _ in range(5):
        values.append(engine.generate(request)[0].ttft_s)
    return {
        "prompt_tokens": length,
        "ttft_ms": round(1e3 * min(values), 2),
        "ttft_ms_all": [round(1e3 * v, 2) for v in values],
    }


def concurrency(engine, conc: int, new_tokens: int) -> dict:
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=new_tokens)) for p in prompts(conc, 32, 3)]
    engine.generate(requests, concurrency=conc)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = engine.generate(requests, concurrency=conc)
    wall = time.perf_counter() - t0
    total = sum(len(r.token_ids) for r in res)
    return {
        "concurrency": conc,
        "requests": conc,
        "new_tokens_each": new_tokens,
        "end_to_end_tok_s": round(total / wall, 1),
        "decode_tok_s": round(decode_rate(res), 1),
        "wall_s": round(wall, 3),
    }


def overlap_matches_host_path(engine) -> dict:
    """Greedy tokens of the queued on-device path equal the host-sampled path's (same engine, same
    requests)."""
    requests = [
        GenerationRequest(p, SamplingParams(max_new_tokens=n, stop_token_ids=stop))
        for p, n, stop in zip(
            prompts(6, 24, 5), (40, 7, 64, 13, 64, 30), ([], [], [17], [], [], []), strict=True
        )
    ]
    fast = [r.token_ids for r in engine.generate(requests, concurrency=4)]
    greedy = engine._greedy
    engine._greedy = lambda *_: False
    try:
        host = [r.token_ids for r in engine.generate(requests, concurrency=4)]
    finally:
        engine._greedy = greedy
    return {
        "requests": len(requests),
        "identical": fast == host,
        "first_difference": next(
            (i for i, (a, b) in enumerate(zip(fast, host, strict=True)) if a != b), None
        ),
    }


def nccl_world1() -> dict:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        from kiln.engine.torch.parallel import TensorParallel

        tp = TensorParallel.current()
        x = torch.arange(8, device="cuda", dtype=torch.float32)
        dist.all_reduce(x)
        parts = [torch.empty_like(x)]
        dist.all_gather(parts, x)
        dist.broadcast(x, src=0)
        torch.cuda.synchronize()
        return {
            "backend": dist.get_backend(),
            "rank": tp.rank,
            "world_size": tp.world_size,
            "all_reduce_ok": bool(torch.equal(x, torch.arange(8, device="cuda", dtype=torch.float32))),
            "all_gather_ok": bool(torch.equal(parts[0], x)),
            "nccl_version": ".".join(map(str, torch.cuda.nccl.version())),
        }
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--skip", default="", help="comma-separated stage names to skip")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    run = Run(args.out, args.budget_s)
    r = run.results
    r["env"] = {
        "gpu": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "model": "random-weight Llama-3.2-1B shape",
        "shape": SHAPE,
        "limits": LIMITS,
    }
    try:
        import transformers

        r["env"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    r["copy_bandwidth_Bps"] = run.stage("copy_bandwidth", copy_bandwidth)
    bw = r["copy_bandwidth_Bps"]
    model = run.stage("build_hf", build_hf)
    if model is not None and "ceiling" not in skip:
        r["gemv_ceiling"] = run.stage("gemv_ceiling", gemv_ceiling, model)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    backend = TorchBackend()
    ck16 = run.stage("checkpoint_bf16", write_checkpoint, model, work / "ck-bf16", False)
    ck8 = (
        run.stage("checkpoint_fp8", write_checkpoint, model, work / "ck-fp8", True)
        if "fp8" not in skip
        else None
    )
    hf_logits = None
    if "hf" not in skip:
        r["hf_eager_batch1"] = run.stage("hf_eager", hf_eager, model, 128)
        if r["hf_eager_batch1"]:
            hf_logits = run.stage(
                "hf_reference_logits", hf_reference_logits, model, r["hf_eager_batch1"]["token_ids"]
            )
    del model
    torch.cuda.empty_cache()
    lineage = {"model_sha": "random-llama-3.2-1b-shape"}
    eng_dir = run.stage(
        "compile_bf16", backend.compile, ck16, target(), work / "eng-bf16", lineage, precompile=False
    )
    # inductor_graphs is the built program (kiln's Triton kernels where the build chose them);
    # inductor_graphs_torch_kernels the same with attention and GEMMs on the torch path, for the A/B
    programs = [
        ("eager_graphs", {"compile": "none", "cuda_graphs": True}),
        (
            "inductor_graphs_torch_kernels",
            {"compile": "inductor", "cuda_graphs": True, "attention": "torch", "gemv": {}},
        ),
        ("inductor_graphs", {"compile": "inductor", "cuda_graphs": True}),
    ]
    programs = [(name, program) for name, program in programs if name not in skip]
    r["bf16_batch1"] = {}
    forced: dict[str, torch.Tensor] = {}
    engine = None
    for name, program in programs:
        if engine is not None:
            engine.close()
        engine = run.stage(f"load_bf16_{name}", backend.load, eng_dir, program=program)
        if engine is None:
            continue
        r.setdefault("program_built", engine.manifest["program"])
        wr = weight_read_bytes(engine)
        r["weight_read_bytes"] = wr
        r["bf16_batch1"][name] = run.stage(
            f"bf16_batch1_{name}", engine_batch1, engine, args.new_tokens, wr, bw
        )
        if hf_logits is not None:
            tf = run.stage(
                f"teacher_forced_{name}", teacher_forced, engine, r["hf_eager_batch1"]["token_ids"], hf_logits
            )
            if tf:
                forced[name] = tf.pop("logits")
                r.setdefault("teacher_forced_vs_hf", {})[name] = tf
    if len(forced) == 2:  # the two programs against each other, same inputs
        a, b = forced.values()
        r["teacher_forced_programs"] = {
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
            "max_abs_logit_gap": round(float((a - b).abs().max()), 4),
        }
    # the rest runs on the last program that loaded (inductor unless it failed)
    if engine is not None:
        r["program_used"] = name
        r["ttft_512"] = run.stage("ttft_512", ttft, engine, 512)
        if "overlap" not in skip:
            r["overlap_matches_host_path"] = run.stage("overlap_check", overlap_matches_host_path, engine)
        r["concurrency"] = []
        for conc in (1, 8, 32, 64):
            r["concurrency"].append(run.stage(f"concurrency_{conc}", concurrency, engine, conc, 128))
        hf_ids = (r.get("hf_eager_batch1") or {}).get("token_ids")
        best = r["bf16_batch1"].get("inductor_graphs") or r["bf16_batch1"].get("eager_graphs")
        if hf_ids and best:
            n = min(len(hf_ids), len(best["token_ids"]))
            same = next((i for i in range(n) if hf_ids[i] != best["token_ids"][i]), n)
            r["greedy_vs_hf"] = {"compared": n, "identical_prefix": same}
        engine.close()
    if ck8 is not None:
        eng8 = run.stage(
            "compile_fp8", backend.compile, ck8, target(), work / "eng-fp8", lineage, precompile=False
        )
        r["fp8_batch1"] = {}
        for name, program in programs:
            engine = run.stage(f"load_fp8_{name}", backend.load, eng8, program=program) if eng8 else None
            if engine is None:
                continue
            r.setdefault("program_built_fp8", engine.manifest["program"])
            r["fp8_batch1"][name] = run.stage(
                f"fp8_batch1_{name}", engine_batch1, engine, args.new_tokens, weight_read_bytes(engine), bw
            )
            engine.close()
    if "nccl" not in skip:
        r["nccl_world1"] = run.stage("nccl_world1", nccl_world1)
    r["total_s"] = round(time.perf_counter() - run.start, 1)
    run.save()
    write_markdown(r, args.out / "engine_gpu.md")


def write_markdown(r: dict, path: Path) -> None:
    env = r["env"]
    bw = r.get("copy_bandwidth_Bps")
    lines = [
        f"# kiln torch engine on {env['gpu']} (torch {env['torch']}, CUDA {env['cuda']})",
        "",
        f"Model: {env['model']} (bf16 weights read per step: {r.get('weight_read_bytes', 0) / 1e9:.2f} GB). "
        f"Copy bandwidth: {bw / 1e12:.2f} TB/s."
        if bw
        else "",
        "",
        f"Command: `{env['command']}`",
        "",
        "| measurement | value |",
        "| --- | --- |",
    ]
    hf = r.get("hf_eager_batch1") or {}
    ceiling = r.get("gemv_ceiling") or {}
    if ceiling:
        lines.append(
            "| ceiling: cuBLAS GEMV chain over all weights, CUDA graph, batch 1 | bf16 "
            f"{ceiling['bf16_ms']} ms = {ceiling['bf16_tok_s']} tok/s ({ceiling['bf16_chain_TBps']} TB/s); "
            f"FP8 {ceiling['fp8_ms']} ms, FP8 with bf16 lm_head {ceiling['fp8_bf16_lm_head_ms']} ms |"
        )
    if hf:
        lines.append(f"| HF transformers eager generate, batch 1 | {hf['tok_s']} tok/s |")
    for name, v in (r.get("bf16_batch1") or {}).items():
        if v:
            pct = f", {v['hbm_roofline_pct']}% of HBM roofline" if "hbm_roofline_pct" in v else ""
            x = f", {v['tok_s'] / hf['tok_s']:.1f}x HF" if hf else ""
            lines.append(
                f"| kiln bf16 batch 1 ({name}) | {v['tok_s']} tok/s ({v['step_ms']} ms/step{pct}{x}) |"
            )
    for name, v in (r.get("fp8_batch1") or {}).items():
        if v:
            bf = (r.get("bf16_batch1") or {}).get(name)
            ratio = f", {v['tok_s'] / bf['tok_s']:.2f}x bf16" if bf else ""
            lines.append(
                f"| kiln FP8 batch 1 ({name}) | {v['tok_s']} tok/s ({v['step_ms']} ms/step{ratio}) |"
            )
    if r.get("ttft_512"):
        lines.append(f"| TTFT, 512-token prompt ({r.get('program_used')}) | {r['ttft_512']['ttft_ms']} ms |")
    for c in r.get("concurrency") or []:
        if c:
            lines.append(
                f"| concurrency {c['concurrency']} ({c['requests']} x {c['new_tokens_each']} new tokens) | "
                f"{c['end_to_end_tok_s']} tok/s end to end, {c['decode_tok_s']} tok/s decode |"
            )
    if r.get("overlap_matches_host_path"):
        o = r["overlap_matches_host_path"]
        lines.append(
            f"| queued on-device greedy path == host-sampled path ({o['requests']} requests, concurrency 4) "
            f"| {o['identical']} |"
        )
    if r.get("greedy_vs_hf"):
        g = r["greedy_vs_hf"]
        lines.append(
            f"| greedy tokens identical to HF (bf16, random weights) | first {g['identical_prefix']} of "
            f"{g['compared']} |"
        )
    for name, t in (r.get("teacher_forced_vs_hf") or {}).items():
        lines.append(
            f"| teacher-forced vs HF bf16 ({name}, {t['steps']} steps) | top-1 agreement "
            f"{t['top1_agreement']}, max logit gap {t['max_abs_logit_gap']} (mean "
            f"{t['mean_abs_logit_gap']}) |"
        )
    if r.get("teacher_forced_programs"):
        t = r["teacher_forced_programs"]
        lines.append(
            "| teacher-forced, the two kiln programs against each other | top-1 agreement "
            f"{t['top1_agreement']}, max logit gap {t['max_abs_logit_gap']} |"
        )
    if r.get("nccl_world1"):
        lines.append(f"| NCCL init + all_reduce/all_gather/broadcast, world size 1 | {r['nccl_world1']} |")
    lines += _targets(r)
    if r.get("errors"):
        lines += ["", "Errors / skipped stages:", ""] + [
            f"- {k}: {v.splitlines()[0][:300]}" for k, v in r["errors"].items()
        ]
    path.write_text("\n".join(lines) + "\n")


def _targets(r: dict) -> list[str]:
    """The issue's targets, judged against the ceiling and the HF rate measured in this same run."""
    ceiling, hf = r.get("gemv_ceiling") or {}, r.get("hf_eager_batch1") or {}
    bf16 = (r.get("bf16_batch1") or {}).get("inductor_graphs") or {}
    fp8 = (r.get("fp8_batch1") or {}).get("inductor_graphs") or {}
    c64 = next((c for c in r.get("concurrency") or [] if c and c["concurrency"] == 64), None)
    c1 = next((c for c in r.get("concurrency") or [] if c and c["concurrency"] == 1), None)
    rows = []
    if bf16 and ceiling:
        pct = 100 * bf16["tok_s"] / ceiling["bf16_tok_s"]
        rows.append(
            f"| bf16 batch-1 decode >= 75% of the GEMV-chain ceiling | {bf16['tok_s']} of "
            f"{ceiling['bf16_tok_s']} tok/s = {pct:.1f}% | {'yes' if pct >= 75 else 'no'} |"
        )
    if bf16 and hf:
        x = bf16["tok_s"] / hf["tok_s"]
        rows.append(f"| bf16 batch 1 >= 10x HF eager (same run) | {x:.1f}x | {'yes' if x >= 10 else 'no'} |")
    if bf16 and fp8:
        x = fp8["tok_s"] / bf16["tok_s"]
        cap = (
            f"; the chain ceiling's own ratio is {ceiling['fp8_bf16_lm_head_over_bf16_ceiling']}x"
            if ceiling
            else ""
        )
        rows.append(
            f"| FP8 batch 1 >= 1.4x bf16 (lm_head bf16) | {x:.2f}x{cap} | {'yes' if x >= 1.4 else 'no'} |"
        )
    if c64 and (c1 or bf16):
        base = bf16.get("tok_s") or c1["decode_tok_s"]
        x = c64["end_to_end_tok_s"] / base
        rows.append(
            f"| concurrency 64 >= 20x batch 1 | {c64['end_to_end_tok_s']} tok/s = {x:.1f}x | "
            f"{'yes' if x >= 20 else 'no'} |"
        )
    return ["", "| target | measured | met? |", "| --- | --- | --- |", *rows] if rows else []


if __name__ == "__main__":
    main()
