"""Every model family through the real pipeline: ``kiln.quantize`` export -> torch engine -> the same logits
and greedy tokens as HF transformers (unquantized) or ModelOpt's fake-quant model (quantized).

Each model is a small random-weight model built from the family's real transformers config class, with
the options that make the family distinct turned on (sliding windows shorter than the prompt, soft-caps,
LongRoPE factors, several experts with top-2, non-trivial norm weights). Tolerances are float32 ones:
1e-4 on logits of magnitude ~1 for unquantized engines, 1e-4 for the quantized ones too (the engine
applies ModelOpt's fake-quant numerics, dequantized, in float32); never accuracy claims.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from kiln.calibration import TokenSet
from kiln.engine.base import GenerationRequest, SamplingParams
from kiln.engine.torch import TorchBackend
from kiln.errors import ModelSourceError, UnsupportedCombinationError
from kiln.families import FAMILIES, family_for
from kiln.profiles import Recipe, Target, load_request
from kiln.quantize import modelopt_config, quantize

VOCAB = 256
BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
)
# per architecture: the config options that make the family itself (and that the engine must get right)
CASES = {
    "Qwen3ForCausalLM": dict(head_dim=32, tie_word_embeddings=False),
    "Gemma3ForCausalLM": dict(
        head_dim=32,
        sliding_window=8,
        query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    "Gemma2ForCausalLM": dict(
        head_dim=32,
        sliding_window=8,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=24,
        tie_word_embeddings=True,
    ),
    "Phi3ForCausalLM": dict(
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        original_max_position_embeddings=64,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0 + 0.2 * i for i in range(4)],
            "long_factor": [2.0 + 0.5 * i for i in range(4)],
        },
    ),
    "MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen3MoeForCausalLM": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        head_dim=16,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
}


def make_model(out: Path, architecture: str, dtype: torch.dtype = torch.bfloat16, **extra) -> Path:
    """A random model of ``architecture`` saved with ``save_pretrained``, norms and biases non-trivial; bf16
    weights by default, which the TensorRT-LLM export's float16 holds exactly (engines and references run
    float32); float32 for quantized comparisons, where a bf16 ``w / scale`` lands on rounding midpoints."""
    family = architecture.removesuffix("ForCausalLM")
    config_class = getattr(transformers, "Gemma3TextConfig" if family == "Gemma3" else f"{family}Config")
    config = config_class(**{**BASE, **CASES[architecture], **extra}, architectures=[architecture])
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config)
    # HF initialises norms to 1 (Gemma: 0) and biases to 0, which would hide their paths
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0 if "Gemma" not in architecture else 0.0, 0.3)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    model.to(dtype).save_pretrained(out)
    return out


def cpu_target(max_seq_len: int = 128) -> Target:
    return Target(
        name="cpu-test",
        dtype="float32",
        limits={"max_batch_size": 4, "max_input_len": min(64, max_seq_len // 2), "max_seq_len": max_seq_len},
    )


def compile_engine(checkpoint: Path, out: Path, max_seq_len: int = 128):
    backend = TorchBackend()
    return backend.load(backend.compile(checkpoint, cpu_target(max_seq_len), out, {"model_sha": "test"}))


def ids(n: int, seed: int = 3) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def kiln_export(hf_dir: Path, out: Path, recipe: Recipe, calibration: TokenSet | None = None) -> Path:
    """The checkpoint the torch engine compiles for this family, exported by ``kiln.quantize``."""
    family = family_for(json.loads((hf_dir / "config.json").read_text())["architectures"][0])
    result = quantize(
        hf_dir,
        recipe,
        layouts=[(1, 1)],
        output_dir=out,
        dtype="float32",
        device="cpu",
        lineage={},
        calibration=calibration,
        formats=(family.engine_source,),
    )
    return result.trtllm_dirs["tp1pp1"] if family.engine_source == "trtllm" else result.hf_dir


def reference_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by definition: the argmax of a full forward pass over everything so far, each step.
    (HF's cached ``generate`` for Gemma 2's sliding layers disagrees with its own full forward pass.)"""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]), use_cache=False).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def assert_greedy_like(engine, reference: torch.nn.Module, prompt: list[int], other: list[int]) -> None:
    expected = reference_greedy(reference, prompt, 16)
    alone = engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=16))])[0].token_ids
    batched = engine.generate(
        [
            GenerationRequest(other, SamplingParams(max_new_tokens=8)),
            GenerationRequest(prompt, SamplingParams(max_new_tokens=16)),
        ]
    )[1].token_ids
    assert alone == expected and batched == expected


@pytest.mark.parametrize("architecture", list(CASES))
def test_family_unquantized_engine_matches_hf(tmp_path: Path, architecture: str) -> None:
    hf_dir = make_model(tmp_path / "hf", architecture)
    checkpoint = kiln_export(hf_dir, tmp_path / "q", Recipe(name="b"))
    engine = compile_engine(checkpoint, tmp_path / "engine")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = ids(40)  # longer than every sliding window above
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    if architecture == "Phi3ForCausalLM":
        # max_seq_len 128 > original 64: the engine's RoPE is the long-factor one, which HF uses from 65
        # tokens
        tokens = ids(100)
        with torch.no_grad():
            expected = hf(torch.tensor([tokens])).logits[0]
    assert (engine.logits(tokens) - expected).abs().max().item() < 1e-4
    if architecture != "Phi3ForCausalLM":  # a short Phi-3 sequence is HF's short-factor case: the next test
        assert_greedy_like(engine, hf, tokens[:12], tokens[20:30])


def test_phi3_short_rope_engine_matches_hf_below_the_original_length(tmp_path: Path) -> None:
    """An engine of max_seq_len <= original_max_position_embeddings keeps the short factors, as HF does
    there."""
    hf_dir = make_model(tmp_path / "hf", "Phi3ForCausalLM")
    engine = compile_engine(
        kiln_export(hf_dir, tmp_path / "q", Recipe(name="b")), tmp_path / "engine", max_seq_len=64
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = ids(40)
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    assert (engine.logits(tokens) - expected).abs().max().item() < 1e-4
    assert_greedy_like(engine, hf, tokens[:12], tokens[20:30])


def _fake_quant(hf_dir: Path, recipe: Recipe, calibration: TokenSet | None) -> torch.nn.Module:
    """ModelOpt's fake-quant model for the recipe, calibrated exactly as kiln.quantize calibrates."""
    import modelopt.torch.quantization as mtq

    from kiln.quantize import _forward_loop, _seed_everything

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    _seed_everything(0)
    loop = _forward_loop(calibration.token_ids, "cpu", 8, None) if calibration else None
    with torch.inference_mode(False):
        mtq.quantize(model, modelopt_config(recipe), forward_loop=loop)
    return model


CALIBRATION = TokenSet(token_ids=[ids(32, seed=s) for s in range(10, 18)], sha256="test", source="test")


@pytest.mark.parametrize(
    ("architecture", "quantization"),
    [
        ("Qwen3ForCausalLM", "int8_wo"),
        ("Gemma3ForCausalLM", "int8_wo"),
        ("Gemma2ForCausalLM", "fp8"),
        ("Phi3ForCausalLM", "int8_wo"),
        ("MixtralForCausalLM", "fp8"),
        ("Qwen3MoeForCausalLM", "int8_wo"),
    ],
)
def test_family_quantized_engine_matches_modelopt_fake_quant(
    tmp_path: Path, architecture: str, quantization: str
) -> None:
    from tests.fixtures.engine import align_to_checkpoint

    trtllm = family_for(architecture).engine_source == "trtllm"
    hf_dir = make_model(tmp_path / "hf", architecture, dtype=torch.bfloat16 if trtllm else torch.float32)
    recipe = Recipe(name="q", quantization=quantization)
    calibration = CALIBRATION if quantization in ("fp8", "int8_sq") else None
    checkpoint = kiln_export(hf_dir, tmp_path / "q", recipe, calibration)
    engine = compile_engine(checkpoint, tmp_path / "engine", max_seq_len=64)
    reference = _fake_quant(hf_dir, recipe, calibration)
    if trtllm:  # its float16 export rounds the scales: align the reference to the checkpoint's codes
        align_to_checkpoint(reference, checkpoint)
    tokens = ids(40)
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0]
    gap = (engine.logits(tokens) - expected).abs()
    if calibration is None:  # weight-only: the same dequantized weights, float32 rounding only
        assert gap.max().item() < 1e-4
    else:
        # Activations quantize by the exported scale (x * (1 / (amax / bound))), the fake quant by amax
        # (x * (bound / amax)): one float ulp apart, which moves a value sitting on a rounding midpoint one
        # step now and then. Such a flip is local: all but a few logits stay float32-close.
        assert (gap > 1e-4).float().mean().item() < 0.02 and gap.max().item() < 2e-2
    assert_greedy_like(engine, reference, tokens[:12], tokens[20:30])


def test_moe_grouped_gather_and_dense_paths_agree() -> None:
    """The three ways of running the experts compute the same thing (prefill groups by expert; decode gathers
    a few tokens' experts or runs every expert over a larger batch), with nothing looping over tokens."""
    from kiln.engine.torch.moe import MoE, StackedExperts

    g = torch.Generator().manual_seed(0)
    experts, hidden, ffn = 8, 32, 48

    def stacked(out: int, inp: int) -> StackedExperts:
        return StackedExperts(
            "dense",
            {"weight": torch.randn(experts, out, inp, generator=g) * 0.2},
            dtype=torch.float32,
            device=torch.device("cpu"),
        )

    moe = MoE(
        torch.randn(experts, hidden, generator=g),
        {"fc": stacked(ffn, hidden), "gate": stacked(ffn, hidden), "proj": stacked(hidden, ffn)},
        top_k=2,
        normalize=True,
        activation=torch.nn.functional.silu,
    )
    for tokens in (1, 3, 16):  # gather (1*2, 3*2 < 8 experts) and dense (16*2 >= 8) decode paths
        x = torch.randn(tokens, hidden, generator=g)
        weights, chosen = moe.route(x)
        reference = torch.zeros_like(x)
        for t in range(tokens):  # the definition, one token at a time
            for w, e in zip(weights[t], chosen[t].tolist(), strict=True):
                reference[t] += w * moe._expert(x[t : t + 1], e)[0]
        for decode in (False, True):
            assert torch.allclose(moe(x, decode=decode), reference, atol=1e-5)


CPU = {"name": "cpu"}


def _local_request(model_dir: Path, recipes: list, targets: list) -> object:
    recipes = [{"name": r, "quantization": r} if isinstance(r, str) else r for r in recipes]
    return load_request(
        {
            "name": "fam",
            "model": {"local_dir": str(model_dir)},
            "recipes": recipes,
            "targets": targets,
            "registry": {"model_name": "fam"},
        }
    )


@pytest.mark.parametrize(
    ("architecture", "model_type"),
    [
        ("GPT2LMHeadModel", "gpt2"),
        ("BertForMaskedLM", "bert"),
        ("Gemma3ForConditionalGeneration", "gemma3"),
    ],
)
def test_unsupported_architecture_is_refused_before_any_weights_are_read(
    tmp_path: Path, architecture: str, model_type: str
) -> None:
    from kiln.hub import check_local_dir

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"architectures": [architecture], "model_type": model_type})
    )
    (model / "model.safetensors").write_bytes(b"not read")  # never opened: the architecture check comes first
    request = _local_request(model, ["none"], [CPU])
    with pytest.raises(ModelSourceError) as refused:
        check_local_dir(request.model)
    message = str(refused.value)
    assert architecture in message and all(arch in message for f in FAMILIES for arch in f.architectures)


def test_family_recipe_and_artifact_refused_at_preflight(tmp_path: Path) -> None:
    """A recipe ModelOpt cannot export for MoE experts, and a TensorRT-LLM engine of an HF-only family, are
    refused by pre-flight with the reason, before any calibration."""
    from kiln.preflight import check_request

    moe = make_model(tmp_path / "mixtral", "MixtralForCausalLM")
    request = _local_request(
        moe, [{"name": "awq", "quantization": "int4_awq", "group_size": 32}, "fp8"], [CPU]
    )
    with pytest.raises(UnsupportedCombinationError) as refused:
        check_request(request)
    assert "recipe 'awq' x target 'cpu'" in str(refused.value) and "int4_awq is not supported" in str(
        refused.value
    )
    assert "recipe 'fp8'" not in str(refused.value)

    gemma = make_model(tmp_path / "gemma", "Gemma3ForCausalLM")
    trt = {
        "name": "h100-engine",
        "backend": "tensorrt_llm",
        "device": "cuda",
        "sm": "sm90",
        "gpu": "h100",
        "artifact": "engine",
        "optional": True,
    }
    with pytest.raises(
        UnsupportedCombinationError, match="ModelOpt exports no TensorRT-LLM checkpoint for this family"
    ):
        check_request(_local_request(gemma, ["none"], [trt]))
    with pytest.raises(UnsupportedCombinationError, match="unsharded"):
        check_request(_local_request(gemma, ["none"], [{"name": "cpu-tp2", "limits": {"tp_size": 2}}]))


GEMMA_DIR = Path.home() / ".kiln" / "assets" / "gemma-3-270m"


@pytest.mark.slow
@pytest.mark.skipif(
    not (GEMMA_DIR / "config.json").is_file(),
    reason="needs the Gemma-3-270M asset: `kiln assets prepare --model gemma3-270m`",
)
def test_gemma3_270m_baseline_engine_perplexity_equals_hf(tmp_path: Path) -> None:
    """The real trained Gemma 3: the engine compiled from kiln's export scores the held-out tokens as HF
    does."""
    import math

    from kiln.calibration import heldout_set
    from kiln.hub import load_tokenizer
    from kiln.profiles import Evaluation
    from kiln.validation.accuracy import rolling_windows

    heldout = heldout_set(Evaluation(heldout_tokens=1024), load_tokenizer(GEMMA_DIR))
    export = quantize(
        GEMMA_DIR,
        Recipe(name="b"),
        layouts=[(1, 1)],
        output_dir=tmp_path / "q",
        dtype="float32",
        device="cpu",
        lineage={},
        calibration=None,
        formats=("hf",),
    )
    target = Target(
        name="cpu", dtype="float32", limits={"max_batch_size": 1, "max_input_len": 256, "max_seq_len": 512}
    )
    backend = TorchBackend()
    engine = backend.load(backend.compile(export.hf_dir, target, tmp_path / "engine", {"model_sha": "gemma"}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(GEMMA_DIR, dtype=torch.float32).eval()
    nll = {"engine": 0.0, "hf": 0.0}
    count = 0
    for window in (w for seq in heldout.token_ids for w in rolling_windows(seq, 512)):
        targets = torch.tensor(window[1:])[:, None]
        with torch.no_grad():
            hf_logits = hf(torch.tensor([window])).logits[0, :-1].float()
        for name, logits in (("engine", engine.logits(window)[:-1]), ("hf", hf_logits)):
            nll[name] -= torch.log_softmax(logits, dim=-1).gather(1, targets).sum().item()
        count += len(window) - 1
    ppl = {name: math.exp(value / count) for name, value in nll.items()}
    print(f"gemma-3-270m held-out perplexity over {count} predicted tokens: {ppl}")
    assert abs(ppl["engine"] - ppl["hf"]) / ppl["hf"] < 0.005, ppl
    assert 5 < ppl["hf"] < 60  # a trained model on English prose, not a random one


def test_families_doc_is_generated_from_the_registry() -> None:
    from kiln.doctor import families_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "FAMILIES.md"
    assert doc.read_text() == families_markdown(), (
        "regenerate docs/FAMILIES.md with kiln.doctor.families_markdown()"
    )
    for family in FAMILIES:
        assert all(arch in doc.read_text() for arch in family.architectures)
