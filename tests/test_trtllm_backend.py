"""The tensorrt_llm backend: the HF-checkpoint artifact, failing (or skipping) where TensorRT-LLM is missing,
and, on a worker of NVIDIA's TensorRT-LLM image, a real build + generate + context logits (``gpu``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from kiln.constants import ENGINE_MANIFEST
from kiln.engine.base import GenerationRequest, SamplingParams, get_backend
from kiln.engine.manifest import EngineManifest
from kiln.engine.trtllm import api, backend
from kiln.errors import BackendUnavailableError, ContractError, ModelSourceError, UnsupportedCombinationError
from tests.fixtures.models import make_tiny_llama
from tests.test_trtllm_contract import H100, H100_HF, export_checkpoint

TINY_HF = H100_HF.model_copy(
    update={"limits": H100_HF.limits.model_copy(update={"max_input_len": 256, "max_seq_len": 512})}
)
"""The tiny Llama's max_position_embeddings is 512."""
HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
no_trtllm = pytest.mark.skipif(HAS_TRTLLM, reason="checks the behaviour where tensorrt_llm is missing")


@pytest.fixture(scope="module")
def fp8_hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_checkpoint(tmp_path_factory.mktemp("hf") / "fp8-hf", "fp8", fmt="hf")


# --- checkpoint path (>= 1.3) -------------------------------------------------------------------------------


def test_hf_checkpoint_is_published_with_its_serving_settings(
    tmp_path: Path, fp8_hf_checkpoint: Path
) -> None:
    contract = api.load_contract("1.3")
    lineage = {"model_sha": "abc123", "recipe": "fp8"}
    out = backend.package_hf_checkpoint(
        fp8_hf_checkpoint,
        TINY_HF,
        tmp_path / "artifact",
        lineage,
        contract,
        tools={"tensorrt_llm": "1.3.0", "gpu_sm": "sm90", "gpu_name": "H100"},
    )
    manifest = json.loads((out / ENGINE_MANIFEST).read_text())
    assert manifest["backend"] == "tensorrt_llm" and manifest["artifact"] == "hf_checkpoint"
    assert manifest["quant_algo"] == "FP8"  # read from ModelOpt's hf_quant_config.json
    assert manifest["limits"]["max_seq_len"] == 512 and manifest["sm"] == "sm90"
    assert manifest["contract"]["series"] == "1.3" and manifest["lineage"] == lineage
    assert manifest["llm_api"]["class"] == "tensorrt_llm:LLM"
    options = yaml.safe_load((out / backend.LLM_API_OPTIONS).read_text())
    assert options == manifest["llm_api"]["settings"]
    assert set(options) <= contract.llm_args_fields()
    assert options["kv_cache_config"]["enable_block_reuse"] is True
    copied = {p.name for p in fp8_hf_checkpoint.iterdir() if p.is_file()}
    assert copied <= {p.name for p in out.iterdir()}
    from kiln.hub import hash_directory

    assert manifest["checkpoint_sha256"] == hash_directory(fp8_hf_checkpoint)


def test_unquantized_hf_dir_is_published_without_quant_algo(tmp_path: Path) -> None:
    hf = make_tiny_llama(tmp_path / "plain")
    out = backend.package_hf_checkpoint(
        hf, TINY_HF, tmp_path / "artifact", {}, api.load_contract("1.3"), tools={}
    )
    assert json.loads((out / ENGINE_MANIFEST).read_text())["quant_algo"] is None


def test_hf_checkpoint_with_a_quant_algo_the_version_lacks_is_refused(
    tmp_path: Path, fp8_hf_checkpoint: Path
) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(fp8_hf_checkpoint, bad)
    quant_file = bad / api.load_contract("1.3").hf_quant_config_file()
    config = json.loads(quant_file.read_text())
    config["quantization"]["quant_algo"] = "FP6_E3M2"
    quant_file.write_text(json.dumps(config))
    with pytest.raises(ContractError, match="FP6_E3M2"):
        backend.package_hf_checkpoint(
            bad, TINY_HF, tmp_path / "artifact", {}, api.load_contract("1.3"), tools={}
        )
    assert not (tmp_path / "artifact").exists()  # nothing published


def test_hf_checkpoint_longer_than_the_model_is_refused(tmp_path: Path, fp8_hf_checkpoint: Path) -> None:
    with pytest.raises(
        UnsupportedCombinationError, match="max_seq_len 4096 exceeds the model's max_position_embeddings 512"
    ):
        backend.package_hf_checkpoint(
            fp8_hf_checkpoint, H100_HF, tmp_path / "artifact", {}, api.load_contract("1.3")
        )


def test_a_trtllm_checkpoint_is_not_an_hf_checkpoint(tmp_path: Path) -> None:
    trt = export_checkpoint(tmp_path / "trt", "none")
    with pytest.raises(ModelSourceError, match="export_hf_checkpoint"):
        backend._hf_dir(trt, {})
    assert backend._hf_dir(trt, {"hf_dir": str(make_tiny_llama(tmp_path / "hf"))}) == tmp_path / "hf"


# --- where TensorRT-LLM is missing --------------------------------------------------------------------------


@no_trtllm
def test_a_trtllm_target_says_where_it_runs() -> None:
    with pytest.raises(BackendUnavailableError) as caught:
        get_backend("tensorrt_llm").check_available(H100)
    message = str(caught.value)
    assert "tensorrt_llm package is not installed" in message
    assert "kiln-h100-trtllm" in message and "deploy/trtllm-work-pool.json" in message
    assert "optional: true" in message


@no_trtllm
def test_compile_fails_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="cannot run on this machine"):
        get_backend("tensorrt_llm").compile(tmp_path / "no-checkpoint", H100, tmp_path / "engine", {})
    assert not (tmp_path / "engine").exists()


@no_trtllm
def test_load_fails_with_where_to_load(tmp_path: Path, fp8_hf_checkpoint: Path) -> None:
    out = backend.package_hf_checkpoint(
        fp8_hf_checkpoint, TINY_HF, tmp_path / "artifact", {}, api.load_contract("1.3"), tools={}
    )
    with pytest.raises(BackendUnavailableError, match="TensorRT-LLM image"):
        get_backend("tensorrt_llm").load(out)


@no_trtllm
def test_optional_target_is_skipped_and_required_one_fails() -> None:
    from kiln.steps.engine import backend_skip

    reason = backend_skip(H100.model_copy(update={"optional": True}))
    assert reason is not None and "kiln-h100-trtllm" in reason
    with pytest.raises(BackendUnavailableError):
        backend_skip(H100)


def test_wrong_backend_target_is_refused() -> None:
    with pytest.raises(UnsupportedCombinationError, match="not tensorrt_llm"):
        get_backend("tensorrt_llm").check_available(H100.model_copy(update={"backend": "torch"}))


def test_engine_from_another_toolchain_or_gpu_is_refused(tmp_path: Path) -> None:
    from kiln.errors import EngineMismatchError

    # only what check_loadable reads (a whole record is read() and checked in test_manifest.py)
    manifest = EngineManifest.model_construct(
        artifact="engine", sm="sm90", toolchain={"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1"}
    )
    backend.check_loadable(
        manifest, tmp_path, {"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1", "gpu_sm": "sm90"}
    )
    with pytest.raises(EngineMismatchError, match="tensorrt_llm 1.2.1"):
        backend.check_loadable(manifest, tmp_path, {"tensorrt_llm": "1.2.0", "gpu_sm": "sm90"})
    with pytest.raises(EngineMismatchError, match="sm90"):
        backend.check_loadable(
            manifest, tmp_path, {"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1", "gpu_sm": "sm80"}
        )


# --- on a TensorRT-LLM worker -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRTLLM, reason="needs NVIDIA's TensorRT-LLM image (deploy/Dockerfile.trtllm)")
def test_build_generate_and_logits_on_this_worker(tmp_path: Path, smollm2_dir: Path) -> None:
    """SmolLM2 FP8 -> engine (1.2) or HF checkpoint (>= 1.3) -> greedy generation agrees with its own
    logits."""
    import torch

    from kiln.host import gpus, tensorrt_llm_status

    version = tensorrt_llm_status().version
    contract = api.contract_for(str(version))
    target = H100.model_copy(
        update={
            "sm": gpus()[0].sm_name,
            "artifact": "engine" if contract.engine_path else "hf_checkpoint",
            "limits": H100.limits.model_copy(update={"max_batch_size": 4}),
        }
    )
    fmt = "trtllm" if contract.engine_path else "hf"
    checkpoint = export_checkpoint(tmp_path / "ckpt", "fp8", fmt=fmt, model_dir=smollm2_dir)
    out = get_backend("tensorrt_llm").compile(
        checkpoint,
        target,
        tmp_path / "engine",
        {"tokenizer_dir": str(smollm2_dir), "hf_dir": str(checkpoint)},
    )
    engine = get_backend("tensorrt_llm").load(out)
    try:
        prompt = list(range(100, 132))
        result = engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=8))] * 2)
        assert [len(r.token_ids) for r in result] == [8, 8] and result[0].token_ids == result[1].token_ids
        logits = engine.logits(prompt + result[0].token_ids[:1])
        assert logits.shape == (len(prompt) + 1, 49152) and logits.dtype == torch.float32
        assert int(logits[len(prompt) - 1].argmax()) == result[0].token_ids[0]
        assert engine.memory_bytes() > 0
    finally:
        engine.close()


# --- kiln-engine.json describes the engine really built (issue 18 item 5) -----------------------------------


def test_engine_manifest_records_the_attention_plugins_trtllm_build_keeps(
    tmp_path: Path, monkeypatch
) -> None:
    """trtllm-build turns FP8 context FMHA off for an FP8 checkpoint without an FP8 KV cache (paged context
    FMHA on):
    the argv says so and kiln-engine.json records it, instead of claiming `--use_fp8_context_fmha enable`."""
    import subprocess

    checkpoint = export_checkpoint(tmp_path / "fp8", "fp8")
    ran: list[list[str]] = []

    # what a successful build leaves: config.json + one engine per rank
    def fake_trtllm_build(argv, **kwargs):
        ran.append(argv)
        out = Path(argv[argv.index("--output_dir") + 1])
        (out / "config.json").write_text(
            json.dumps({"version": "1.2.1", "pretrained_config": {}, "build_config": {}})
        )
        (out / "rank0.engine").write_bytes(b"engine")
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(backend.subprocess, "run", fake_trtllm_build)
    contract = api.load_contract("1.2")
    out = backend.build_engine(
        checkpoint,
        H100,
        tmp_path / "engine",
        {"model_sha": "x"},
        contract,
        {"tensorrt_llm": "1.2.1", "gpu_sm": "sm90"},
    )
    manifest = json.loads((out / ENGINE_MANIFEST).read_text())
    plugins = manifest["build"]["plugins"]
    assert (plugins["use_fp8_context_fmha"], plugins["use_paged_context_fmha"]) == (False, True)
    assert any("needs an FP8 KV cache" in note for note in plugins["notes"])
    command = manifest["build"]["command"]
    assert command[command.index("--use_fp8_context_fmha") + 1] == "disable"
    assert command[command.index("--use_paged_context_fmha") + 1] == "enable"
    assert ran and ran[0][ran[0].index("--use_fp8_context_fmha") + 1] == "disable"


# --- token ids agree with kiln's torch engine (issue 18 item 6) ---------------------------------------------


class _FakeTrtLLM:
    """TensorRT-LLM's LLM API as far as generation goes: a fixed greedy continuation, stopped at
    stop_token_ids, and the stop token trimmed from token_ids unless include_stop_str_in_output
    (executor/result.py _handle_sequence,
    contract llm_api.result.stop_token_trimming)."""

    def __init__(self, continuation: list[int]) -> None:
        self.continuation = continuation

    def generate_async(self, inputs, sampling_params, streaming):
        import types

        async def stream():
            produced: list[int] = []
            for token in self.continuation[: sampling_params.max_tokens]:
                produced.append(token)
                stopped = token in (sampling_params.stop_token_ids or [])
                ids = (
                    produced[:-1]
                    if stopped and not getattr(sampling_params, "include_stop_str_in_output", False)
                    else list(produced)
                )
                finish = (
                    "stop" if stopped else ("length" if len(produced) == sampling_params.max_tokens else None)
                )
                yield types.SimpleNamespace(
                    outputs=[types.SimpleNamespace(token_ids=ids, finish_reason=finish)]
                )
                if stopped:
                    return

        return stream()


def test_stop_tokens_are_kept_as_kiln_s_torch_engine_keeps_them(tmp_path: Path) -> None:
    import types

    from kiln.engine.torch import TorchBackend
    from kiln.profiles import Target

    checkpoint = export_checkpoint(tmp_path / "plain", "none")
    cpu = Target(
        name="cpu-test",
        dtype="float32",
        limits={"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 128},
    )
    torch_backend = TorchBackend()
    torch_engine = torch_backend.load(
        torch_backend.compile(checkpoint, cpu, tmp_path / "torch", {"model_sha": "t"})
    )
    prompt = list(range(10, 26))
    free = torch_engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=8))])[0].token_ids
    index = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stopped = SamplingParams(max_new_tokens=8, stop_token_ids=(free[index],))
    expected = torch_engine.generate([GenerationRequest(prompt, stopped)])[0]
    # the torch engine keeps it
    assert expected.finish_reason == "stop" and expected.token_ids == free[: index + 1]

    manifest = EngineManifest.model_construct(limits=cpu.limits)  # only what TensorRTLLMEngine reads
    trt = backend.TensorRTLLMEngine(
        tmp_path,
        manifest,
        _FakeTrtLLM(free),
        api.load_contract("1.2"),
        lambda **kw: types.SimpleNamespace(**kw),
    )
    trt._sample_memory = lambda: None  # no CUDA device here
    got = trt.generate([GenerationRequest(prompt, stopped)])[0]
    assert (got.token_ids, got.finish_reason) == (expected.token_ids, expected.finish_reason)
    assert len(got.token_times_s) == len(expected.token_ids)


def test_compile_refuses_a_checkpoint_the_worker_s_gpu_cannot_run(tmp_path: Path, monkeypatch) -> None:
    """The support facts pre-flight reads are checked again where a checkpoint meets a worker (`kiln
    compile`)."""

    def never(*args, **kwargs):
        raise AssertionError("trtllm-build must not run")

    monkeypatch.setattr(backend.subprocess, "run", never)
    fp8 = export_checkpoint(tmp_path / "fp8", "fp8")
    a100 = H100.model_copy(update={"name": "a100-trtllm", "sm": "sm80", "gpu": "a100"})
    with pytest.raises(
        UnsupportedCombinationError, match="FP8 on sm80 is not supported for TensorRT-LLM 1.2 engine"
    ):
        backend.build_engine(fp8, a100, tmp_path / "engine", {}, api.load_contract("1.2"), {"gpu_sm": "sm80"})
    assert not (tmp_path / "engine").exists()
    sq = export_checkpoint(tmp_path / "sq-hf", "int8_sq", fmt="hf")
    with pytest.raises(UnsupportedCombinationError, match="unsupported quant mode"):
        backend.package_hf_checkpoint(
            sq, TINY_HF, tmp_path / "artifact", {}, api.load_contract("1.3"), tools={"gpu_sm": "sm90"}
        )
