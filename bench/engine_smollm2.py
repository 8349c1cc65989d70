"""SmolLM2-135M: the torch engine vs ModelOpt's fake-quant model, per recipe, on a fixed prompt set (CPU).

The numbers behind ``tests/test_torch_engine.py::test_smollm2_greedy_tokens_equal_fake_quant`` (which
asserts them): per recipe, how many prompts' 16 greedy tokens are identical, the argmax agreement and the
max |logit difference| teacher-forced on the reference's continuation, and at the first divergence the
reference's own margin between its best token and the engine's pick (a near tie explains the difference).
The reference is the fake-quant model aligned to the checkpoint's codes (``align_to_checkpoint``); the
export gap that alignment removes is reported too. Real model, real tokenizer; run by hand:

    .venv/bin/python bench/engine_smollm2.py          # writes bench/results/engine_smollm2.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kiln.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from kiln.engine.torch import TorchBackend  # noqa: E402
from kiln.profiles import Target  # noqa: E402
from tests.fixtures.engine import align_to_checkpoint, export_checkpoint  # noqa: E402

SMOLLM2 = (
    Path(os.environ.get("KILN_TEST_ASSETS") or Path.home() / ".kiln" / "assets") / "SmolLM2-135M-Instruct"
)
PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]
RECIPES = [
    ("none", "auto"),
    ("fp8", "auto"),
    ("fp8", "fp8"),
    ("int8_sq", "auto"),
    ("int8_wo", "auto"),
    ("int4_wo", "auto"),
    ("int4_awq", "auto"),
    ("w4a8_awq", "auto"),
]
NEW_TOKENS = 16


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def compare(recipe: str, kv: str, work: Path) -> dict:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    checkpoint, fake_quant = export_checkpoint(SMOLLM2, work / "ckpt", recipe, kv_cache=kv, group_size=64)
    backend = TorchBackend()
    target = Target(
        name="cpu", dtype="float32", limits={"max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128}
    )
    engine = backend.load(backend.compile(checkpoint, target, work / "engine", {}, tokenizer_dir=SMOLLM2))
    gap = align_to_checkpoint(fake_quant, checkpoint) if recipe != "none" else None
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    results = engine.generate(
        [GenerationRequest(p, SamplingParams(max_new_tokens=NEW_TOKENS)) for p in prompts]
    )
    rows = []
    for text, prompt, result in zip(PROMPTS, prompts, results, strict=True):
        expected = fake_quant.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )[0, len(prompt) :].tolist()
        full = prompt + expected
        ref, got = _logits(fake_quant, full)[len(prompt) - 1 :], engine.logits(full)[len(prompt) - 1 :]
        # the reference against itself with only its attention kernel changed: how far a last-bit change
        # inside the fake-quant model alone moves its logits (the noise floor of any second implementation)
        fake_quant.set_attn_implementation("eager")
        own = _logits(fake_quant, full)[len(prompt) - 1 :]
        fake_quant.set_attn_implementation("sdpa")
        row = {
            "prompt": text,
            "identical": result.token_ids == expected,
            "max_logit_diff": round((got - ref).abs().max().item(), 4),
            "argmax_agreement": round((got.argmax(-1) == ref.argmax(-1)).float().mean().item(), 3),
            "reference_self_max_logit_diff": round((own - ref).abs().max().item(), 4),
            "reference_self_argmax_agreement": round(
                (own.argmax(-1) == ref.argmax(-1)).float().mean().item(), 3
            ),
        }
        if not row["identical"]:
            first = next(i for i, (a, b) in enumerate(zip(result.token_ids, expected, strict=True)) if a != b)
            row["first_divergence"] = first
            row["reference_margin_there"] = round(
                (ref[first].max() - ref[first, result.token_ids[first]]).item(), 4
            )
        rows.append(row)
    engine.close()
    return {
        "recipe": recipe,
        "kv_cache": kv,
        "quant_algo": engine.manifest.quant_algo,
        "export_gap": gap,
        "prompts": rows,
        "identical": sum(r["identical"] for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def write_markdown(results: list[dict], path: Path) -> None:
    lines = [
        "# SmolLM2-135M: torch engine vs ModelOpt fake-quant model (CPU, fp32 engine)",
        "",
        f"{len(PROMPTS)} prompts x {NEW_TOKENS} greedy tokens; logits teacher-forced on the reference's "
        "continuation. Reference: the fake-quant model aligned to the checkpoint's weight codes (export gap "
        "in the last column).",
        "",
        "| recipe | kv | quant_algo | identical greedy | argmax agreement (min) | max logit diff | "
        "reference vs itself, eager attention: max logit diff / argmax agreement (min) | "
        "reference margin at divergences | export gap: codes differing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        margins = [p["reference_margin_there"] for p in r["prompts"] if "reference_margin_there" in p]
        gap = r["export_gap"]
        gap_text = f"{gap['differing']} of {gap['elements']} (max {gap['max_steps']} step)" if gap else "-"
        lines.append(
            f"| {r['recipe']} | {r['kv_cache']} | {r['quant_algo']} | {r['identical']}/{len(r['prompts'])} | "
            f"{min(p['argmax_agreement'] for p in r['prompts'])} | "
            f"{max(p['max_logit_diff'] for p in r['prompts'])} | "
            f"{max(p['reference_self_max_logit_diff'] for p in r['prompts'])} / "
            f"{min(p['reference_self_argmax_agreement'] for p in r['prompts'])} | "
            f"{', '.join(map(str, margins)) or '-'} | {gap_text} |"
        )
    lines += ["", "Command: `.venv/bin/python bench/engine_smollm2.py`"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--recipes", nargs="*", help="recipe[:kv] names (default: all)")
    args = parser.parse_args()
    chosen = [tuple((name + ":auto").split(":")[:2]) for name in args.recipes] if args.recipes else RECIPES
    results = []
    for recipe, kv in chosen:
        with tempfile.TemporaryDirectory(prefix="kiln-smol-") as work:
            results.append(compare(recipe, kv, Path(work)))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "prompts"}), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engine_smollm2.json").write_text(json.dumps(results, indent=2))
        write_markdown(results, args.out / "engine_smollm2.md")


if __name__ == "__main__":
    main()
