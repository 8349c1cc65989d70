"""kiln.quantize: ModelOpt calibration + TensorRT-LLM / HF export, on a tiny random Llama (fast) and SmolLM2.

Expected ``quant_algo`` values are TensorRT-LLM's (../shared/README.md); tensor names are ModelOpt's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kiln.calibration import TokenSet, token_sha256
from kiln.errors import (
    CalibrationDataError,
    GateFailedError,
    KilnInputError,
    ModelSourceError,
    UnsupportedCombinationError,
)
from kiln.hub import hash_directory
from kiln.profiles import Recipe
from kiln.quantize import QuantizedCheckpoint, modelopt_config, quantize
from tests.fixtures.models import make_tiny_llama

VOCAB = 256
HIDDEN = 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("quant") / "tiny", vocab=VOCAB, hidden=HIDDEN)


def _tokens(count: int, length: int, seed: int) -> TokenSet:
    rng = random.Random(seed)
    ids = [[rng.randrange(VOCAB) for _ in range(length)] for _ in range(count)]
    return TokenSet(ids, token_sha256(ids), f"random seed={seed}")


CAL = _tokens(8, 64, seed=1)
HELDOUT = _tokens(2, 64, seed=2)


def _run(
    model_dir: Path,
    out: Path,
    recipe: Recipe,
    *,
    layouts=((1, 1),),
    calibration: TokenSet | None = CAL,
    **kwargs,
) -> QuantizedCheckpoint:
    return quantize(
        model_dir,
        recipe,
        layouts=list(layouts),
        output_dir=out,
        dtype="float16",
        device="cpu",
        lineage={"model_sha": "test-sha", "repo_id": "tiny"},
        calibration=calibration,
        **kwargs,
    )


def _tensors(directory: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(directory / f"rank{rank}.safetensors"))


def _hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


# --- per-recipe exports -------------------------------------------------------------------------------------

RECIPE_CASES = [
    # quantization, kv, group, expected quant_algo, kv algo, weight dtype, scale tensors on each linear
    (
        "fp8",
        "auto",
        128,
        "FP8",
        None,
        torch.float8_e4m3fn,
        {"weights_scaling_factor", "activation_scaling_factor"},
    ),
    (
        "fp8",
        "fp8",
        128,
        "FP8",
        "FP8",
        torch.float8_e4m3fn,
        {"weights_scaling_factor", "activation_scaling_factor"},
    ),
    (
        "int8_sq",
        "auto",
        128,
        "W8A8_SQ_PER_CHANNEL",
        None,
        torch.int8,
        {"weights_scaling_factor", "activation_scaling_factor", "prequant_scaling_factor"},
    ),
    ("int8_wo", "auto", 128, "W8A16", None, torch.int8, {"weights_scaling_factor"}),
    ("int8_wo", "int8", 128, "W8A16", "INT8", torch.int8, {"weights_scaling_factor"}),
    # ModelOpt exports block-wise INT4 weight-only in the AWQ layout (TensorRT-LLM's W4A16_AWQ kernels)
    ("int4_wo", "auto", 32, "W4A16_AWQ", None, torch.int8, {"weights_scaling_factor"}),
    (
        "int4_awq",
        "auto",
        32,
        "W4A16_AWQ",
        None,
        torch.int8,
        {"weights_scaling_factor", "prequant_scaling_factor"},
    ),
    (
        "w4a8_awq",
        "auto",
        32,
        "W4A8_AWQ",
        None,
        torch.int8,
        {
            "weights_scaling_factor",
            "weights_scaling_factor_2",
            "activation_scaling_factor",
            "prequant_scaling_factor",
        },
    ),
]


@pytest.mark.parametrize(
    ("quant", "kv", "group", "algo", "kv_algo", "wdtype", "scales"),
    RECIPE_CASES,
    ids=[f"{c[0]}-kv{c[1]}" for c in RECIPE_CASES],
)
def test_recipe_exports_trtllm_quant_algo_dtypes_and_scales(
    tiny_dir: Path,
    tmp_path: Path,
    quant: str,
    kv: str,
    group: int,
    algo: str,
    kv_algo: str | None,
    wdtype: torch.dtype,
    scales: set[str],
) -> None:
    recipe = Recipe(name="r", quantization=quant, kv_cache_dtype=kv, group_size=group)
    result = _run(tiny_dir, tmp_path, recipe)
    config = json.loads((result.trtllm_dirs["tp1pp1"] / "config.json").read_text())
    q = config["quantization"]
    assert (q["quant_algo"], q["kv_cache_quant_algo"]) == (algo, kv_algo)
    assert (result.quant_algo, result.kv_cache_quant_algo) == (algo, kv_algo)
    assert q["exclude_modules"] == ["lm_head"]
    if algo.startswith("W4"):
        assert q["group_size"] == group
    assert config["mapping"]["world_size"] == 1 and config["dtype"] == "float16"
    tensors = _tensors(result.trtllm_dirs["tp1pp1"])
    for linear in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
        prefix = f"transformer.layers.0.{linear}."
        assert tensors[prefix + "weight"].dtype == wdtype, linear
        assert {k.removeprefix(prefix) for k in tensors if k.startswith(prefix)} == {"weight"} | scales, (
            linear
        )
    assert tensors["lm_head.weight"].dtype == torch.float16  # excluded from quantization
    if kv_algo:
        assert tensors["transformer.layers.0.attention.kv_cache_scaling_factor"].numel() == 1
    if algo.startswith("W4"):  # one scale per group of `group` input features
        assert tensors["transformer.layers.0.mlp.proj.weights_scaling_factor"].shape[-1] == 128 // group
    lineage = json.loads((result.trtllm_dirs["tp1pp1"] / "kiln-lineage.json").read_text())
    assert lineage["model_sha"] == "test-sha" and lineage["quantization"] == quant
    assert lineage["versions"]["nvidia-modelopt"].startswith("0.")
    assert lineage["calibration_sha256"] == result.calibration_sha256
    assert (result.calibration_sha256 == CAL.sha256) == result.calibrated


def test_fp8_and_int8_weights_dequantize_to_the_original(tiny_dir: Path, tmp_path: Path) -> None:
    original = _hf_weights(tiny_dir)["model.layers.1.self_attn.o_proj.weight"]
    for quant, tolerance in (("fp8", 0.07), ("int8_wo", 0.01)):
        result = _run(tiny_dir, tmp_path / quant, Recipe(name=quant, quantization=quant), formats=("trtllm",))
        tensors = _tensors(result.trtllm_dirs["tp1pp1"])
        weight = tensors["transformer.layers.1.attention.dense.weight"].float()
        scale = tensors["transformer.layers.1.attention.dense.weights_scaling_factor"].float()
        dequant = weight * (scale if scale.numel() == 1 else scale.reshape(-1, 1))
        error = (dequant - original).abs().max() / original.abs().max()
        assert error < tolerance, (quant, float(error))
        assert result.hf_dir is None  # formats=("trtllm",)


def test_baseline_none_exports_unquantized_weights_in_dtype(tiny_dir: Path, tmp_path: Path) -> None:
    result = _run(tiny_dir, tmp_path, Recipe(name="baseline"), calibration=None)
    config = json.loads((result.trtllm_dirs["tp1pp1"] / "config.json").read_text())
    assert config["quantization"]["quant_algo"] is None and config["architecture"] == "LlamaForCausalLM"
    tensors = _tensors(result.trtllm_dirs["tp1pp1"])
    hf = _hf_weights(tiny_dir)
    dense = tensors["transformer.layers.0.attention.dense.weight"]
    assert dense.dtype == torch.float16
    assert torch.equal(dense.float(), hf["model.layers.0.self_attn.o_proj.weight"].half().float())
    assert not result.calibrated and result.calibration_sha256 is None
    assert (result.hf_dir / "model.safetensors").is_file() and (result.hf_dir / "kiln-lineage.json").is_file()


def test_hf_export_carries_quant_config_architectures_and_dtype(tiny_dir: Path, tmp_path: Path) -> None:
    result = _run(tiny_dir, tmp_path, Recipe(name="fp8", quantization="fp8", kv_cache_dtype="fp8"))
    hf_quant = json.loads((result.hf_dir / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "FP8" and hf_quant["kv_cache_quant_algo"] == "FP8"
    config = json.loads((result.hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float16"
    with safe_open(str(result.hf_dir / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.o_proj.weight").dtype == torch.float8_e4m3fn
        assert "model.layers.0.self_attn.o_proj.weight_scale" in handle.keys()


def test_qwen2_style_qkv_bias_is_exported(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        architectures=["Qwen2ForCausalLM"],
    )
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "qwen")
    result = _run(
        tmp_path / "qwen", tmp_path / "out", Recipe(name="fp8", quantization="fp8"), formats=("trtllm",)
    )
    exported = json.loads((result.trtllm_dirs["tp1pp1"] / "config.json").read_text())
    assert exported["architecture"] == "Qwen2ForCausalLM" and exported["quantization"]["quant_algo"] == "FP8"
    assert _tensors(result.trtllm_dirs["tp1pp1"])["transformer.layers.0.attention.qkv.bias"].shape == (128,)


# --- tensor parallel ----------------------------------------------------------------------------------------


def _merge_ranks(
    tp1: dict[str, torch.Tensor], ranks: list[dict[str, torch.Tensor]], heads: int, kv_heads: int
) -> dict[str, torch.Tensor]:
    """Undo TensorRT-LLM's TP split: replicated tensors stay, split ones concatenate along their split dim,
    and the fused qkv (each rank holds [q_r; k_r; v_r]) regroups as [q; k; v]."""
    merged = {}
    tp = len(ranks)
    for name, full in tp1.items():
        parts = [rank[name].float() for rank in ranks]
        if all(p.shape == full.shape for p in parts):
            for part in parts[1:]:
                assert torch.equal(part, parts[0]), f"{name}: replicated tensor differs between ranks"
            merged[name] = parts[0]
            continue
        dim = next(d for d in range(full.dim()) if parts[0].shape[d] != full.shape[d])
        if ".attention.qkv." in name and dim == 0:
            head_dim = full.shape[0] // (heads + 2 * kv_heads)
            sizes = [heads * head_dim // tp, kv_heads * head_dim // tp, kv_heads * head_dim // tp]
            q, k, v = zip(*(p.split(sizes, dim=0) for p in parts), strict=True)
            merged[name] = torch.cat([*q, *k, *v], dim=0)
        else:
            merged[name] = torch.cat(parts, dim=dim)
    return merged


@pytest.mark.parametrize("quant", ["none", "fp8", "int8_sq"])
def test_tp2_shards_concatenate_to_tp1_weights(tiny_dir: Path, tmp_path: Path, quant: str) -> None:
    result = _run(
        tiny_dir,
        tmp_path,
        Recipe(name=quant, quantization=quant),
        layouts=[(1, 1), (2, 1)],
        formats=("trtllm",),
    )
    assert set(result.trtllm_dirs) == {"tp1pp1", "tp2pp1"}
    tp2_dir = result.trtllm_dirs["tp2pp1"]
    assert json.loads((tp2_dir / "config.json").read_text())["mapping"]["tp_size"] == 2
    assert sorted(p.name for p in tp2_dir.glob("rank*.safetensors")) == [
        "rank0.safetensors",
        "rank1.safetensors",
    ]
    tp1 = _tensors(result.trtllm_dirs["tp1pp1"])
    ranks = [_tensors(tp2_dir, 0), _tensors(tp2_dir, 1)]
    assert set(ranks[0]) == set(ranks[1]) == set(tp1)
    assert ranks[0]["transformer.layers.0.attention.dense.weight"].shape[1] == HIDDEN // 2  # really split
    merged = _merge_ranks(tp1, ranks, heads=4, kv_heads=2)
    for name, full in tp1.items():
        assert torch.equal(merged[name], full.float()), name


# --- calibration behaviour ----------------------------------------------------------------------------------


def test_weight_only_recipes_need_no_calibration_data(tiny_dir: Path, tmp_path: Path) -> None:
    for quant in ("int8_wo", "int4_wo"):
        result = _run(
            tiny_dir,
            tmp_path / quant,
            Recipe(name=quant, quantization=quant, group_size=32),
            calibration=None,
            formats=("trtllm",),
        )
        assert not result.calibrated and result.calibration_sha256 is None
        assert "calibrate" in result.timings_s  # the weights were still quantized


def test_same_inputs_give_identical_checkpoints(tiny_dir: Path, tmp_path: Path) -> None:
    recipe = Recipe(name="awq", quantization="int4_awq", group_size=32)
    first = _run(tiny_dir, tmp_path / "a", recipe, formats=("trtllm",))
    second = _run(tiny_dir, tmp_path / "b", recipe, formats=("trtllm",))
    assert hash_directory(first.trtllm_dirs["tp1pp1"]) == hash_directory(second.trtllm_dirs["tp1pp1"])


def test_group_size_overrides_the_modelopt_preset() -> None:
    cfg = modelopt_config(Recipe(name="w4a8", quantization="w4a8_awq", group_size=64, kv_cache_dtype="int8"))
    weight = next(e for e in cfg["quant_cfg"] if e["quantizer_name"] == "*weight_quantizer")
    assert weight["cfg"][0]["block_sizes"][-1] == 64
    assert cfg["quant_cfg"][-1] == {
        "quantizer_name": "*[kv]_bmm_quantizer",
        "cfg": {"num_bits": 8, "axis": None},
    }
    import modelopt.torch.quantization as mtq  # the preset itself is untouched

    preset = next(e for e in mtq.W4A8_AWQ_BETA_CFG["quant_cfg"] if e["quantizer_name"] == "*weight_quantizer")
    assert preset["cfg"][0]["block_sizes"][-1] == 128


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenSet]:
    """A random Llama with large weights (peaked predictions) and held-out text sampled from it: then
    quantization noise raises its perplexity (cross-entropy = entropy + KL), unlike on uniform outputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        initializer_range=0.2,
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("sharp") / "model"
    model.save_pretrained(path)
    generator = torch.Generator().manual_seed(3)
    ids = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(63):  # two sequences sampled side by side
            probs = torch.softmax(model(ids).logits[:, -1], dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    windows = ids.tolist()
    return path, TokenSet(windows, token_sha256(windows), "sampled from the model")


def test_perplexity_gate_refuses_a_recipe_over_budget_before_export(
    sharp_model: tuple[Path, TokenSet], tmp_path: Path
) -> None:
    model_dir, heldout = sharp_model
    int8 = Recipe(name="int8", quantization="int8_wo")
    int4 = Recipe(name="int4", quantization="int4_wo", group_size=64)
    ppl8 = _run(model_dir, tmp_path / "m8", int8, heldout=heldout, formats=("trtllm",)).perplexity
    ppl4 = _run(model_dir, tmp_path / "m4", int4, heldout=heldout, formats=("trtllm",)).perplexity
    assert ppl8 is not None and ppl4 is not None
    assert (
        ppl8.num_tokens == 2 * 63 and ppl8.heldout_sha256 == heldout.sha256 and ppl8.baseline == ppl4.baseline
    )
    # 4-bit weights cost clearly more than 8-bit (whose change is within sampling noise on 126 tokens)
    assert ppl8.increase_pct < ppl4.increase_pct and ppl4.increase_pct > 5
    budget = (ppl8.increase_pct + ppl4.increase_pct) / 2
    passed = _run(model_dir, tmp_path / "pass", int8, heldout=heldout, max_ppl_increase_pct=budget)
    assert passed.perplexity == ppl8 and (passed.trtllm_dirs["tp1pp1"] / "rank0.safetensors").is_file()
    lineage = json.loads((passed.trtllm_dirs["tp1pp1"] / "kiln-lineage.json").read_text())
    assert lineage["perplexity"]["increase_pct"] == ppl8.increase_pct
    with pytest.raises(GateFailedError, match=r"int4.*max_ppl_increase_pct .*no engine is built"):
        _run(model_dir, tmp_path / "fail", int4, heldout=heldout, max_ppl_increase_pct=budget)
    assert not (tmp_path / "fail").exists()


# --- bad input: refused before the model is loaded ----------------------------------------------------------


def test_bad_inputs_are_refused_before_calibration(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases = [
        (
            Recipe(name="g", quantization="int4_awq", group_size=48),
            KilnInputError,
            r"group_size 48 does not divide.*hidden_size 64",
        ),
        (
            Recipe(name="n", quantization="nvfp4"),
            UnsupportedCombinationError,
            r"nvfp4 calibrates only on CUDA",
        ),
        (Recipe(name="f", quantization="fp8"), CalibrationDataError, r"no calibration tokens"),
        (Recipe(name="k", kv_cache_dtype="fp8"), CalibrationDataError, r"no calibration tokens"),
    ]
    for recipe, error, message in cases:
        with pytest.raises(error, match=message):
            _run(tiny_dir, out, recipe, calibration=None)
    with pytest.raises(CalibrationDataError, match=r"beyond the model's vocab \(256\)"):
        _run(
            tiny_dir,
            out,
            Recipe(name="f", quantization="fp8"),
            calibration=TokenSet([[5, 300]], "x", "other"),
        )
    with pytest.raises(KilnInputError, match=r"tp 3 does not divide the model's 4 attention heads"):
        _run(tiny_dir, out, Recipe(name="b"), layouts=[(3, 1)])
    with pytest.raises(UnsupportedCombinationError, match=r"no INT8 KV cache"):
        _run(tiny_dir, out, Recipe(name="k", quantization="int8_wo", kv_cache_dtype="int8"), formats=("hf",))
    assert not out.exists()


def test_unsupported_architecture_and_prequantized_models_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "gpt2"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(
        ModelSourceError, match=r"GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    ):
        _run(other, tmp_path / "o1", Recipe(name="b"))
    (other / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(KilnInputError, match=r"already quantized \(awq\)"):
        _run(other, tmp_path / "o2", Recipe(name="b"))


# --- real model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_fp8_fake_quant_perplexity_is_close_to_baseline(smollm2_dir: Path, tmp_path: Path) -> None:
    from kiln.calibration import calibration_set, heldout_set
    from kiln.hub import load_tokenizer
    from kiln.profiles import Calibration, Evaluation

    tokenizer = load_tokenizer(smollm2_dir)
    calibration = calibration_set(Calibration(num_samples=16, seq_len=256), tokenizer)
    heldout = heldout_set(Evaluation(heldout_tokens=1024), tokenizer, exclude=calibration)
    result = quantize(
        smollm2_dir,
        Recipe(name="fp8", quantization="fp8"),
        layouts=[(1, 1)],
        output_dir=tmp_path,
        dtype="bfloat16",
        device="cpu",
        lineage={},
        calibration=calibration,
        heldout=heldout,
        formats=("trtllm",),
    )
    assert 20 < result.perplexity.baseline < 60  # a trained model on English text
    assert abs(result.perplexity.increase_pct) < 10


# --- CLI ----------------------------------------------------------------------------------------------------


def _profile(tmp_path: Path, model_dir: Path) -> Path:
    import yaml

    path = tmp_path / "quant.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "quant-test",
                "model": {"local_dir": str(model_dir)},
                "recipes": [
                    {"name": "int8-wo", "quantization": "int8_wo"},
                    {"name": "int8-kv", "quantization": "int8_wo", "kv_cache_dtype": "int8"},
                    {"name": "nvfp4", "quantization": "nvfp4"},
                ],
                "targets": [{"name": "cpu", "device": "cpu", "dtype": "float32"}],
                "registry": {"model_name": "tiny"},
            }
        )
    )
    return path


def test_cli_quantize_writes_a_tp2_trtllm_checkpoint(tiny_dir: Path, tmp_path: Path, kiln_home: Path) -> None:
    from typer.testing import CliRunner

    from kiln.cli import app

    out = tmp_path / "ckpt"
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            str(_profile(tmp_path, tiny_dir)),
            "--recipe",
            "int8-wo",
            "--output",
            str(out),
            "--tp",
            "2",
            "--no-ppl",
            "--dtype",
            "float16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "kiln-lineage.json",
        "rank0.safetensors",
        "rank1.safetensors",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W8A16" and config["mapping"]["tp_size"] == 2
    assert json.loads((out / "kiln-lineage.json").read_text())["recipe"] == "int8-wo"
    assert "W8A16" in result.output
    assert not list(tmp_path.glob(".*kiln-partial"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipe", "fp16"], "--recipe 'fp16' is not one of its recipes: int8-wo, int8-kv, nvfp4"),
        (["--recipe", "int8-wo", "--format", "onnx"], "--format 'onnx': allowed values are trtllm, hf"),
        (
            ["--recipe", "nvfp4", "--device", "cpu"],
            "nvfp4 needs CUDA to calibrate and run; target 'cpu' is a cpu target",
        ),
        (["--recipe", "int8-kv", "--format", "hf"], "no INT8 KV cache"),
        (["--recipe", "int8-wo", "--format", "hf", "--tp", "2"], "--tp/--pp apply to --format trtllm"),
    ],
)
def test_cli_quantize_bad_input_exits_2(
    tiny_dir: Path, tmp_path: Path, kiln_home: Path, args: list[str], message: str
) -> None:
    from typer.testing import CliRunner

    from kiln.cli import app

    out = tmp_path / "ckpt"
    result = CliRunner().invoke(
        app, ["quantize", str(_profile(tmp_path, tiny_dir)), "--output", str(out), "--no-ppl", *args]
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_cli_quantize_refuses_a_non_empty_output(tiny_dir: Path, tmp_path: Path, kiln_home: Path) -> None:
    from typer.testing import CliRunner

    from kiln.cli import app

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(
        app, ["quantize", str(_profile(tmp_path, tiny_dir)), "--recipe", "int8-wo", "--output", str(out)]
    )
    assert result.exit_code == 2 and "not an empty directory" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_example_profile_lists_every_cpu_recipe() -> None:
    from kiln.preflight import check_request_static
    from kiln.profiles import load_request
    from kiln.recipes import SCHEMES, scheme

    path = Path(__file__).parents[1] / "profiles" / "examples" / "tiny-cpu-quant.yaml"
    request = load_request(path)
    check_request_static(request, source=str(path))
    cpu_quantizations = {q for q in SCHEMES if not scheme(q).needs_cuda_to_calibrate}
    assert {r.quantization for r in request.recipes} == cpu_quantizations
    # int8 KV calibrates on a CPU but the torch engine cannot run it: pre-flight refuses it for a cpu target
    assert {r.kv_cache_dtype for r in request.recipes} == {"auto", "fp8"}


def test_two_targets_share_one_calibration_and_a_rerun_reuses_it(
    tiny_dir: Path, kiln_home: Path, modelopt_calls: list[int]
) -> None:
    """The build step calibrates once per recipe, exports per (tp, pp) of the targets, and caches by
    content."""

    from kiln.hub import ModelSnapshot as Snapshot
    from kiln.profiles import load_request
    from kiln.steps import Datasets
    from kiln.tasks.build import calibrate_and_quantize

    calls = modelopt_calls
    recipe = {"name": "sq", "quantization": "int8_sq"}
    request = load_request(
        {
            "name": "two-targets",
            "model": {"local_dir": str(tiny_dir)},
            "recipes": [recipe],
            "targets": [
                {"name": "cpu-a", "dtype": "float16"},
                {"name": "cpu-tp2", "dtype": "float16", "gpus_per_worker": 2, "limits": {"tp_size": 2}},
            ],
            "registry": {"model_name": "tiny"},
        }
    )
    snapshot = Snapshot(path=tiny_dir, sha="tiny-sha", source="local")
    data = Datasets(calibration={"sq": CAL}, heldout=None)
    first = calibrate_and_quantize.fn(request, snapshot, request.recipes[0], data)
    assert len(calls) == 1 and not first.reused
    assert set(first.trtllm_dirs) == {"tp1pp1", "tp2pp1"} and first.calibration_sha256 == CAL.sha256
    again = calibrate_and_quantize.fn(request, snapshot, request.recipes[0], data)
    assert len(calls) == 1 and again.reused and again.trtllm_dirs == first.trtllm_dirs


# --- int4_wo: pre-quant scale flag and tensors agree for TensorRT-LLM (issue 18 item 1) ---------------------


@pytest.mark.parametrize("tp", [1, 2])
def test_int4_wo_export_config_and_tensors_agree(tiny_dir: Path, tmp_path: Path, tp: int) -> None:
    """ModelOpt 0.47 writes int4_wo as W4A16_AWQ with pre_quant_scale: true and no pre-quant scale tensor. The
    TensorRT-LLM checkpoint now says false (trtllm-build's groupwise layer requires the tensor exactly when
    the flag is true); the HF export keeps true and carries ones (TensorRT-LLM's PyTorch W4A16_AWQ loader
    reads them)."""
    from kiln.engine.trtllm import api

    result = _run(
        tiny_dir,
        tmp_path,
        Recipe(name="r", quantization="int4_wo", group_size=32),
        layouts=[(tp, 1)],
        calibration=None,
    )
    trt = result.trtllm_dirs[f"tp{tp}pp1"]
    config = json.loads((trt / "config.json").read_text())
    assert (
        config["quantization"]["quant_algo"] == "W4A16_AWQ"
        and config["quantization"]["pre_quant_scale"] is False
    )
    for rank in range(tp):
        with safe_open(str(trt / f"rank{rank}.safetensors"), framework="pt") as handle:
            names = set(handle.keys())
            tensors = {
                n: (handle.get_slice(n).get_dtype(), tuple(handle.get_slice(n).get_shape())) for n in names
            }
        assert not any(n.endswith("prequant_scaling_factor") for n in names)
        assert api.checkpoint_problems(config, tensors, api.load_contract("1.2")) == []
    hf = result.hf_dir
    assert json.loads((hf / "hf_quant_config.json").read_text())["quantization"]["pre_quant_scale"] is True
    tensors = load_file(str(hf / "model.safetensors"))
    linears = [
        n.removesuffix(".weight")
        for n, t in tensors.items()
        if n.endswith(".weight") and t.dtype == torch.uint8
    ]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for name in linears:
        pqs = tensors[f"{name}.pre_quant_scale"]
        # in_features
        assert pqs.dtype == torch.float16 and pqs.shape == (tensors[f"{name}.weight"].shape[1],)
        assert torch.equal(pqs, torch.ones_like(pqs))
    assert set(json.loads((trt / "kiln-lineage.json").read_text())) and result.quant_algo == "W4A16_AWQ"


def test_int4_awq_exports_are_left_as_modelopt_writes_them(tiny_dir: Path, tmp_path: Path) -> None:
    result = _run(tiny_dir, tmp_path, Recipe(name="r", quantization="int4_awq", group_size=32))
    config = json.loads((result.trtllm_dirs["tp1pp1"] / "config.json").read_text())
    assert config["quantization"]["pre_quant_scale"] is True
    hf = load_file(str(result.hf_dir / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.pre_quant_scale" not in hf  # folded into the norm by ModelOpt


def test_int4_wo_engines_compute_as_before_the_pre_quant_scale_fix(tiny_dir: Path, tmp_path: Path) -> None:
    """kiln's torch engine treats a missing pre-quant scale as ones: the ones written into the HF export and
    the flag set in the TensorRT-LLM checkpoint change no logit."""
    import shutil

    from safetensors.torch import save_file

    from kiln.engine.torch import TorchBackend
    from kiln.profiles import Target

    result = _run(
        tiny_dir, tmp_path / "q", Recipe(name="r", quantization="int4_wo", group_size=32), calibration=None
    )
    before = shutil.copytree(result.hf_dir, tmp_path / "hf-before")
    tensors = load_file(str(before / "model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if not k.endswith(".pre_quant_scale")},
        str(before / "model.safetensors"),
    )
    target = Target(
        name="cpu", dtype="float32", limits={"max_batch_size": 1, "max_input_len": 32, "max_seq_len": 64}
    )
    backend = TorchBackend()
    ids = list(range(5, 29))
    logits = {}
    for name, source in (
        ("trtllm", result.trtllm_dirs["tp1pp1"]),
        ("hf", result.hf_dir),
        ("hf-before", before),
    ):
        logits[name] = backend.load(
            backend.compile(source, target, tmp_path / f"engine-{name}", {"model_sha": "t"})
        ).logits(ids)
    assert torch.equal(logits["hf"], logits["hf-before"])
    assert (logits["trtllm"] - logits["hf"]).abs().max().item() < 1e-3
