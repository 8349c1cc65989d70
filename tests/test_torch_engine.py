"""kiln's torch engine executes ModelOpt's TensorRT-LLM checkpoints exactly as the models they came from.

Baseline: unquantized checkpoints reproduce HF transformers' logits and greedy tokens. Quantized: each
quant algo reproduces ModelOpt's fake-quant model (the model the checkpoint was calibrated and exported
from, with the scales the export actually writes: fp16 pre-quant scales, KV scales clamped to >= 1).

Tolerances (max |logit difference|, fp32 engine, logits of magnitude ~1):
- unquantized vs HF fp32: 1e-4; bf16 engine vs HF bf16: argmax agreement >= 90% and max diff <= 0.1
  (both round differently in bf16; same greedy tokens is asserted in fp32);
- FP8, W8A8_SQ_PER_CHANNEL, W4A16_AWQ, FP8 + FP8 KV cache: 1e-4 (measured <= 4e-7: the same integer/FP8 grids, so only float
  summation order differs);
- W8A16: 1e-3 (measured 6.5e-4): bf16 weights of the tiny model land exactly on a .5 tie of the int8
  grid for ~0.05% of weights, and ModelOpt's export (``round(w / scale)`` in fp16) and its fake quant
  (``round(w * 127 / amax)`` in fp32) break those ties differently: one int8 step, in the checkpoint;
- W4A16 (INT4 block-wise weight-only; ModelOpt writes it as W4A16_AWQ without pre-quant scales): 2e-2
  (measured 1.0e-2): the same tie-breaking, where a tie is any weight equal to half its group's amax
  (ratio 3.5 on the 7-level grid), common in bf16; one int4 step is ~14% of that weight. AWQ's
  pre-quant scales break the ties, hence W4A16_AWQ's 1e-4;
- W4A8_AWQ: 2e-4 (measured 4e-5: the engine re-rounds int4 x group-scale weights to FP8 once at build
  time in float32, ModelOpt per forward; a weight on an FP8 rounding boundary can land one step apart).
Every quantized case also asserts that the engine is *not* within tolerance of the unquantized model, so
a checkpoint that silently exported unquantized would fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.engine.base import GenerationRequest, SamplingParams
from kiln.engine.torch import TorchBackend
from kiln.profiles import Target
from tests.fixtures.engine import export_checkpoint, fake_quant_model
from tests.fixtures.models import make_tiny_llama

VOCAB = 256


def cpu_target(dtype: str = "float32", **limits: int) -> Target:
    return Target(name="cpu-test", dtype=dtype,
                  limits={"max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128, **limits})


def build(checkpoint: Path, out: Path, dtype: str = "float32", tokenizer_dir: Path | None = None):
    backend = TorchBackend()
    return backend.load(backend.compile(checkpoint, cpu_target(dtype), out, {"model_sha": "test"},
                                        tokenizer_dir=tokenizer_dir))


def token_ids(n: int, seed: int = 3) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hidden 128 so INT4 groups of 64 fit two per row
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf", hidden=128, intermediate=256, vocab=VOCAB)


@pytest.fixture(scope="module")
def unquantized(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("none")
    checkpoint, model = export_checkpoint(tiny_hf, root / "ckpt", "none")
    return checkpoint, model, build(checkpoint, root / "engine")


def _variant(tmp: Path, *, rope_scaling: dict | None = None, **kwargs) -> Path:
    hf = make_tiny_llama(tmp / "hf", **kwargs)
    if rope_scaling:
        config = json.loads((hf / "config.json").read_text())
        config["rope_parameters"] = {"rope_theta": 50000.0, **rope_scaling}
        (hf / "config.json").write_text(json.dumps(config))
    return hf


@pytest.mark.parametrize("variant", [
    pytest.param({}, id="llama-gqa"),
    pytest.param({"tie": True, "kv_heads": 4}, id="tied-mha"),
    pytest.param({"attention_bias": True}, id="qkv-bias"),
    pytest.param({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}, id="rope-llama3"),
    pytest.param({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, id="rope-linear"),
])
def test_fp32_logits_and_greedy_match_hf(tmp_path: Path, variant: dict) -> None:
    from transformers import AutoModelForCausalLM

    hf_dir = _variant(tmp_path, **variant)
    checkpoint, _ = export_checkpoint(hf_dir, tmp_path / "ckpt", "none")
    engine = build(checkpoint, tmp_path / "engine")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = token_ids(48)  # past original_max_position_embeddings, so the scaled frequencies matter
    assert (engine.logits(ids) - hf_logits(hf, ids)).abs().max().item() < 1e-4
    prompt = ids[:7]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, 7:]
    assert engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=24))])[0].token_ids == expected.tolist()


def test_bf16_engine_close_to_hf_bf16(tiny_hf: Path, unquantized, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    checkpoint, _, _ = unquantized
    engine = build(checkpoint, tmp_path / "engine", dtype="bfloat16")
    assert engine.manifest["dtype"] == "bfloat16"
    assert engine.model.embedding.dtype == torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.bfloat16).eval()
    ids = token_ids(40)
    got, ref = engine.logits(ids), hf_logits(hf, ids)
    assert (got - ref).abs().max().item() <= 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


ALGOS = [
    # (recipe, kv cache, quant_algo in config.json, kv algo, tolerance)
    ("fp8", "auto", "FP8", None, 1e-4),
    ("fp8", "fp8", "FP8", "FP8", 1e-4),
    ("int8_sq", "auto", "W8A8_SQ_PER_CHANNEL", None, 1e-4),
    ("int8_wo", "auto", "W8A16", None, 1e-3),
    ("int4_wo", "auto", "W4A16_AWQ", None, 2e-2),
    ("int4_awq", "auto", "W4A16_AWQ", None, 1e-4),
    ("w4a8_awq", "auto", "W4A8_AWQ", None, 2e-4),
]


@pytest.mark.parametrize(("recipe", "kv", "quant_algo", "kv_algo", "tol"), ALGOS,
                         ids=[f"{a[0]}-kv{a[1]}" for a in ALGOS])
def test_quantized_logits_match_modelopt_fake_quant(tiny_hf: Path, unquantized, tmp_path: Path, recipe: str,
                                                    kv: str, quant_algo: str, kv_algo: str | None, tol: float) -> None:
    checkpoint, fake_quant = export_checkpoint(tiny_hf, tmp_path / "ckpt", recipe, kv_cache=kv)
    quant = json.loads((checkpoint / "config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["kv_cache_quant_algo"]) == (quant_algo, kv_algo)
    engine = build(checkpoint, tmp_path / "engine")
    assert (engine.manifest["quant_algo"], engine.manifest["kv_cache_quant_algo"]) == (quant_algo, kv_algo)
    ids = token_ids(40)
    got = engine.logits(ids)
    assert (got - hf_logits(fake_quant, ids)).abs().max().item() <= tol
    assert (got - unquantized[2].logits(ids)).abs().max().item() > 10 * tol
    if kv_algo:
        assert engine.cache.k[0].dtype == torch.float8_e4m3fn
        # decode reads K/V back from the FP8 cache: greedy continuation must equal the fake-quant model's
        prompt = ids[:9]
        expected = fake_quant.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                       do_sample=False)[0, 9:].tolist()
        assert engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=12))])[0].token_ids == expected


SMOL_PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
                "The three primary colors are", "Water boils at a temperature of"]
SMOL_RECIPES = [("none", "auto"), ("fp8", "auto"), ("fp8", "fp8"), ("int8_sq", "auto"), ("int8_wo", "auto"),
                ("int4_wo", "auto"), ("int4_awq", "auto"), ("w4a8_awq", "auto")]


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "kv"), SMOL_RECIPES, ids=[f"{r}-kv{k}" for r, k in SMOL_RECIPES])
def test_smollm2_greedy_tokens_equal_fake_quant(smollm2_dir: Path, tmp_path: Path, recipe: str, kv: str) -> None:
    """The acceptance check on the real model: same greedy tokens as ModelOpt's fake-quant SmolLM2."""
    from transformers import AutoTokenizer

    checkpoint, fake_quant = export_checkpoint(smollm2_dir, tmp_path / "ckpt", recipe, kv_cache=kv, group_size=64)
    engine = build(checkpoint, tmp_path / "engine", tokenizer_dir=smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tok(p)["input_ids"] for p in SMOL_PROMPTS]
    results = engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=16)) for p in prompts])
    for prompt, result in zip(prompts, results, strict=True):
        expected = fake_quant.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                                       do_sample=False)[0, len(prompt):].tolist()
        assert result.token_ids == expected


# 500000: ModelOpt 0.47's export drops rope_parameters under transformers 5; kiln.quantize restores them
@pytest.mark.parametrize("rope_theta", [10000.0, 500000.0])
def test_kiln_quantize_checkpoint_runs_in_engine(tmp_path: Path, rope_theta: float) -> None:
    """The real pipeline: ``kiln.quantize`` (weight-only INT8, no calibration data) -> compile -> logits."""
    from kiln.profiles import Recipe
    from kiln.quantize import quantize

    hf_dir = make_tiny_llama(tmp_path / "hf", hidden=128, intermediate=256, vocab=VOCAB)
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": rope_theta, "rope_type": "default"}
    (hf_dir / "config.json").write_text(json.dumps(config))
    out = quantize(hf_dir, Recipe(name="w8", quantization="int8_wo"), layouts=[(1, 1)], output_dir=tmp_path / "q",
                   dtype="float16", device="cpu", lineage={}, calibration=None, formats=("trtllm",))
    engine = build(out.trtllm_dirs["tp1pp1"], tmp_path / "engine")
    assert engine.manifest["quant_algo"] == "W8A16"
    ids = token_ids(120)
    reference = fake_quant_model(hf_dir, "int8_wo")  # weight-only: no calibration data, same scales
    # the int8_wo tolerance plus kiln.quantize's fp16 load; a wrong RoPE base is ~10x off at 120 positions
    assert (engine.logits(ids) - hf_logits(reference, ids)).abs().max().item() < 2e-3
