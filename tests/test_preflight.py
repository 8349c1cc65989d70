"""Pre-flight: every recipe x target pair is checked before any work (SM, contract, memory, parallelism,
backend)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kiln import preflight
from kiln.engine.trtllm import api
from kiln.errors import UnsupportedCombinationError
from kiln.host import GpuInfo, HostReport, TensorRTLLMStatus
from kiln.hub import ModelInfo, inspect_model
from kiln.profiles import Recipe, Target, load_request

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
PROFILES = Path(__file__).resolve().parents[1] / "profiles"

FP8 = Recipe(name="fp8", quantization="fp8")
NVFP4 = Recipe(name="nvfp4", quantization="nvfp4")
NONE = Recipe(name="none", quantization="none")
FP8_KV = Recipe(name="fp8-kv", quantization="int8_sq", kv_cache_dtype="fp8")


def target(name: str, sm: str, **extra: object) -> Target:
    data = {
        "name": name,
        "backend": "tensorrt_llm",
        "device": "cuda",
        "gpu": name.split("-")[0],
        "sm": sm,
        "gpu_memory_gib": 80,
        "work_pool": f"kiln-{name}",
        "optional": True,
        "limits": {"max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 2048, "max_num_tokens": 4096},
    }
    data.update(extra)
    return Target.model_validate(data)


A100, H100, B200 = (
    target("a100-trtllm", "sm80"),
    target("h100-trtllm", "sm90"),
    target("b200-trtllm", "sm100"),
)

LLAMA_70B = ModelInfo(
    architecture="LlamaForCausalLM",
    model_type="llama",
    num_layers=80,
    hidden_size=8192,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=28672,
    vocab_size=128256,
    torch_dtype="bfloat16",
    param_count=70_553_706_496,
    tie_word_embeddings=False,
    attention_bias=False,
    max_position_embeddings=131072,
)
"""Llama-3.1-70B's published config.json shape and parameter count (an input, not a measured result)."""


def request(recipes: list[Recipe], targets: list[Target], model_dir: Path | None = None) -> object:
    return load_request(
        {
            "name": "pf",
            "model": {"local_dir": str(model_dir or "/nonexistent")},
            "recipes": [r.model_dump() for r in recipes],
            "targets": [t.model_dump() for t in targets],
            "registry": {"model_name": "pf"},
        }
    )


# --- SM vs recipe -------------------------------------------------------------------------------------------


def test_fp8_on_sm80_is_refused_before_any_work() -> None:
    with pytest.raises(UnsupportedCombinationError) as caught:
        preflight.check_request_static(request([FP8], [A100]), source="req.yaml")
    assert "recipe 'fp8' x target 'a100-trtllm': fp8 needs SM >= 89; target 'a100-trtllm' is sm80" in str(
        caught.value
    )
    assert str(caught.value).startswith("req.yaml:")


def test_nvfp4_below_sm100_is_refused_and_allowed_on_sm100() -> None:
    with pytest.raises(
        UnsupportedCombinationError, match="nvfp4 needs SM >= 100; target 'h100-trtllm' is sm90"
    ):
        preflight.check_request_static(request([NVFP4], [H100]))
    preflight.check_request_static(request([NVFP4], [B200]))


def test_nvfp4_is_refused_on_a_cpu_target() -> None:
    cpu = Target(name="cpu", backend="torch", device="cpu")
    with pytest.raises(UnsupportedCombinationError, match="needs CUDA"):
        preflight.check_request_static(request([NVFP4], [cpu]))


def test_fp8_runs_from_sm89() -> None:
    preflight.check_request_static(request([FP8], [H100, target("l40s-trtllm", "sm89")]))


def test_fp8_kv_cache_runs_on_an_sm80_trtllm_target_but_not_on_the_torch_backend() -> None:
    """Issue 18 item 4: TensorRT-LLM's matrix lists an FP8 KV cache on Ampere (its builder only turns FP8
    context FMHA off there); kiln's torch engine keeps its own rule (FP8 KV from SM89)."""
    preflight.check_request_static(request([FP8_KV], [A100]))
    awq_kv = Recipe(name="awq-kv", quantization="int4_awq", kv_cache_dtype="fp8", group_size=64)
    preflight.check_request_static(request([awq_kv], [A100.model_copy(update={"artifact": "hf_checkpoint"})]))
    torch_a100 = Target(name="a100-torch", backend="torch", device="cuda", gpu="a100", sm="sm80")
    with pytest.raises(UnsupportedCombinationError, match="kv_cache_dtype fp8 needs SM >= 89"):
        preflight.check_request_static(request([FP8_KV], [torch_a100]))


def test_int8_kv_cache_is_refused_for_the_torch_backend_and_runs_on_a_trtllm_engine() -> None:
    """The torch engine runs unquantized or FP8 KV caches: an int8 one is refused before calibration."""
    int8_kv = Recipe(name="w8-kv8", quantization="int8_wo", kv_cache_dtype="int8")
    cpu = Target(
        name="cpu", dtype="float32", limits={"max_batch_size": 2, "max_input_len": 16, "max_seq_len": 32}
    )
    with pytest.raises(
        UnsupportedCombinationError, match="kv_cache_dtype int8 is not supported by the torch backend"
    ):
        preflight.check_request_static(request([int8_kv], [cpu]))
    sq_kv8 = Recipe(name="sq-kv8", quantization="int8_sq", kv_cache_dtype="int8")
    # TensorRT-LLM engines run INT8 KV caches up to SM90
    preflight.check_request_static(request([sq_kv8], [H100]))
    preflight.check_request_static(request([FP8_KV.model_copy(update={"quantization": "int8_wo"})], [cpu]))


# --- TensorRT-LLM's per-SM, per-artifact support (issue 18) -------------------------------------------------

B200_HF = B200.model_copy(update={"name": "b200-trtllm-hf", "artifact": "hf_checkpoint"})
H100_HF = H100.model_copy(update={"name": "h100-trtllm-hf", "artifact": "hf_checkpoint"})


def _refusal(recipe: Recipe, on: Target) -> str:
    with pytest.raises(UnsupportedCombinationError) as caught:
        preflight.check_request_static(request([recipe], [on]))
    return str(caught.value)


@pytest.mark.parametrize(
    ("quantization", "kv", "raised"),
    [
        ("int8_wo", "auto", "INT8/INT4 quantization is not supported on SM>=100."),
        ("int4_wo", "auto", "INT8/INT4 quantization is not supported on SM>=100."),
        ("int4_awq", "auto", "INT8/INT4 quantization is not supported on SM>=100."),
        ("w4a8_awq", "auto", "INT8/INT4 quantization is not supported on SM>=100."),
        ("int8_sq", "auto", "SmoothQuant is not supported on SM>=100."),
        ("fp8", "int8", "INT8/INT4 quantization is not supported on SM>=100."),
    ],
)
def test_what_trtllm_build_raises_for_on_sm100_is_refused_before_calibration(
    quantization: str, kv: str, raised: str
) -> None:
    """Issue 18 item 2: trtllm-build's SM gate (100 <= SM < 120) raises after calibration; pre-flight refuses
    first."""
    recipe = Recipe(name="r", quantization=quantization, kv_cache_dtype=kv, group_size=64)
    message = _refusal(recipe, B200)
    assert "recipe 'r' x target 'b200-trtllm'" in message and raised in message
    assert "is sm100 (b200)" in message and "support.engine." in message
    preflight.check_request_static(
        request(
            [recipe.model_copy(update={"quantization": "int8_sq"}) if quantization == "int8_wo" else recipe],
            [H100],
        )
    )


def test_sm_ranges_have_a_maximum_per_artifact() -> None:
    """INT4 engines stop at SM90 (the builder gate), FP8 and NVFP4 keep going."""
    int4 = Recipe(name="int4", quantization="int4_awq", group_size=64)
    assert "int4_awq needs SM 80-90; target 'b200-trtllm' is sm100" in _refusal(int4, B200)
    assert "int4_awq needs SM 80-90; target 'b200-trtllm-hf' is sm100" in _refusal(int4, B200_HF)
    w4a8 = Recipe(name="w4a8", quantization="w4a8_awq", group_size=64)
    assert "w4a8_awq needs SM 89-90; target 'a100-trtllm' is sm80" in _refusal(w4a8, A100)
    preflight.check_request_static(request([FP8, NVFP4, NONE], [B200, B200_HF]))


@pytest.mark.parametrize(
    "on", [H100_HF, B200_HF, A100.model_copy(update={"artifact": "hf_checkpoint"})], ids=lambda t: t.name
)
def test_int8_smoothquant_has_no_pytorch_backend_loader(on: Target) -> None:
    """Issue 18 item 3: the PyTorch backend's get_quant_method ends in 'unsupported quant mode' for
    W8A8_SQ_PER_CHANNEL, although it is a QuantAlgo name; the engine path (1.2, up to SM90) builds it."""
    message = _refusal(Recipe(name="sq", quantization="int8_sq"), on)
    assert "not supported by TensorRT-LLM 1.3 HF checkpoint (PyTorch backend) on any SM" in message
    assert "unsupported quant mode" in message
    preflight.check_request_static(request([Recipe(name="sq", quantization="int8_sq")], [H100]))


def test_a_pair_the_contract_does_not_confirm_is_refused_as_unverified() -> None:
    sm120 = target("rtx6000-trtllm", "sm120")
    message = _refusal(Recipe(name="sq", quantization="int8_sq"), sm120)
    assert "on sm120 is not confirmed for TensorRT-LLM 1.2 engine" in message and "UNVERIFIED" in message
    assert "it runs on SM 80-90" in message
    preflight.check_request_static(request([FP8, NVFP4, NONE], [sm120]))
    unknown = target("orin-trtllm", "sm87")
    assert "records no fact for sm87" in _refusal(NONE, unknown)


def test_a_1_2_hf_checkpoint_target_is_checked_against_the_1_2_contract() -> None:
    v12_hf = H100_HF.model_copy(update={"tensorrt_llm_version": "1.2.1"})
    assert "TensorRT-LLM 1.2 HF checkpoint (PyTorch backend)" in _refusal(
        Recipe(name="sq", quantization="int8_sq"), v12_hf
    )
    preflight.check_request_static(request([FP8], [v12_hf]))


def test_every_bad_pair_is_listed_at_once() -> None:
    with pytest.raises(UnsupportedCombinationError) as caught:
        preflight.check_request_static(request([FP8, NVFP4, NONE], [A100, H100]))
    assert "3 recipe x target pair(s)" in str(caught.value)


# --- memory -------------------------------------------------------------------------------------------------


def test_a_model_that_cannot_fit_the_gpu_is_refused() -> None:
    found = preflight.memory_findings(NONE, H100, LLAMA_70B)
    assert [f.level for f in found] == ["error"]
    assert "the target's GPU has 80 GiB" in found[0].message and "raise tp_size" in found[0].message


def test_the_same_model_fits_when_split_over_four_gpus() -> None:
    tp4 = H100.model_copy(
        update={"gpus_per_worker": 4, "limits": H100.limits.model_copy(update={"tp_size": 4})}
    )
    assert [f.level for f in preflight.memory_findings(FP8, tp4, LLAMA_70B)] == ["ok"]
    assert preflight.parallelism_findings(tp4, LLAMA_70B) == []


def test_kv_cache_at_the_build_limits_can_exhaust_memory(smollm2_dir: Path) -> None:
    info = inspect_model(smollm2_dir)
    small = H100.model_copy(update={"gpu_memory_gib": 24})
    assert [f.level for f in preflight.memory_findings(FP8, small, info)] == ["ok"]
    huge_kv = small.model_copy(
        update={
            "limits": small.limits.model_copy(
                update={"max_batch_size": 512, "max_input_len": 4096, "max_seq_len": 8192}
            )
        }
    )
    estimate = preflight.estimate_memory(info, FP8, huge_kv)
    assert estimate.kv_cache > estimate.weights * 100  # the KV cache, not the 135M weights, is what overflows
    found = preflight.memory_findings(FP8, huge_kv, info)
    assert found[0].level == "error" and "KV cache" in found[0].message


def test_quantized_weights_are_estimated_smaller(smollm2_dir: Path) -> None:
    info = inspect_model(smollm2_dir)
    none, fp8 = preflight.estimate_memory(info, NONE, H100), preflight.estimate_memory(info, FP8, H100)
    assert fp8.weights < none.weights and fp8.kv_cache == none.kv_cache
    # bf16 weights: every parameter twice as bytes, plus TensorRT-LLM's own lm_head copy of the tied embedding
    assert info.param_count * 2 <= none.weights <= (info.param_count + info.vocab_size * info.hidden_size) * 2
    fp8_kv = Recipe(name="kv", quantization="fp8", kv_cache_dtype="fp8")
    assert preflight.estimate_memory(info, fp8_kv, H100).kv_cache * 2 == none.kv_cache


# --- parallelism --------------------------------------------------------------------------------------------


def test_tp_times_pp_beyond_the_workers_gpus_is_refused() -> None:
    tp2pp2 = H100.model_copy(
        update={"gpus_per_worker": 2, "limits": H100.limits.model_copy(update={"tp_size": 2, "pp_size": 2})}
    )
    found = preflight.parallelism_findings(tp2pp2, None)
    assert found[0].level == "error" and "= 4 GPUs, but gpus_per_worker is 2" in found[0].message
    with pytest.raises(UnsupportedCombinationError, match="gpus_per_worker"):
        preflight.check_request(request([NONE], [tp2pp2]), local_targets=False)


def test_tp_must_split_the_heads(smollm2_dir: Path) -> None:
    info = inspect_model(smollm2_dir)  # 9 attention heads, 3 KV heads
    tp2 = H100.model_copy(
        update={"gpus_per_worker": 2, "limits": H100.limits.model_copy(update={"tp_size": 2})}
    )
    tp3 = H100.model_copy(
        update={"gpus_per_worker": 3, "limits": H100.limits.model_copy(update={"tp_size": 3})}
    )
    assert any(
        "does not divide the model's 9 attention heads" in f.message
        for f in preflight.parallelism_findings(tp2, info)
    )
    assert preflight.parallelism_findings(tp3, info) == []


# --- contract and pins --------------------------------------------------------------------------------------


def test_engine_artifact_on_a_version_without_engine_path_is_refused() -> None:
    v13 = H100.model_copy(update={"tensorrt_llm_version": "1.3.0"})
    found = preflight.contract_findings(FP8, v13, modelopt_version=None)
    assert found[0].level == "error" and "set artifact: hf_checkpoint" in found[0].message
    hf = v13.model_copy(update={"artifact": "hf_checkpoint"})
    assert [
        f for f in preflight.contract_findings(FP8, hf, modelopt_version=None) if f.level == "error"
    ] == []


def test_modelopt_older_than_the_pin_is_refused_newer_is_a_warning() -> None:
    contract = api.load_contract("1.2")
    assert contract.pin("nvidia-modelopt") == "~=0.37.0"  # TensorRT-LLM 1.2.1 PKG-INFO
    older = preflight.contract_findings(FP8, H100, modelopt_version="0.33.0")
    assert [f.level for f in older if f.check == "pins"] == ["error"]
    same = preflight.contract_findings(FP8, H100, modelopt_version="0.37.2")
    assert [f.level for f in same if f.check == "pins"] == ["ok"]
    newer = preflight.contract_findings(FP8, H100, modelopt_version="0.47.0")
    assert [f.level for f in newer if f.check == "pins"] == ["warning"]


# --- the backend where the request runs ---------------------------------------------------------------------


@pytest.mark.skipif(HAS_TRTLLM, reason="checks a machine without tensorrt_llm")
def test_a_required_trtllm_target_fails_fast_here() -> None:
    required = H100.model_copy(update={"optional": False})
    with pytest.raises(UnsupportedCombinationError) as caught:
        preflight.check_request(request([NONE], [required]), source="req.yaml", local_targets=True)
    message = str(caught.value)
    assert "pre-flight found 1 problem(s) before any work" in message
    assert "tensorrt_llm package is not installed" in message and "kiln-h100-trtllm" in message


@pytest.mark.skipif(HAS_TRTLLM, reason="checks a machine without tensorrt_llm")
def test_an_optional_trtllm_target_is_a_warning_and_remote_targets_are_not_checked_here() -> None:
    warnings = preflight.check_request(request([NONE], [H100]), local_targets=True)
    assert any(f.check == "backend" and "optional: it will be skipped" in f.message for f in warnings)
    required = H100.model_copy(update={"optional": False})
    assert not [
        f
        for f in preflight.check_request(request([NONE], [required]), local_targets=False)
        if f.check == "backend"
    ]


def test_shipped_targets_pass_their_own_static_checks() -> None:
    import yaml

    targets = [
        Target.model_validate(t) for t in yaml.safe_load((PROFILES / "targets.yaml").read_text())["targets"]
    ]
    found = preflight.request_findings(request([NONE], targets), local_targets=False)
    assert [f for f in found if f.level == "error"] == []


# --- this machine -------------------------------------------------------------------------------------------


def _host(*gpus: GpuInfo, trt: TensorRTLLMStatus | None = None) -> HostReport:
    return HostReport(
        python="3.12",
        platform="linux",
        components=[],
        gpus=list(gpus),
        cuda_runtime="13.0",
        driver="580",
        tensorrt_llm=trt or TensorRTLLMStatus(False, why="not installed"),
    )


def test_host_with_another_gpu_is_refused() -> None:
    h100 = GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", sm=90, memory_gib=79.1)
    found = preflight.host_findings(A100, _host(h100))
    assert any(f.level == "error" and "the target is sm80" in f.message for f in found)
    found = preflight.host_findings(H100, _host(h100))
    assert [f.level for f in found if f.check == "gpu"] == ["ok"]


def test_host_with_too_few_gpus_is_refused() -> None:
    tp2 = H100.model_copy(update={"gpus_per_worker": 2})
    found = preflight.host_findings(tp2, _host(GpuInfo(0, "H100", 90, 79.1)))
    assert any("1 GPU(s) here, the target needs gpus_per_worker 2" in f.message for f in found)


def test_host_with_an_old_tensorrt_llm_is_refused() -> None:
    trt = TensorRTLLMStatus(True, version="1.3.0", trtllm_build=None)
    found = preflight.host_findings(H100, _host(GpuInfo(0, "H100", 90, 79.1), trt=trt))
    assert any(f.check == "contract" and "has no engine path" in f.message for f in found)
    assert any(f.check == "backend" and "trtllm-build is not on PATH" in f.message for f in found)


def test_host_with_a_tensorrt_llm_older_than_kiln_supports_is_a_finding() -> None:
    trt = TensorRTLLMStatus(True, version="0.18.2", trtllm_build="/usr/local/bin/trtllm-build")
    found = preflight.host_findings(H100, _host(GpuInfo(0, "H100", 90, 79.1), trt=trt))
    assert any(f.level == "error" and "older than kiln supports" in f.message for f in found)


def test_a_multi_rank_torch_target_is_refused_by_a_build_and_says_how_to_run_it() -> None:
    cpu_pp2 = Target(name="cpu-pp2", backend="torch", device="cpu", gpus_per_worker=2, limits={"pp_size": 2})
    with pytest.raises(
        UnsupportedCombinationError, match=r"torch engine of 2 ranks.*torchrun --nproc-per-node 2"
    ):
        preflight.check_request(request([NONE], [cpu_pp2]), local_targets=False)
    trt_tp2 = H100.model_copy(
        update={"gpus_per_worker": 2, "limits": H100.limits.model_copy(update={"tp_size": 2})}
    )
    assert not [
        f
        for f in preflight.check_request(request([NONE], [trt_tp2]), local_targets=False)
        if f.level == "error"
    ]


LLAMA_8B = ModelInfo(
    architecture="LlamaForCausalLM",
    model_type="llama",
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
    torch_dtype="bfloat16",
    param_count=8_030_261_248,
    tie_word_embeddings=False,
    attention_bias=False,
    max_position_embeddings=131072,
)
"""Llama-3.1-8B's published config.json shape and parameter count (an input, not a measured result)."""


def test_throughput_target_fits_an_8b_model_and_pre_flight_refuses_twice_its_batch() -> None:
    """The packaged h200-torch target (256 sequences of 2048 tokens) fits a Llama-3.1-8B in bf16 with its
    bf16 KV cache; at 512 sequences the KV cache alone passes the H200's memory unless it is FP8."""
    from kiln.profiles import library

    targets, _ = library("targets")
    h200 = Target.model_validate(targets["h200-torch"])
    assert h200.limits.max_batch_size >= 256 and h200.gpu_memory_gib == 141
    assert [f.level for f in preflight.memory_findings(NONE, h200, LLAMA_8B)] == ["ok"]
    double = h200.model_copy(update={"limits": h200.limits.model_copy(update={"max_batch_size": 512})})
    found = preflight.memory_findings(NONE, double, LLAMA_8B)
    assert found[0].level == "error" and "max_batch_size" in found[0].message
    fp8_kv = Recipe(name="fp8-kv", quantization="fp8", kv_cache_dtype="fp8")
    assert [f.level for f in preflight.memory_findings(fp8_kv, double, LLAMA_8B)] == ["ok"]
