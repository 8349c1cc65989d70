"""kiln's integer-weight decode kernels on one CUDA GPU (run by hand; not a test).

Engines: a random-weight Llama-3.2-1B-shaped model (``engine_gpu.py``'s ``SHAPE``) written as TensorRT-LLM
checkpoints the way ModelOpt exports them (bf16; W8A16 per-channel; W4A16_AWQ group 128 with pre-quant
scales; W8A8 SmoothQuant per-channel with pre-quant scales and a calibrated per-tensor activation scale),
compiled with ``TorchBackend`` (which tunes the kernels per weight shape and records them in
``program.gemv``) and each loaded twice: the built program (``new``: ``kernels.qmatmul`` /
``torch._int_mm`` where the build chose them) and the same program with the integer-weight choices
removed (``old``: the torch path, the whole weight dequantized to bf16 in every call). Reported: batch-1
decode tok/s of both, bytes read per step, % of the copy-bandwidth roofline, and the two programs'
teacher-forced logits against each other.

Microbench: ``linear.tune_quant``'s race per weight shape (Llama-3.2-1B and Llama-3.1-8B shapes, each
chain over distinct weights in a CUDA graph) at 1, 16 and (SmoothQuant) 64 rows, with the bf16 GEMV of the
same shape (best of cuBLAS and kiln's Triton GEMV) beside it; from the 8B times, the step's GEMV time per
recipe and the batch-1 ratios it allows.

    python bench/engine_gpu_quant.py --out $OUT      # writes engine_gpu_quant.json + engine_gpu_quant.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_gpu import (  # noqa: E402
    SHAPE,
    Run,
    _activation_amax,
    build_hf,
    checkpoint_config,
    copy_bandwidth,
    engine_batch1,
    target,
    teacher_forced,
    weight_read_bytes,
)

from kiln.engine.torch import TorchBackend, kernels  # noqa: E402
from kiln.engine.torch.linear import tune_quant  # noqa: E402

GROUP = 128
RECIPES = {"bf16": None, "int4_awq": "W4A16_AWQ", "int8_wo": "W8A16", "int8_sq": "W8A8_SQ_PER_CHANNEL"}
KIND = {"int4_awq": "int4", "int8_wo": "int8_wo", "int8_sq": "int8_sq"}
# every recipe write_checkpoint can write (engine_gpu_recipes.py runs them all)
ALGOS = {**RECIPES, "int4_wo": "W4A16", "w4a8_awq": "W4A8_AWQ"}
INT4 = ("int4_awq", "int4_wo", "w4a8_awq")
PQS = ("int8_sq", "int4_awq", "w4a8_awq")  # the recipes whose export carries pre-quant (smoothing) scales
# the integer engines keep fc (gate_proj) and gate (up_proj) apart; a bf16 engine fuses them (gate_up)
SHAPES = {
    "1b": {"hidden": 2048, "ffn": 8192, "qkv": 3072, "layers": 16},
    "8b": {"hidden": 4096, "ffn": 14336, "qkv": 6144, "layers": 32},
}
VOCAB = SHAPE["vocab_size"]


def linear_shapes(size: str) -> dict[str, tuple[int, int]]:
    s = SHAPES[size]
    return {
        "qkv": (s["qkv"], s["hidden"]),
        "dense": (s["hidden"], s["hidden"]),
        "fc": (s["ffn"], s["hidden"]),
        "proj": (s["hidden"], s["ffn"]),
    }


# -- checkpoints ----------------------------------------------------------------------------------------


def write_checkpoint(model, out_dir: Path, recipe: str) -> Path:
    """The TensorRT-LLM checkpoint ModelOpt's export writes for ``recipe`` (names, fused qkv, fc = gate_proj,
    gate = up_proj; int4 packed ``[out/2, in]``, low nibble = even row; pre-quant scales folded out of the
    weight; lm_head excluded). Random-weight quantization: the numbers are for speed, not accuracy."""
    from safetensors.torch import save_file

    cfg = model.config
    sd = model.state_dict()
    algo = ALGOS[recipe]
    amax = _activation_amax(model) if recipe in ("int8_sq", "w4a8_awq") else {}
    g = torch.Generator(device=model.device).manual_seed(0)
    tensors: dict[str, torch.Tensor] = {
        "transformer.vocab_embedding.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["model.embed_tokens.weight"].clone(),
    }
    pqs_by_input: dict[str, torch.Tensor] = {}

    def linear(name: str, weights: list[torch.Tensor], source: str) -> None:
        w = torch.cat(weights).float()
        if algo is None:
            tensors[f"{name}.weight"] = w.to(torch.bfloat16)
            return
        if recipe in PQS:  # one smoothing vector per input (fc and gate share theirs)
            pqs = pqs_by_input.setdefault(
                source, 2.0 ** (torch.rand(w.shape[1], generator=g, device=model.device) - 0.5)
            )
            w = w / pqs[None, :]
            tensors[f"{name}.prequant_scaling_factor"] = pqs.to(torch.bfloat16)
        if recipe in INT4:
            n, k = w.shape
            groups = w.view(n, k // GROUP, GROUP)
            scale = groups.abs().amax(-1).clamp_min(1e-8) / 7
            q = torch.round(groups / scale[..., None]).clamp(-8, 7).to(torch.int16).view(n, k)
            packed = (q[0::2] & 0xF) | ((q[1::2] & 0xF) << 4)
            tensors[f"{name}.weight"] = packed.to(torch.uint8).view(torch.int8)
            tensors[f"{name}.weights_scaling_factor"] = scale
            if recipe == "w4a8_awq":  # the FP8 re-quantization scale of q * scale, and FP8 activations
                tensors[f"{name}.weights_scaling_factor_2"] = (scale.amax() * 7 / 448).reshape(1)
                x_amax = amax[source] * pqs_by_input[source].max()
                tensors[f"{name}.activation_scaling_factor"] = (x_amax / 448).reshape(1).float()
            return
        scale = w.abs().amax(1).clamp_min(1e-8) / 127
        tensors[f"{name}.weight"] = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        tensors[f"{name}.weights_scaling_factor"] = scale
        if recipe == "int8_sq":
            x_amax = amax[source] * pqs_by_input[source].max()
            tensors[f"{name}.activation_scaling_factor"] = (x_amax / 127).reshape(1).float()

    for i in range(cfg.num_hidden_layers):
        hf, trt = f"model.layers.{i}", f"transformer.layers.{i}"
        tensors[f"{trt}.input_layernorm.weight"] = sd[f"{hf}.input_layernorm.weight"]
        tensors[f"{trt}.post_layernorm.weight"] = sd[f"{hf}.post_attention_layernorm.weight"]
        attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
        linear(f"{trt}.attention.qkv", [sd[f"{attn}.{p}_proj.weight"] for p in "qkv"], f"{attn}.q_proj")
        linear(f"{trt}.attention.dense", [sd[f"{attn}.o_proj.weight"]], f"{attn}.o_proj")
        linear(f"{trt}.mlp.fc", [sd[f"{mlp}.gate_proj.weight"]], f"{mlp}.gate_proj")
        linear(f"{trt}.mlp.gate", [sd[f"{mlp}.up_proj.weight"]], f"{mlp}.gate_proj")
        linear(f"{trt}.mlp.proj", [sd[f"{mlp}.down_proj.weight"]], f"{mlp}.down_proj")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, out_dir / "rank0.safetensors")
    quant = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"] if algo else []}
    if recipe in INT4:
        quant.update(group_size=GROUP, has_zero_point=False, pre_quant_scale=recipe in PQS)
    config = checkpoint_config(cfg, quant)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# -- microbench -----------------------------------------------------------------------------------------


def bf16_gemv_us(n: int, k: int) -> dict:
    """The bf16 GEMV of one shape: cuBLAS and the best of kiln's Triton GEMV candidates (us)."""
    times = kernels._time_gemv(False, n, k, torch.device("cuda"), torch.bfloat16)
    copies = max(2, min(16, (256 << 20) // (n * k * 2)))  # the chain _time_gemv timed (ms per chain)
    times = {cfg: ms / copies for cfg, ms in times.items()}
    best = min(times, key=times.get)
    return {
        "cublas_us": round(1e3 * times[None], 2),
        "best_us": round(1e3 * times[best], 2),
        "best": "cublas" if best is None else "x".join(map(str, best)),
        "bytes": n * k * 2,
    }


def microbench(size: str) -> dict:
    device = torch.device("cuda")
    shapes = linear_shapes(size)
    s = SHAPES[size]
    out: dict = {"bf16": {}, "quant": {}}
    for name, (n, k) in {
        **shapes,
        "gate_up": (2 * s["ffn"], s["hidden"]),
        "lm_head": (VOCAB, s["hidden"]),
    }.items():
        out["bf16"][name] = bf16_gemv_us(n, k)
    for recipe, kind in KIND.items():
        report: dict = {}
        group = GROUP if kind == "int4" else 0
        tune_quant({(kind, n, k, group) for n, k in shapes.values()}, device, torch.bfloat16, report=report)
        for rep in report.values():  # ms per chain of ``copies`` distinct weights -> ms per weight
            for bucket in ("m1", "m16", "m64", "large"):
                if bucket in rep:
                    rep[bucket] = {
                        label: ms / rep["copies"] if isinstance(ms, float) else ms
                        for label, ms in rep[bucket].items()
                    }
        out["quant"][recipe] = {
            name: report[kernels.quant_key(kind, n, k, group)] for name, (n, k) in shapes.items()
        }
    out["step"] = step_projection(size, out)
    return out


def _best_ms(bucket: dict) -> tuple[str, float]:
    timed = {label: ms for label, ms in bucket.items() if isinstance(ms, float)}
    label = min(timed, key=timed.get)
    return label, timed[label]


def step_projection(size: str, bench: dict) -> dict:
    """One batch-1 step's GEMV time per recipe from the per-shape chains (chosen kernel; the lm_head bf16)."""
    layers = SHAPES[size]["layers"]
    bf = bench["bf16"]
    head = bf["lm_head"]["best_us"]
    out = {
        "bf16": {
            "gemv_us": round(
                layers * sum(bf[n]["best_us"] for n in ("qkv", "dense", "gate_up", "proj")) + head, 1
            )
        }
    }
    for recipe, rows in bench["quant"].items():
        new = layers * sum(_best_ms(rows[n]["m1"])[1] * 1e3 * (2 if n == "fc" else 1) for n in rows) + head
        old = layers * sum(rows[n]["m1"]["torch"] * 1e3 * (2 if n == "fc" else 1) for n in rows) + head
        out[recipe] = {"gemv_us": round(new, 1), "torch_path_gemv_us": round(old, 1)}
    return out


# -- engines --------------------------------------------------------------------------------------------


def integer_keys(gemv: dict) -> set[str]:
    return {key for key in gemv if key.split(":")[0] in ("int8_wo", "int8_sq") or key.startswith("int4_g")}


def engines(run: Run, model, work: Path, new_tokens: int, bandwidth: float, skip: set[str]) -> dict:
    backend = TorchBackend()
    lineage = {"model_sha": "random-llama-3.2-1b-shape"}
    results: dict = {}
    for recipe in RECIPES:
        if recipe in skip:
            continue
        ckpt = run.stage(f"checkpoint_{recipe}", write_checkpoint, model, work / f"ck-{recipe}", recipe)
        if ckpt is None:
            continue
        eng_dir = run.stage(
            f"compile_{recipe}",
            backend.compile,
            ckpt,
            target(),
            work / f"eng-{recipe}",
            lineage,
            precompile=False,
        )
        if eng_dir is None:
            continue
        row: dict = {}
        results[recipe] = row
        built = json.loads((eng_dir / "kiln-engine.json").read_text())["program"]
        row["program_gemv"] = built.get("gemv", {})
        quant = integer_keys(row["program_gemv"])
        programs = [("new", None)]
        if quant:
            programs.append(
                ("old", {"gemv": {k: v for k, v in row["program_gemv"].items() if k not in quant}})
            )
        logits = None
        for name, program in programs:
            engine = run.stage(f"load_{recipe}_{name}", backend.load, eng_dir, program=program)
            if engine is None:
                continue
            wr = weight_read_bytes(engine)
            row[name] = run.stage(f"batch1_{recipe}_{name}", engine_batch1, engine, new_tokens, wr, bandwidth)
            if row[name] and quant:
                # the new program's logits on its own greedy tokens; the old one fed the same
                if logits is None:
                    tokens = row[name]["token_ids"]
                    ref = torch.zeros(len(tokens), VOCAB, device="cuda")
                    forced = run.stage(f"forced_{recipe}_{name}", teacher_forced, engine, tokens, ref)
                    logits = forced and (tokens, forced.pop("logits"))
                else:
                    forced = run.stage(
                        f"forced_{recipe}_{name}", teacher_forced, engine, logits[0], logits[1]
                    )
                    if forced:
                        forced.pop("logits")
                        row["old_vs_new_teacher_forced"] = forced
            if row[name]:
                row[name]["weight_read_bytes"] = wr
                row[name].pop("token_ids", None)
            engine.close()
            del engine
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget-s", type=float, default=330)
    parser.add_argument(
        "--skip", default="", help="comma-separated: micro_1b, micro_8b, engines, or a recipe name"
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    run = Run(args.out, args.budget_s, name="engine_gpu_quant.json")
    r = run.results
    import triton

    r["env"] = {
        "gpu": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "model": "random-weight Llama-3.2-1B shape",
        "int4_group": GROUP,
    }
    r["copy_bandwidth_Bps"] = bw = run.stage("copy_bandwidth", copy_bandwidth)
    for size in ("1b", "8b"):
        if f"micro_{size}" not in skip:
            r[f"micro_{size}"] = run.stage(f"micro_{size}", microbench, size)
    if "engines" not in skip:
        model = run.stage("build_hf", build_hf)
        if model is not None:
            work = Path(tempfile.mkdtemp(prefix="kiln-bench-quant-"))
            r["engines"] = engines(run, model, work, args.new_tokens, bw, skip)
    r["total_s"] = round(time.perf_counter() - run.start, 1)
    run.save()
    write_markdown(r, args.out / "engine_gpu_quant.md")


# -- report ---------------------------------------------------------------------------------------------


def _us(ms) -> str:
    return f"{1e3 * ms:.2f}" if isinstance(ms, float) else "-"


def projection_rest_us(r: dict) -> float | None:
    """What the 1B bf16 engine's measured step spends beyond its GEMV chains (the microbench's sum)."""
    bf16 = ((r.get("engines") or {}).get("bf16") or {}).get("new") or {}
    micro = r.get("micro_1b") or {}
    if not bf16 or not micro:
        return None
    return 1e3 * bf16["step_ms"] - micro["step"]["bf16"]["gemv_us"]


def write_markdown(r: dict, path: Path) -> None:
    env = r["env"]
    bw = r.get("copy_bandwidth_Bps") or 0
    lines = [
        f"# kiln integer-weight decode kernels on {env['gpu']} (torch {env['torch']}, Triton "
        f"{env['triton']})",
        "",
        f"Copy bandwidth {bw / 1e12:.2f} TB/s. Command: `{env['command']}`",
        "",
    ]
    eng = r.get("engines") or {}
    if eng:
        base = (eng.get("bf16") or {}).get("new") or {}
        lines += [
            "## Batch-1 decode, random-weight Llama-3.2-1B shape",
            "",
            "`old`: the torch path (the whole weight dequantized to bf16 each call); `new`: the built "
            "program.",
            "",
            "| recipe | weights read / step | old tok/s | new tok/s | new / old | new / bf16 | % of "
            "roofline |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for recipe, row in eng.items():
            new, old = row.get("new") or {}, row.get("old") or {}
            if not new:
                continue
            ratio = f"{new['tok_s'] / old['tok_s']:.2f}x" if old else "-"
            vs = f"{new['tok_s'] / base['tok_s']:.2f}x" if base else "-"
            lines.append(
                f"| {recipe} | {new['weight_read_bytes'] / 1e9:.3f} GB | {old.get('tok_s', '-')} | "
                f"{new['tok_s']} | {ratio} | {vs} | {new.get('hbm_roofline_pct', '-')}% |"
            )
        lines.append("")
        for recipe, row in eng.items():
            if row.get("old_vs_new_teacher_forced"):
                t = row["old_vs_new_teacher_forced"]
                lines.append(
                    f"- {recipe}: old vs new program, teacher-forced over {t['steps']} steps: top-1 "
                    f"agreement {t['top1_agreement']}, max logit gap {t['max_abs_logit_gap']} (mean "
                    f"{t['mean_abs_logit_gap']})"
                )
        lines.append("")
        for recipe, row in eng.items():
            chosen = {
                k: v
                for k, v in row.get("program_gemv", {}).items()
                if k in integer_keys(row.get("program_gemv", {}))
            }
            if chosen:
                lines.append(f"- {recipe} `program.gemv`: `{json.dumps(chosen)}`")
        lines.append("")
    for size in ("1b", "8b"):
        micro = r.get(f"micro_{size}")
        if not micro:
            continue
        lines += [
            f"## Per-shape GEMV, Llama {size.upper()} shapes (us per weight; chain over distinct weights in "
            "a CUDA graph)",
            "",
            "| recipe | linear | N x K | bytes | bf16 best us | torch path us (1 row) | kernel us (1 row) | "
            "kernel GB/s | vs bf16 | chosen (1 row) | torch path / kernel us (16 rows) | chosen (16 rows) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for recipe, rows in micro["quant"].items():
            for name, rep in rows.items():
                label, ms = _best_ms(rep["m1"])
                bf = micro["bf16"][name]
                label16, ms16 = _best_ms(rep["m16"])
                lines.append(
                    f"| {recipe} | {name} | {rep['n']}x{rep['k']} | {rep['bytes'] / 1e6:.1f} MB | "
                    f"{bf['best_us']} | {_us(rep['m1'].get('torch'))} | {1e3 * ms:.2f} | "
                    f"{rep['bytes'] / (ms * 1e-3) / 1e9:.0f} | {bf['best_us'] / (1e3 * ms):.2f}x | {label} "
                    f"| {_us(rep['m16'].get('torch'))} / {1e3 * ms16:.2f} | {label16} |"
                )
        sq = micro["quant"].get("int8_sq") or {}
        big = {name: rep.get("m64") for name, rep in sq.items() if rep.get("m64")}
        if big:
            lines += [
                "",
                "int8_sq at 64 rows, torch path vs `torch._int_mm` vs the fastest option (us): "
                + ", ".join(
                    f"{name} {_us(b.get('torch'))} vs {_us(b.get('int_mm'))} vs {_best_ms(b)[0]} "
                    f"{1e3 * _best_ms(b)[1]:.2f}"
                    for name, b in big.items()
                ),
            ]
        step = micro["step"]
        lines += [
            "",
            f"One step's GEMV time at this shape ({SHAPES[size]['layers']} layers + bf16 lm_head, sum of the "
            "chains above): "
            + ", ".join(
                f"{recipe} {v['gemv_us']} us"
                + (f" (torch path {v['torch_path_gemv_us']} us)" if "torch_path_gemv_us" in v else "")
                for recipe, v in step.items()
            ),
            "",
            "GEMV-only ratio to bf16: "
            + ", ".join(
                f"{recipe} {step['bf16']['gemv_us'] / v['gemv_us']:.2f}x"
                for recipe, v in step.items()
                if recipe != "bf16"
            ),
            "",
        ]
        rest = projection_rest_us(r)
        if rest is not None:
            scaled = rest * SHAPES[size]["layers"] / SHAPES["1b"]["layers"]
            steps = {recipe: v["gemv_us"] + scaled for recipe, v in step.items()}
            lines += [
                "Projected batch-1 step: the GEMVs above plus the rest of the step (attention, norms, "
                f"launch gaps) as measured on the 1B engine ({rest:.0f} us for 16 layers, scaled by layers: "
                f"{scaled:.0f} us): "
                + ", ".join(
                    f"{recipe} {1e6 / us:.0f} tok/s"
                    + ("" if recipe == "bf16" else f" ({steps['bf16'] / us:.2f}x bf16)")
                    for recipe, us in steps.items()
                ),
                "",
            ]
    if r.get("errors"):
        lines += ["Errors / skipped stages:", ""] + [
            f"- {k}: {v.splitlines()[0][:300]}" for k, v in r["errors"].items()
        ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
