"""``kiln bench ENGINE_DIR`` (in process) vs ``kiln bench --url`` against ``kiln serve`` on one CUDA GPU, same
prompts, same sweep (run by hand; not a test).

Engine: a RANDOM-WEIGHT Llama-3.2-1B-shaped model (``engine_gpu.py``'s ``SHAPE``: hidden 2048, 16 layers,
32/8 heads, ffn 8192, tied embeddings) with the vocabulary of the tokenizer it is served with (SmolLM2's,
49,152 ids, passed as ``--tokenizer``: ``kiln serve`` detokenizes what it streams, and no Llama-3 tokenizer
travels to the GPU machine), written as a bf16 TensorRT-LLM checkpoint and compiled with ``TorchBackend``
(Inductor + CUDA graphs + kiln's attention kernel; max_batch_size 64). Then ``serve_cpu.compare``: each
command its own process, one after the other, ``kiln bench ENGINE_DIR`` and, with ``kiln serve ENGINE_DIR``
on a free loopback port, ``kiln bench --url``; both run ``kiln.validation.perf.sweep``.

    python bench/serve_gpu.py --tokenizer DIR --out $OUT      # writes serve_gpu.json + serve_gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine_gpu  # noqa: E402
from serve_cpu import compare, table  # noqa: E402

from kiln.engine.torch import TorchBackend  # noqa: E402

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128}


def build_engine(out: Path, tokenizer: Path, vocab: int, tiny: bool) -> Path:
    """The random-weight engine; ``tiny``: a 2-layer model on a cpu target (a logic check of the whole run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kiln.profiles import Target

    engine_gpu.SHAPE = {**engine_gpu.SHAPE, "vocab_size": vocab, **(TINY if tiny else {})}
    if tiny:
        model = LlamaForCausalLM(LlamaConfig(**engine_gpu.SHAPE, architectures=["LlamaForCausalLM"])).to(torch.bfloat16)
        target = Target(name="cpu", dtype="bfloat16", limits={"max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128})
    else:
        model, target = engine_gpu.build_hf(), engine_gpu.target()
    checkpoint = engine_gpu.write_checkpoint(model, out / "ckpt", fp8=False)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return TorchBackend().compile(checkpoint, target, out / "engine", {"model_sha": "random"}, tokenizer_dir=tokenizer)


def overhead(run: dict) -> list[dict]:
    """Per level: HTTP output tok/s over in-process, and the TTFT p50 the server adds."""
    by_level = {p["concurrency"]: p for p in run["url"]["points"]}
    out = []
    for p in run["engine"]["points"]:
        q = by_level.get(p["concurrency"])
        if q:
            out.append({"concurrency": p["concurrency"],
                        "tok_s_ratio": round(q["output_tokens_per_s"] / p["output_tokens_per_s"], 3),
                        "tok_s_overhead_pct": round(100 * (1 - q["output_tokens_per_s"] / p["output_tokens_per_s"]), 1),
                        "ttft_p50_added_ms": round(q["ttft_ms"]["p50"] - p["ttft_ms"]["p50"], 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="HF tokenizer dir the engine is served with")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU: a logic check")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "results"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    sweep = ["-c", args.concurrency, "--input-len", str(args.input_len), "--output-len", str(args.output_len),
             "--requests", str(args.requests)]
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-serve-gpu-") as tmp:
        engine_dir = build_engine(Path(tmp), args.tokenizer, vocab, args.tiny)
        built = time.perf_counter() - started
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        run = compare(engine_dir, sweep, env, args.out)
    result = {"command": " ".join(["python bench/serve_gpu.py", *sys.argv[1:]]),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", "torch": torch.__version__, "python": platform.python_version(),
              "weights": f"random, Llama-3.2-1B shape with vocab {vocab}", "build_s": round(built, 1),
              "total_s": round(time.perf_counter() - started, 1), "overhead": overhead(run), "run": run}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_gpu.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [f"# kiln serve on {result['gpu']}: in process vs over HTTP ({result['weights']})", "",
             f"Command: `{result['command']}` (torch {result['torch']}, Python {result['python']}).", "",
             *table(run), "", "| concurrency | HTTP / in process tok/s | overhead % | TTFT p50 added ms |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {o['concurrency']} | {o['tok_s_ratio']} | {o['tok_s_overhead_pct']} | {o['ttft_p50_added_ms']} |"
              for o in result["overhead"]]
    (args.out / "serve_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
