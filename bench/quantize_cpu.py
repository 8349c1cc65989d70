"""CPU benchmark: per-recipe calibration + export wall time and fake-quant perplexity delta on SmolLM2-135M.

Real model (``~/.kiln/assets/SmolLM2-135M-Instruct``), real text: calibration windows and held-out tokens
from the built-in fortunes corpus (disjoint, checked). Writes ``bench/results/quantize_cpu.json`` + ``.md``.

    .venv/bin/python bench/quantize_cpu.py [--recipes fp8 int8_sq ...] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from kiln.profiles import Calibration, Evaluation, Recipe

SMOLLM2 = (
    Path(os.environ.get("KILN_TEST_ASSETS") or Path.home() / ".kiln" / "assets") / "SmolLM2-135M-Instruct"
)
# SmolLM2's hidden size 576 is not a multiple of 128: its INT4 recipes use group size 64
RECIPES = {
    "fp8": Recipe(name="fp8", quantization="fp8"),
    "fp8-kv8": Recipe(name="fp8-kv8", quantization="fp8", kv_cache_dtype="fp8"),
    "int8_sq": Recipe(name="int8_sq", quantization="int8_sq"),
    "int8_wo": Recipe(name="int8_wo", quantization="int8_wo"),
    "int8_wo-kvint8": Recipe(name="int8_wo-kvint8", quantization="int8_wo", kv_cache_dtype="int8"),
    "int4_wo-g64": Recipe(name="int4_wo-g64", quantization="int4_wo", group_size=64),
    "int4_awq-g64": Recipe(name="int4_awq-g64", quantization="int4_awq", group_size=64),
    "w4a8_awq-g64": Recipe(name="w4a8_awq-g64", quantization="w4a8_awq", group_size=64),
    "none": Recipe(name="none"),
}


def main() -> None:
    from kiln.calibration import calibration_set, heldout_set
    from kiln.hub import load_tokenizer
    from kiln.quantize import quantize

    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--heldout-tokens", type=int, default=2048)
    args = parser.parse_args()

    tokenizer = load_tokenizer(SMOLLM2)
    cal_spec, evaluation = (
        Calibration(num_samples=args.samples),
        Evaluation(heldout_tokens=args.heldout_tokens),
    )
    calibration = calibration_set(cal_spec, tokenizer)
    heldout = heldout_set(evaluation, tokenizer, exclude=calibration)
    previous = args.out / "quantize_cpu.json"  # rows of earlier runs stay unless re-measured
    rows = json.loads(previous.read_text())["rows"] if previous.is_file() else []
    for name in args.recipes:
        rows = [r for r in rows if r["recipe"] != name]
        recipe = RECIPES[name]
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = quantize(
                SMOLLM2,
                recipe,
                layouts=[(1, 1)],
                output_dir=Path(tmp),
                dtype="bfloat16",
                device="cpu",
                lineage={"bench": "quantize_cpu"},
                calibration=calibration,
                heldout=heldout,
            )
            total = time.perf_counter() - start
        t = result.timings_s
        ppl = result.perplexity
        row = {
            "recipe": name,
            "quantization": recipe.quantization,
            "kv_cache_dtype": recipe.kv_cache_dtype,
            "quant_algo": result.quant_algo,
            "kv_cache_quant_algo": result.kv_cache_quant_algo,
            "calibrated": result.calibrated,
            "calibrate_export_s": round(
                t.get("calibrate", 0) + t.get("export_trtllm", 0) + t.get("export_hf", 0), 1
            ),
            "timings_s": t,
            "total_s": round(total, 1),
            "ppl_baseline": ppl and round(ppl.baseline, 3),
            "ppl": ppl and round(ppl.quantized, 3),
            "ppl_increase_pct": ppl and round(ppl.increase_pct, 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        _write(args.out, rows, calibration, heldout)


def _write(out: Path, rows: list[dict], calibration, heldout) -> None:
    import torch

    from kiln.quantize import toolchain_versions

    data = {
        "model": "SmolLM2-135M-Instruct (real weights)",
        "host": f"{platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads (shared with other jobs: times are upper bounds)",
        "calibration": f"{calibration.source} sha256={calibration.sha256[:16]}",
        "heldout": f"{heldout.source} ({heldout.num_tokens} tokens)",
        "versions": toolchain_versions(),
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize_cpu.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# ModelOpt calibrate + export on CPU: SmolLM2-135M",
        "",
        f"Calibration: {data['calibration']}. Held-out: {data['heldout']}. Host: {data['host']}.",
        "Perplexity is ModelOpt fake-quant (simulated quantization) vs the unquantized model in float32.",
        "",
        "| recipe | quant_algo | kv | calibration passes | calibrate s | export TRT-LLM s | export HF s "
        "| ppl | ppl increase % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["timings_s"]
        lines.append(
            f"| {r['recipe']} | {r['quant_algo']} | {r['kv_cache_quant_algo']} | {r['calibrated']} | "
            f"{t.get('calibrate', '-')} | {t.get('export_trtllm', '-')} | {t.get('export_hf', '-')} | "
            f"{r['ppl'] if r['ppl'] is not None else '-'} | "
            f"{r['ppl_increase_pct'] if r['ppl_increase_pct'] is not None else '-'} |"
        )
    base = next((r["ppl_baseline"] for r in rows if r["ppl_baseline"]), None)
    lines += [
        "",
        f"Baseline (unquantized) perplexity: {base}.",
        "Command: `.venv/bin/python bench/quantize_cpu.py`",
    ]
    (out / "quantize_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
