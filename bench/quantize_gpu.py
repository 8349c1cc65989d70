"""GPU benchmark: ModelOpt calibration + export time and peak memory per recipe through ``kiln.quantize``.

The model is Llama-3.2-1B-shaped with RANDOM weights (hidden 2048, 16 layers, 32/8 heads, ffn 8192,
vocab 128256, bf16): right for time and memory, meaningless for accuracy (SmolLM2 on CPU is for that).
Calibration tokens are random ids too. Each invocation appends rows to ``--out/quantize_gpu.json``;
run it a second time for ``int4_awq`` in a fresh process to see the cached ``modelopt_cuda_ext`` build.

    PYTHONPATH=. python bench/quantize_gpu.py --out DIR --recipes fp8 int4_awq nvfp4
    PYTHONPATH=. python bench/quantize_gpu.py --out DIR --recipes int4_awq --note "extension cached"
    python bench/quantize_gpu.py --out DIR --markdown   # writes quantize_gpu.md from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

SAMPLES = {"fp8": 512, "int4_awq": 128, "nvfp4": 512, "w4a8_awq": 128, "int8_sq": 512}
SEQ_LEN = 512
BATCH = 16
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
VOCAB = 128256


def build_model(path: Path) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "model.safetensors").is_file():
        return 0.0
    start = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=VOCAB,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        architectures=["LlamaForCausalLM"],
    )
    if DEVICE == "cpu":  # dry run of this script on a CPU: a 2-layer model
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 256, 512
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    return time.perf_counter() - start


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(out: Path, recipes: list[str], note: str) -> None:
    import torch

    from kiln.calibration import TokenSet, token_sha256
    from kiln.constants import torch_extensions_dir
    from kiln.profiles import Recipe
    from kiln.quantize import quantize

    model_dir = Path(os.environ.get("BENCH_MODEL_DIR", "/tmp/llama-1b-random"))
    build_s = build_model(model_dir)
    results_path = out / "quantize_gpu.json"
    data = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
    cuda = DEVICE == "cuda"
    data["device"] = torch.cuda.get_device_name() if cuda else "cpu (dry run)"
    data["model"] = "Llama-3.2-1B-shaped, random bf16 weights (2.47 GB); random calibration token ids"
    if build_s:
        data["model_build_s"] = round(build_s, 1)
    for name in recipes:
        rng = random.Random(0)
        ids = [
            [rng.randrange(VOCAB) for _ in range(SEQ_LEN)]
            for _ in range(SAMPLES.get(name, 128) if cuda else 4)
        ]
        calibration = TokenSet(ids, token_sha256(ids), "random")
        ext_before = torch_extensions_dir().exists() and any(torch_extensions_dir().rglob("*.so"))
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        work = Path("/tmp/kiln-bench-out") / name
        start = time.perf_counter()
        result = quantize(
            model_dir,
            Recipe(name=name, quantization=name),
            layouts=[(1, 1)],
            output_dir=work,
            dtype="bfloat16",
            device=DEVICE,
            lineage={"bench": "quantize_gpu"},
            calibration=calibration,
            batch_size=BATCH,
        )
        total = time.perf_counter() - start
        config = json.loads((result.trtllm_dirs["tp1pp1"] / "config.json").read_text())
        row = {
            "recipe": name,
            "note": note,
            "samples": len(ids),
            "seq_len": SEQ_LEN,
            "batch": BATCH,
            "total_s": round(total, 2),
            **{f"{k}_s": v for k, v in result.timings_s.items()},
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
            "extension_cached_before": bool(ext_before),
            "trtllm_quantization": config.get("quantization"),
            "trtllm_bytes": dir_bytes(result.trtllm_dirs["tp1pp1"]),
            "hf_files": sorted(p.name for p in result.hf_dir.iterdir()) if result.hf_dir else None,
        }
        print(json.dumps(row), flush=True)
        data["rows"].append(row)
        results_path.write_text(json.dumps(data, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)


def markdown(out: Path) -> None:
    data = json.loads((out / "quantize_gpu.json").read_text())
    lines = [
        f"# ModelOpt calibrate + export on {data['device']}",
        "",
        f"Model: {data['model']}.",
        "",
        "| recipe | note | samples x seq | load s | calibrate s | export TRT-LLM s | export HF s | total s "
        "| peak GPU GB | quant_algo |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        q = r["trtllm_quantization"] or {}
        lines.append(
            f"| {r['recipe']} | {r['note']} | {r['samples']}x{r['seq_len']} | {r.get('load_s', '')} | "
            f"{r.get('calibrate_s', '')} | {r.get('export_trtllm_s', '')} | {r.get('export_hf_s', '')} | "
            f"{r['total_s']} | {r['peak_gpu_gb']} | {q.get('quant_algo')} |"
        )
    (out / "quantize_gpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", nargs="*", default=["fp8", "int4_awq", "nvfp4"])
    parser.add_argument("--note", default="first run")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.markdown:
        markdown(args.out)
    else:
        run(args.out, args.recipes, args.note)


if __name__ == "__main__":
    main()
