"""Validation of bf16 and FP8 engines on one CUDA GPU, and the wall time it adds to a build (run by hand).

Model: the random-weight Llama-3.2-1B shape of ``bench/engine_gpu.py`` (so perplexity and agreement numbers
say nothing about quality: only the time and the performance sweep are the point). Held-out "text" is
random token ids in 512-token windows. Steps timed: compile (engine build incl. Inductor warm-up) and
``kiln.validation.measure_engine`` (accuracy vs the bf16 baseline + the concurrency sweep), per engine.

    python bench/validation_gpu.py --out $OUT     # writes validation_gpu.json + validation_gpu.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_gpu import SHAPE, Run, build_hf, target, write_checkpoint  # noqa: E402

from kiln.calibration import TokenSet, token_sha256  # noqa: E402
from kiln.engine.torch import TorchBackend  # noqa: E402
from kiln.profiles import Evaluation  # noqa: E402
from kiln.validation.measure import measure_engine  # noqa: E402

EVALUATION = {
    "heldout_tokens": 2048,
    "prompts": 8,
    "max_new_tokens": 32,
    "prompt_len": 128,
    "concurrency": [1, 4, 16, 64],
}


def heldout() -> TokenSet:
    g = torch.Generator().manual_seed(11)
    windows = [torch.randint(0, SHAPE["vocab_size"], (512,), generator=g).tolist() for _ in range(4)]
    return TokenSet(token_ids=windows, sha256=token_sha256(windows), source="random token ids")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--budget-s", type=float, default=520)
    args = parser.parse_args()
    run = Run(args.out, args.budget_s, "validation_gpu.json")
    r = run.results
    r["env"] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(sys.argv),
        "model": "random-weight Llama-3.2-1B shape",
        "evaluation": EVALUATION,
    }
    model = run.stage("build_hf", build_hf)
    work = Path(tempfile.mkdtemp(prefix="kiln-validation-"))
    checkpoints = {
        "bf16": run.stage("checkpoint_bf16", write_checkpoint, model, work / "ck-bf16", False),
        "fp8": run.stage("checkpoint_fp8", write_checkpoint, model, work / "ck-fp8", True),
    }
    del model
    torch.cuda.empty_cache()
    backend, evaluation, tokens = TorchBackend(), Evaluation(**EVALUATION), heldout()
    engines, r["engines"] = {}, {}
    for name, ck in checkpoints.items():
        t0 = time.perf_counter()
        engines[name] = run.stage(
            f"compile_{name}", backend.compile, ck, target(), work / f"engine-{name}", {}
        )
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        measured = run.stage(
            f"validate_{name}",
            measure_engine,
            engines[name],
            engines["bf16"],
            tokens,
            evaluation,
            output_dir=args.out / f"validation-{name}",
        )
        validate_s = time.perf_counter() - t0
        if measured is None:
            continue
        metrics, documents = measured
        document = next(iter(documents.values()))
        r["engines"][name] = {
            "compile_s": round(compile_s, 1),
            "validate_s": round(validate_s, 1),
            "validation_timings_s": document["timings_s"],
            "metrics": metrics,
        }
        run.save()
    r["total_s"] = round(time.perf_counter() - run.start, 1)
    run.save()
    write_markdown(r, args.out / "validation_gpu.md")


def write_markdown(r: dict, path: Path) -> None:
    env = r["env"]
    lines = [
        f"# kiln validation on {env['gpu']} (torch {env['torch']}, CUDA {env['cuda']})",
        "",
        f"Model: {env['model']}; held-out: 2048 random token ids (accuracy numbers are meaningless on random "
        "weights: time and speed only).",
        f"Command: `{env['command']}`",
        "",
        "| engine | compile (s) | validation (s): load / accuracy / perf / total | tok/s at concurrency | "
        "TTFT p90 (ms) c=1 | ITL p50 (ms) c=1 | peak memory (GB) | % roofline c=1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, e in (r.get("engines") or {}).items():
        t, m = e["validation_timings_s"], e["metrics"]
        rates = ", ".join(
            f"{c}: {m[f'tokens_per_s_c{c}']:.0f}"
            for c in EVALUATION["concurrency"]
            if f"tokens_per_s_c{c}" in m
        )
        lines.append(
            f"| {name} | {e['compile_s']} | {t['load']:.1f} / {t['accuracy']:.1f} / {t['performance']:.1f} / "
            f"{t['total']:.1f} | {rates} | {m.get('ttft_p90_ms_c1', float('nan')):.1f} | "
            f"{m.get('itl_p50_ms_c1', float('nan')):.2f} | {m.get('peak_memory_bytes', 0) / 1e9:.2f} | "
            f"{m.get('roofline_pct_c1', float('nan')):.1f} |"
        )
    if r.get("errors"):
        lines += ["", "Errors / skipped stages:", ""] + [
            f"- {k}: {v.splitlines()[0][:300]}" for k, v in r["errors"].items()
        ]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
