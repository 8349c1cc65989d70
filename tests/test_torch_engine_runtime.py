"""The torch engine's runtime and engine dir: KV cache, in-flight batching, sampling, limits, manifest."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from kiln.constants import ENGINE_MANIFEST
from kiln.engine.base import GenerationRequest, SamplingParams
from kiln.engine.manifest import read
from kiln.engine.torch import TorchBackend, check_compatible
from kiln.errors import (
    BackendUnavailableError,
    EngineMismatchError,
    GenerationLimitError,
    ModelSourceError,
    UnsupportedCombinationError,
)
from kiln.hub import hash_directory
from kiln.profiles import Target
from tests.fixtures.engine import export_checkpoint
from tests.fixtures.models import make_tiny_llama

LIMITS = {"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 64}


def target(**limits: int) -> Target:
    return Target(name="cpu-test", dtype="float32", limits={**LIMITS, **limits})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rt")
    return export_checkpoint(make_tiny_llama(root / "hf"), root / "ckpt", "none")[0]


@pytest.fixture(scope="module")
def engine_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eng") / "engine"
    return TorchBackend().compile(checkpoint, target(), out, {"model_sha": "abc123"})


@pytest.fixture(scope="module")
def engine(engine_dir: Path):
    return TorchBackend().load(engine_dir)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n)


def test_kv_cache_is_preallocated_from_build_limits(engine) -> None:
    spec = engine.model.spec
    assert engine.cache.k[0].shape == (4, spec.num_kv_heads, 64, spec.head_size)
    assert len(engine.cache.k) == len(engine.cache.v) == spec.num_layers
    pointers = [t.data_ptr() for t in (*engine.cache.k, *engine.cache.v)]
    engine.generate([GenerationRequest(ids(30, 1), greedy(30))] * 4)
    assert [t.data_ptr() for t in (*engine.cache.k, *engine.cache.v)] == pointers  # never reallocated
    assert engine.memory_bytes() >= engine.cache.nbytes() + engine.model.weight_bytes()


def test_in_flight_batching_equals_one_at_a_time(engine) -> None:
    requests = [
        GenerationRequest(ids(n, seed), greedy(m))
        for seed, (n, m) in enumerate([(5, 20), (17, 4), (9, 30), (30, 12), (3, 25), (12, 6)])
    ]
    alone = [engine.generate([r])[0].token_ids for r in requests]
    order: list[int] = []
    batched = engine.generate(requests, concurrency=3, on_token=lambda i, _t: order.append(i))
    assert [r.token_ids for r in batched] == alone
    assert [len(r.token_ids) for r in batched] == [r.sampling.max_new_tokens for r in requests]
    assert all(r.finish_reason == "length" for r in batched)
    # requests joined while others were running: request 3 produced tokens before request 2 finished
    last_of_2 = max(i for i, r in enumerate(order) if r == 2)
    assert order.index(3) < last_of_2
    # and at most 3 ran at once: request 3 only started after request 1 (the shortest) finished
    assert order.index(3) > max(i for i, r in enumerate(order) if r == 1)


@pytest.mark.parametrize(
    "lengths", [(7, 19, 3), (12, 16, 14), (9, 9, 9)], ids=["packed-mask", "padded-batch", "equal-lengths"]
)
def test_packed_prefill_equals_one_sequence_at_a_time(engine, lengths) -> None:
    """Joining requests share one prefill pass: same last-token logits and the same K/V in each slot, whether
    the pass attends through one packed mask (lengths far apart) or as a right-padded causal batch."""
    from kiln.engine.torch.model import Padded

    assert Padded.pays(list(lengths)) == (lengths != (7, 19, 3))
    prompts = [ids(n, 40 + n) for n in lengths]
    model, cache = engine.model, engine.cache
    with torch.inference_mode():
        alone = []
        for slot, p in enumerate(prompts):
            alone.append(model.prefill(torch.tensor(p), cache, [slot], last_only=True)[0])
        kv_alone = [cache.k[1][s, :, : len(p)].clone() for s, p in enumerate(prompts)]
        for t in (*cache.k, *cache.v):
            t.zero_()
        packed = model.prefill(
            torch.tensor([t for p in prompts for t in p]),
            cache,
            [0, 1, 2],
            last_only=True,
            lengths=[len(p) for p in prompts],
        )
    torch.testing.assert_close(packed, torch.stack(alone), atol=1e-5, rtol=1e-5)
    for s, p in enumerate(prompts):
        torch.testing.assert_close(cache.k[1][s, :, : len(p)], kv_alone[s])


def test_per_request_sampling(engine) -> None:
    prompt = ids(6, 7)
    base = engine.generate([GenerationRequest(prompt, greedy(12))])[0].token_ids
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, seed=11)
    alone = engine.generate([GenerationRequest(prompt, seeded)])[0].token_ids
    mixed = engine.generate(
        [
            GenerationRequest(ids(9, 8), greedy(12)),
            GenerationRequest(prompt, seeded),
            GenerationRequest(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=12)),
            GenerationRequest(prompt, greedy(12)),
        ]
    )
    assert mixed[1].token_ids == alone  # a seeded request does not depend on its batch-mates
    assert mixed[2].token_ids != alone  # another seed samples something else
    assert mixed[3].token_ids == base
    assert alone != base
    top_k1 = SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1, seed=3)
    tiny_p = SamplingParams(max_new_tokens=12, temperature=2.0, top_p=1e-6, seed=3)
    assert [
        r.token_ids
        for r in engine.generate([GenerationRequest(prompt, top_k1), GenerationRequest(prompt, tiny_p)])
    ] == [base, base]


def test_stop_token_ends_request(engine) -> None:
    prompt = ids(6, 7)
    base = engine.generate([GenerationRequest(prompt, greedy(12))])[0].token_ids
    stop = base[3]
    expected = base[: base.index(stop) + 1]
    result = engine.generate(
        [GenerationRequest(prompt, SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)))]
    )[0]
    assert (result.token_ids, result.finish_reason) == (expected, "stop")
    assert result.ttft_s is not None and len(result.token_times_s) == len(expected)


@pytest.mark.parametrize(
    ("request_", "concurrency", "message"),
    [
        (GenerationRequest(list(range(33)), greedy(1)), None, "exceeds max_input_len 32"),
        (GenerationRequest(list(range(30)), greedy(40)), None, "exceeds max_seq_len 64"),
        (GenerationRequest([1, 2], greedy(1)), 5, "concurrency 5 is outside 1..max_batch_size"),
        (GenerationRequest([], greedy(1)), None, "empty prompt"),
        (GenerationRequest([1, 256], greedy(1)), None, "outside the vocabulary"),
        (GenerationRequest([1], greedy(0)), None, "max_new_tokens must be >= 1"),
        (GenerationRequest([1], SamplingParams(temperature=-1)), None, "temperature must be >= 0"),
        (GenerationRequest([1], SamplingParams(temperature=1, top_p=0)), None, "top_p must be in (0, 1]"),
    ],
)
def test_limits_are_errors_never_truncation(
    engine, request_: GenerationRequest, concurrency: int | None, message: str
) -> None:
    ok = GenerationRequest([1, 2, 3], greedy(2))
    with pytest.raises(GenerationLimitError, match=re.escape(message)):
        engine.generate([ok, request_], concurrency=concurrency)
    with pytest.raises(GenerationLimitError, match="exceed this engine's max_seq_len 64"):
        engine.logits(list(range(65)))


def test_manifest(engine_dir: Path, checkpoint: Path) -> None:
    manifest = json.loads((engine_dir / ENGINE_MANIFEST).read_text())
    assert manifest["backend"] == "torch" and manifest["device"] == "cpu" and manifest["sm"] is None
    assert manifest["dtype"] == "float32" and manifest["quant_algo"] is None
    assert manifest["limits"]["max_seq_len"] == 64 and manifest["limits"]["max_batch_size"] == 4
    assert manifest["toolchain"]["torch"] == torch.__version__
    assert manifest["model_sha"] == "abc123"
    assert manifest["checkpoint_sha256"] == hash_directory(checkpoint)
    assert manifest["program"] == {"compile": "none", "cuda_graphs": False}
    assert (engine_dir / "rank0.safetensors").is_file()


def _edited(engine_dir: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / ENGINE_MANIFEST).read_text())
    for key, value in changes.items():
        if key == "torch":
            manifest["toolchain"]["torch"] = value
        else:
            manifest[key] = value
    (copy / ENGINE_MANIFEST).write_text(json.dumps(manifest))
    return copy


def test_load_refuses_other_torch_minor(engine_dir: Path, tmp_path: Path) -> None:
    other = _edited(engine_dir, tmp_path, torch="2.99.0+cu999")
    with pytest.raises(
        EngineMismatchError,
        match=re.escape(f"torch 2.99.0+cu999, this machine has torch {torch.__version__}"),
    ):
        TorchBackend().load(other)


def test_load_refuses_other_backend_and_cuda_engine_without_gpu(engine_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineMismatchError, match="backend 'tensorrt_llm'"):
        check_compatible(read(engine_dir).model_copy(update={"backend": "tensorrt_llm"}), engine_dir)
    cuda = _edited(engine_dir, tmp_path, device="cuda", sm="sm90", gpu="h100")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineMismatchError, match="built for CUDA sm90 .h100.; this machine has no CUDA GPU"):
        TorchBackend().load(cuda)


def test_load_refuses_other_sm(engine_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: present an A100 (sm80) to the check, which reads only these three calls.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    manifest = read(engine_dir).model_copy(update={"device": "cuda", "sm": "sm90", "gpu": "h100"})
    with pytest.raises(
        EngineMismatchError, match=r"built for sm90 \(h100\); this GPU is sm80 \(NVIDIA A100\)"
    ):
        check_compatible(manifest, engine_dir)


def test_compile_refusals(checkpoint: Path, tmp_path: Path) -> None:
    backend = TorchBackend()
    with pytest.raises(
        UnsupportedCombinationError, match="checkpoint is tp1pp1 but target 'cpu-test' asks for tp2pp1"
    ):
        backend.compile(checkpoint, target(tp_size=2), tmp_path / "a", {})
    with pytest.raises(
        UnsupportedCombinationError, match="max_seq_len 1024 exceeds the model's max_position_embeddings 512"
    ):
        backend.compile(checkpoint, target(max_input_len=512, max_seq_len=1024), tmp_path / "b", {})
    gpu = Target(name="h100-test", device="cuda", sm="sm90", gpu="h100", limits=LIMITS)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
            backend.compile(checkpoint, gpu, tmp_path / "c", {})
    with pytest.raises(ModelSourceError, match="no such file"):
        backend.compile(tmp_path, target(), tmp_path / "d", {})
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architecture": "GPT2LMHeadModel"}))
    with pytest.raises(ModelSourceError, match="architecture: 'GPT2LMHeadModel' is not supported"):
        backend.compile(bad, target(), tmp_path / "e", {})
    (bad / "config.json").write_text(json.dumps({**config, "quantization": {"quant_algo": "NVFP4"}}))
    with pytest.raises(ModelSourceError, match="quant_algo: 'NVFP4' is not supported"):
        backend.compile(bad, target(), tmp_path / "f", {})
    assert not any((tmp_path / n).exists() for n in "abcdef")  # nothing half-built left behind


def test_sampled_and_greedy_requests_joining_mid_run_get_their_alone_tokens(engine) -> None:
    """Sampled steps are queued ahead on the device like greedy ones: requests admitted into a running
    batch (concurrency 3 of 6), of different lengths, still get the tokens each gets alone."""
    requests = [
        GenerationRequest(
            ids(5 + i, 20 + i),
            SamplingParams(max_new_tokens=6 + 2 * i, temperature=1.0, top_p=0.9, seed=40 + i)
            if i % 2
            else greedy(7 + i),
        )
        for i in range(6)
    ]
    alone = [engine.generate([r])[0].token_ids for r in requests]
    assert [r.token_ids for r in engine.generate(requests, concurrency=3)] == alone


def test_compiled_decode_may_compile_a_graph_per_bucket(engine_dir: Path) -> None:
    """dynamo's default of 8 graphs per function would leave most (batch, length) buckets of a large engine
    eager: the limit covers a greedy and a sampled graph per bucket, with room for the compiled helpers."""
    compiled = TorchBackend().load(
        engine_dir, program={"compile": "inductor"}
    )  # compiles lazily: nothing runs
    try:
        buckets = len(compiled._batch_buckets) * len(compiled._length_buckets)
        assert torch._dynamo.config.recompile_limit >= 2 * buckets + 8
    finally:
        compiled.close()
