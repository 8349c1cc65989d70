"""Every quantization recipe of the torch engine on one CUDA GPU, Llama-3.1-8B and Llama-3.2-1B shapes
(run by hand; not a test): issue 20's table.

RANDOM WEIGHTS: a LlamaForCausalLM of each shape is built on the device (8B: hidden 4096, 32 layers, 32/8
heads, ffn 14336, vocab 128256, untied; 1B: ``engine_gpu.SHAPE``) and written straight as the TensorRT-LLM
checkpoints ModelOpt exports (``engine_gpu.write_checkpoint`` for bf16/FP8,
``engine_gpu_quant.write_checkpoint`` for W8A16, W8A8 SmoothQuant, W4A16, W4A16_AWQ and W4A8_AWQ, group 128;
scales from the random weights and
one random calibration batch, no ModelOpt calibration), compiled with ``TorchBackend`` (which races the
kernels per weight shape and records them in ``program.gemv``) and loaded with the built program.

Per recipe and shape: batch-1 decode tok/s, bytes one step reads (the weight copy each linear's kernel
reads, its scales, the K/V up to each position) and their share of the read bandwidth measured in the same
run; end-to-end tok/s at concurrency 8 and 64; at 8B a ``torch.profiler`` kernel table of one batch-1
step and of one batch-8 step (top kernels, GEMV share). 1B integer recipes also run the old program (the
integer-kernel choices removed: the torch path, the whole weight dequantized per call), and validation's
``recommend`` picks the fastest recipe from the old and the new numbers. HF transformers (static cache +
torch.compile) on the 8B bf16 weights last, if the time budget is left.

Stages run in priority order and each recipe only when the budget left covers its estimate; what does
not fit is recorded as skipped.

    python bench/engine_gpu_recipes.py --out $OUT --budget-s 420
    python bench/engine_gpu_recipes.py --tiny --out /tmp/recipes      # logic check on CPU, tiny shape
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_families_gpu import SHAPES as FAMILY_SHAPES  # noqa: E402
from engine_families_gpu import batch1 as measure_batch1  # noqa: E402
from engine_families_gpu import concurrency, read_bandwidth, step_bytes, work_root  # noqa: E402
from engine_gpu import SHAPE as SHAPE_1B  # noqa: E402
from engine_gpu import Run  # noqa: E402
from engine_gpu import write_checkpoint as write_float_checkpoint  # noqa: E402
from engine_gpu_profile import GEMM_HINTS  # noqa: E402
from engine_gpu_quant import integer_keys  # noqa: E402
from engine_gpu_quant import write_checkpoint as write_quant_checkpoint  # noqa: E402

from kiln.engine.torch import TorchBackend  # noqa: E402
from kiln.engine.torch.linear import QuantLinear  # noqa: E402
from kiln.profiles import Target  # noqa: E402

RECIPES = ("bf16", "fp8", "int8_wo", "int8_sq", "int4_wo", "int4_awq", "w4a8_awq")
ALGO = {
    "bf16": None,
    "fp8": "FP8",
    "int8_wo": "W8A16",
    "int8_sq": "W8A8_SQ_PER_CHANNEL",
    "int4_wo": "W4A16",
    "int4_awq": "W4A16_AWQ",
    "w4a8_awq": "W4A8_AWQ",
}
# (shape, recipe) in priority order: the 8B targets, the 1B before/after, then the rest
PLAN = (
    [("8b", r) for r in ("bf16", "int4_awq", "int8_wo", "int8_sq", "fp8")]
    + [("1b", r) for r in ("bf16", "int4_awq", "int8_wo", "int8_sq", "fp8", "int4_wo", "w4a8_awq")]
    + [("8b", r) for r in ("int4_wo", "w4a8_awq")]
)
# seconds a (shape, recipe) needs from checkpoint to closed engine, its c8/c64 graph compiles included (H200,
# 2026-12-03: 120-150 s per 8B recipe); the old program extra
ESTIMATE_S = {"8b": 130.0, "1b": 45.0, "old": 15.0, "hf": 120.0}
LIMITS = {"max_batch_size": 64, "max_input_len": 256, "max_seq_len": 512, "max_num_tokens": 4096}
PROMPT, NEW_TOKENS, CONC_TOKENS = 32, 64, 64
TINY = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# kernels that are a linear layer's GEMV/GEMM (cuBLAS names as engine_gpu_profile, plus kiln's and tinygemm)
GEMV_HINTS = (*GEMM_HINTS, "tinygemm", "_qgemv", "_qmm", "_gemv_kernel", "int4pack", "_dequant", "mul_sum")


def config(size: str, tiny: bool) -> dict:
    if tiny:
        return TINY
    if size == "8b":
        return FAMILY_SHAPES["llama3.1-8b"]["config"]
    return {**SHAPE_1B, "rms_norm_eps": 1e-5}


def build_model(size: str, tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no float32 copy of 8B parameters
    try:
        with torch.device("cpu" if tiny else "cuda"), torch.no_grad():
            return LlamaForCausalLM(
                LlamaConfig(**config(size, tiny), architectures=["LlamaForCausalLM"])
            ).eval()
    finally:
        torch.set_default_dtype(default)


def target(tiny: bool) -> Target:
    if tiny:
        return Target(name="bench-cpu", backend="torch", device="cpu", dtype="bfloat16", limits=LIMITS)
    major, minor = torch.cuda.get_device_capability()
    gpu = next(
        (g for g in ("h200", "h100", "b200", "a100", "l40s") if g in torch.cuda.get_device_name().lower()),
        None,
    )
    return Target(
        name="bench-recipes-cuda",
        backend="torch",
        device="cuda",
        gpu=gpu,
        sm=f"sm{major}{minor}",
        dtype="bfloat16",
        limits=LIMITS,
        work_pool="bench",
    )


def write_checkpoint(model, out_dir: Path, recipe: str) -> Path:
    if recipe in ("bf16", "fp8"):
        return write_float_checkpoint(model, out_dir, recipe == "fp8")
    return write_quant_checkpoint(model, out_dir, recipe)


def decode_bytes(engine, batch: int) -> dict:
    """``step_bytes`` with the weights counted as each linear's kernel reads them at ``batch`` rows
    (``QuantLinear.read_bytes``: an int4 linear keeping both ModelOpt's and tinygemm's copies reads one)."""
    out = step_bytes(engine, PROMPT, NEW_TOKENS, batch)
    linears = [m for m in engine.model.modules() if isinstance(m, QuantLinear)]
    stored = sum(
        t.numel() * t.element_size() for m in linears for t in vars(m).values() if isinstance(t, torch.Tensor)
    )
    read = sum(m.read_bytes(batch) for m in linears)
    out["weights_read"] -= stored - read
    out["bytes_per_step"] = out["weights_read"] + out["kv_read"]
    out["linear_bytes_stored"], out["linear_bytes_read"] = stored, read
    return out


def kernel_profile(
    engine, out_dir: Path, name: str, length: int = 128, steps: int = 5, batch: int = 1
) -> dict:
    """Kernels of ``steps`` replayed decode steps of ``batch`` rows (``torch.profiler``): the top rows per
    step and the GEMV share; the full table written to ``out_dir/name``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    rows_in = engine._batch([batch - 1])  # the graph bucket that serves ``batch`` rows
    engine._inputs[0, :rows_in], engine._inputs[1, :rows_in] = 1, length - 40
    with torch.inference_mode():
        engine._decode(rows_in, length)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine._decode(rows_in, length)
            if cuda:
                torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = (
            (getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0))
            if cuda
            else e.self_cpu_time_total
        )
        if t:
            rows.append(
                {"kernel": e.key[:160], "calls": round(e.count / steps, 1), "us": round(t / steps, 1)}
            )
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    gemv = sum(r["us"] for r in rows if any(h in r["kernel"].lower() for h in GEMV_HINTS))
    lines = [
        f"{name}: {total:.1f} us of kernels per batch-{batch} step, GEMV/GEMM {gemv:.1f} us",
        f"{'us/step':>9} {'calls':>6}  kernel",
    ]
    lines += [f"{r['us']:9.1f} {r['calls']:6.1f}  {r['kernel']}" for r in rows[:40]]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return {
        "batch": batch,
        "kernel_us_per_step": round(total, 1),
        "gemv_us_per_step": round(gemv, 1),
        "gemv_share": round(gemv / total, 3) if total else None,
        "kernels_per_step": round(sum(r["calls"] for r in rows)),
        "top": rows[:12],
        "table": f"{name}.txt",
    }


def measure(
    run: Run,
    engine,
    tag: str,
    size: str,
    read_bps: float | None,
    vocab: int,
    tiny: bool,
    concurrencies: tuple[int, ...],
    profile_dir: Path | None,
) -> dict:
    row: dict = {}
    nbytes = decode_bytes(engine, 1)
    row["bytes"] = nbytes
    row["batch1"] = run.stage(
        f"{tag}/batch1",
        measure_batch1,
        engine,
        vocab,
        PROMPT,
        NEW_TOKENS,
        2,
        read_bps,
        nbytes["bytes_per_step"],
    )
    if profile_dir is not None:
        row["profile"] = run.stage(
            f"{tag}/profile", kernel_profile, engine, profile_dir, tag.replace("/", "_")
        )
    for conc in concurrencies:
        row[f"c{conc}"] = run.stage(
            f"{tag}/c{conc}",
            concurrency,
            engine,
            vocab,
            conc,
            conc,
            PROMPT,
            CONC_TOKENS,
            read_bps,
            decode_bytes(engine, conc)["bytes_per_step"],
        )
        if profile_dir is not None and conc == concurrencies[0]:  # a small batch's step (its graph built now)
            row["profile_small"] = run.stage(
                f"{tag}/profile_c{conc}",
                kernel_profile,
                engine,
                profile_dir,
                f"{tag.replace('/', '_')}_c{conc}",
                batch=conc,
            )
    return row


def bench_recipe(
    run: Run, size: str, recipe: str, model, work: Path, read_bps: float | None, tiny: bool, out: Path
) -> dict:
    backend = TorchBackend()
    tag = f"{size}/{recipe}"
    row: dict = {"algo": ALGO[recipe]}
    ckpt = run.stage(f"{tag}/checkpoint", write_checkpoint, model, work / f"ck-{size}-{recipe}", recipe)
    if ckpt is None:
        return row
    t0 = time.perf_counter()
    eng_dir = run.stage(
        f"{tag}/compile",
        backend.compile,
        ckpt,
        target(tiny),
        work / f"eng-{size}-{recipe}",
        {"model_sha": f"random-llama-{size}-shape"},
        precompile=False,
    )
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(ckpt, ignore_errors=True)
    if eng_dir is None:
        return row
    manifest = json.loads((eng_dir / "kiln-engine.json").read_text())
    gemv = manifest["program"].get("gemv", {})
    row["program_gemv"] = {k: v for k, v in gemv.items() if k in integer_keys(gemv)}
    row["engine_bytes"] = sum(p.stat().st_size for p in eng_dir.glob("*.safetensors"))
    vocab = model.config.vocab_size
    concs = (8, 64) if not tiny else (2, 4)
    programs = [("new", None)]
    if size == "1b" and row["program_gemv"]:
        programs.append(("old", {"gemv": {k: v for k, v in gemv.items() if k not in row["program_gemv"]}}))
    for name, program in programs:
        if name == "old" and not run_fits(run, ESTIMATE_S["old"]):
            run.results["errors"][f"{tag}/old"] = "skipped: time budget left is under its estimate"
            continue
        engine = run.stage(f"{tag}/load_{name}", backend.load, eng_dir, program=program)
        if engine is None:
            continue
        try:
            prof = out / "profiles" if size == "8b" and name == "new" else None
            # the old program at concurrency 64 only: validation's tokens/s is the sweep's peak
            row[name] = measure(
                run,
                engine,
                f"{tag}/{name}",
                size,
                read_bps,
                vocab,
                tiny,
                concs if name == "new" else concs[-1:],
                prof,
            )
        finally:
            engine.close()
            del engine
            gc.collect()
            if not tiny:
                torch.cuda.empty_cache()
    shutil.rmtree(eng_dir, ignore_errors=True)
    return row


def run_fits(run: Run, seconds: float) -> bool:
    return time.perf_counter() - run.start + seconds <= run.budget


def hf_static_compiled(model, new_tokens: int) -> dict:
    """HF transformers generate with a static cache and its forward compiled (torch.compile, CUDA graphs
    through mode reduce-overhead), batch 1, greedy: the baseline the issue names."""
    ids = torch.randint(
        0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1)
    ).to(model.device)
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    kwargs = {
        "do_sample": False,
        "cache_implementation": "static",
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
    }
    t0 = time.perf_counter()
    for _ in range(2):  # compile, then capture
        model.generate(ids, **kwargs)
    first = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "tok_s": round(new_tokens / dt, 1),
        "new_tokens": new_tokens,
        "seconds": round(dt, 3),
        "warmup_s": round(first, 1),
        "note": "prefill of the 32-token prompt included in the timed generate",
    }


def peak_tok_s(row: dict, program: str) -> float | None:
    """Validation's ``tokens_per_s``: the peak output tokens/s over the measured concurrencies."""
    side = row.get(program) or {}
    values = [(side.get(f"c{c}") or {}).get("end_to_end_tok_s") for c in (1, 8, 64)]
    values.append((side.get("batch1") or {}).get("tok_s"))
    values = [v for v in values if v]
    return max(values) if values else None


def recommendations(results: dict) -> dict:
    """Validation's pick (``kiln.validation.gates.recommend``, ``select: fastest``) among the 1B recipes
    measured here, with the old program's numbers (the torch path for the integer recipes; bf16, FP8 and
    W4A8 have no integer kernels, so their old = new) and with the new ones. Random weights: every
    recipe is treated as passing its accuracy gates (they cannot be judged here)."""
    from kiln.validation.gates import recommend

    rows = results.get("1b") or {}
    out: dict = {}
    for basis, pick in (
        ("peak_tok_s", peak_tok_s),
        ("batch1_tok_s", lambda r, p: ((r.get(p) or {}).get("batch1") or {}).get("tok_s")),
    ):
        for program in ("old", "new"):
            cands = {}
            for recipe, row in rows.items():
                side = program if program == "new" or row.get("program_gemv") else "new"
                value = pick(row, side)
                if value:
                    cands[recipe] = {"tokens_per_s": value, "size_bytes": row.get("engine_bytes")}
            out[f"{basis}_{program}"] = {
                "recommended": recommend(cands, "fastest"),
                "candidates": {k: v["tokens_per_s"] for k, v in cands.items()},
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--tiny", action="store_true", help="CPU, a tiny Llama: checks the bench's logic")
    parser.add_argument("--skip", default="", help="comma-separated: size/recipe (8b/fp8), hf")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    run = Run(args.out, args.budget_s, name="engine_gpu_recipes.json")
    r = run.results
    tiny = args.tiny
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "weights": "random",
        "limits": LIMITS,
        "prompt_tokens": PROMPT,
        "new_tokens": NEW_TOKENS,
    }
    if not tiny:
        import transformers
        import triton

        env.update(
            gpu=torch.cuda.get_device_name(),
            capability=list(torch.cuda.get_device_capability()),
            cuda=torch.version.cuda,
            triton=triton.__version__,
            transformers=transformers.__version__,
        )
    r["env"] = env
    bw = None if tiny else run.stage("read_bandwidth", read_bandwidth)
    r["read_bandwidth"] = bw
    read_bps = bw and bw["read_Bps"]
    # /dev/shm where it holds the largest checkpoint + engine pair (8B bf16: 2 x 16 GB), else local disk
    work = Path(tempfile.mkdtemp(prefix="kiln-recipes-")) if tiny else work_root(34 << 30)
    models: dict = {}
    try:
        for size, recipe in PLAN:
            tag = f"{size}/{recipe}"
            if tag in skip:
                continue
            if not run_fits(run, ESTIMATE_S[size]):
                r["errors"][tag] = "skipped: time budget left is under its estimate"
                continue
            if size not in models:
                for other in list(models):  # one HF model on the device at a time
                    del models[other]
                gc.collect()
                if not tiny:
                    torch.cuda.empty_cache()
                models[size] = run.stage(f"{size}/build_model", build_model, size, tiny)
            if models[size] is None:
                continue
            r.setdefault(size, {})[recipe] = bench_recipe(
                run, size, recipe, models[size], work, read_bps, tiny, args.out
            )
            run.save()
        if not tiny and "hf" not in skip:
            if run_fits(run, ESTIMATE_S["hf"]):
                model = models.get("8b")
                models.clear()
                gc.collect()
                if model is None:
                    model = run.stage("8b/build_model_hf", build_model, "8b", tiny)
                if model is not None:
                    r["hf_static_compile_8b_bf16"] = run.stage(
                        "8b/hf_static_compile", hf_static_compiled, model, NEW_TOKENS
                    )
            else:
                r["errors"]["8b/hf_static_compile"] = "skipped: time budget left is under its estimate"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["w4a8_awq_note"] = (
        "the torch engine runs W4A8_AWQ as an FP8 engine: its int4 x group-scale weights are "
        "re-quantized to FP8 with weights_scaling_factor_2 at load (linear.runtime_tensors), "
        "exactly what its fake-quant model computes, then the FP8 GEMM; no int4 x FP8 kernel"
    )
    r["recommendation_1b"] = run.stage("recommendation_1b", recommendations, r)  # needs jsonschema there
    r["total_s"] = round(time.perf_counter() - run.start, 1)
    run.save()
    write_markdown(r, args.out / "engine_gpu_recipes.md")


# -- report ---------------------------------------------------------------------------------------------


def _get(d: dict | None, *path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def write_markdown(r: dict, path: Path) -> None:
    env = r["env"]
    bw = _get(r, "read_bandwidth", "read_Bps")
    lines = [
        f"# kiln torch engine, every recipe, on {env.get('gpu', 'CPU (tiny logic check)')} "
        f"(torch {env['torch']}, Triton {env.get('triton', '-')})",
        "",
        "RANDOM WEIGHTS (speed only). Batch 1: 32-token prompt, 64 new tokens, median of 2 runs; "
        "concurrency C: C requests x 64 new tokens, end to end (prefill included). % of read bandwidth: "
        "bytes one step reads (the weight copy each linear's kernel reads + scales + embedding row + K/V) / "
        f"step time / the read bandwidth measured in this run ({bw / 1e12:.2f} TB/s)."
        if bw
        else "",
        "",
        f"Command: `{env['command']}`",
        "",
    ]
    for size in ("8b", "1b"):
        rows = r.get(size) or {}
        if not rows:
            continue
        base = _get(rows, "bf16", "new", "batch1", "tok_s")
        b8, b64 = (
            _get(rows, "bf16", "new", "c8", "end_to_end_tok_s"),
            _get(rows, "bf16", "new", "c64", "end_to_end_tok_s"),
        )
        lines += [
            f"## Llama-{'3.1-8B' if size == '8b' else '3.2-1B'} shape",
            "",
            "| recipe | batch 1 tok/s | vs bf16 | bytes / step | % of read bandwidth | c8 tok/s | vs bf16 | "
            "c64 tok/s | vs bf16 |" + (" old program batch 1 / c64 tok/s |" if size == "1b" else ""),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if size == "1b" else ""),
        ]
        for recipe in RECIPES:
            row = rows.get(recipe)
            if not row:
                continue
            new = row.get("new") or {}
            t1, c8, c64 = (
                _get(new, "batch1", "tok_s"),
                _get(new, "c8", "end_to_end_tok_s"),
                _get(new, "c64", "end_to_end_tok_s"),
            )

            def ratio(a, b):
                return f"{a / b:.2f}x" if a and b else "-"

            nbytes = _get(new, "bytes", "bytes_per_step")
            line = (
                (
                    f"| {recipe} | {t1 or '-'} | {ratio(t1, base)} | {nbytes / 1e9:.3f} GB | "
                    f"{_get(new, 'batch1', 'roofline_pct') or '-'}% | {c8 or '-'} | {ratio(c8, b8)} | "
                    f"{c64 or '-'} | {ratio(c64, b64)} |"
                )
                if nbytes
                else f"| {recipe} | - | - | - | - | - | - | - | - |"
            )
            if size == "1b":
                old = row.get("old") or {}
                line += (
                    f" {_get(old, 'batch1', 'tok_s') or '-'} / "
                    f"{_get(old, 'c64', 'end_to_end_tok_s') or '-'} |"
                    if old
                    else " - |"
                )
            lines.append(line)
        lines.append("")
        for recipe in RECIPES:
            for key in ("profile", "profile_small"):
                prof = _get(rows, recipe, "new", key)
                if not prof:
                    continue
                what = f"one batch-{prof.get('batch', 1)} step"
                top = "; ".join(f"{t['kernel'][:60]} {t['us']} us x{t['calls']}" for t in prof["top"][:5])
                lines.append(
                    f"- {recipe} profile ({what}): {prof['kernel_us_per_step']} us of kernels, "
                    f"GEMV/GEMM {prof['gemv_us_per_step']} us ({100 * (prof['gemv_share'] or 0):.0f}%), "
                    f"{prof['kernels_per_step']} kernels; top: {top} (`profiles/{prof['table']}`)"
                )
        lines.append("")
        for recipe in RECIPES:
            chosen = _get(rows, recipe, "program_gemv")
            if chosen:
                lines.append(f"- {recipe} `program.gemv`: `{json.dumps(chosen)}`")
        lines.append("")
    hf = r.get("hf_static_compile_8b_bf16")
    if hf:
        base = _get(r, "8b", "bf16", "new", "batch1", "tok_s")
        lines += [
            "HF transformers, static cache + torch.compile (reduce-overhead), 8B bf16, batch 1: "
            f"{hf['tok_s']} tok/s" + (f" (kiln bf16 {base / hf['tok_s']:.2f}x)" if base else ""),
            "",
        ]
    rec = r.get("recommendation_1b") or {}
    if rec:
        lines += [
            "## Validation's recommended recipe, 1B shape (`kiln.validation.gates.recommend`, select "
            "fastest)",
            "",
            "Random weights: every recipe counted as passing its accuracy gates. Old program: the integer "
            "recipes on the torch path.",
            "",
            "| basis | old program | new program |",
            "| --- | --- | --- |",
        ]
        for basis in ("peak_tok_s", "batch1_tok_s"):
            old, new = rec.get(f"{basis}_old") or {}, rec.get(f"{basis}_new") or {}
            lines.append(
                f"| {basis} | {old.get('recommended')} ({old.get('candidates')}) | "
                f"{new.get('recommended')} ({new.get('candidates')}) |"
            )
        lines.append("")
    lines += [f"w4a8_awq: {r.get('w4a8_awq_note')}", ""]
    if r.get("errors"):
        lines += ["Errors / skipped stages:", ""] + [
            f"- {k}: {v.splitlines()[0][:300]}" for k, v in r["errors"].items()
        ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
