"""kiln-engine.json as one typed record: what both backends write, what read() refuses and how it says so,
and the registry's copy of it (byte for byte, so the registered sha256 still matches)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kiln.constants import ENGINE_MANIFEST
from kiln.engine.manifest import EngineManifest, LlmApi, TorchProgram, read, write
from kiln.engine.torch import TorchBackend
from kiln.engine.trtllm import api
from kiln.engine.trtllm import backend as trtllm
from kiln.errors import EngineMismatchError, IntegrityError
from kiln.profiles import BuildLimits, Target
from kiln.registry.fetch import verify_if_fetched
from kiln.registry.store import Manifest, download_version, open_store, upload_version
from tests.fixtures.engine import export_checkpoint
from tests.fixtures.models import make_tiny_llama
from tests.test_trtllm_contract import H100_HF

TARGET = Target(
    name="cpu-test", dtype="float32", limits={"max_batch_size": 2, "max_input_len": 16, "max_seq_len": 32}
)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("manifest")
    checkpoint = export_checkpoint(make_tiny_llama(root / "hf"), root / "ckpt", "none")[0]
    return TorchBackend().compile(
        checkpoint, TARGET, root / "engine", {"model_sha": "abc123", "recipe": "none"}
    )


def edited(engine_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the engine dir whose kiln-engine.json went through ``edit(record) -> record``."""
    copy = tmp_path / "edited"
    shutil.copytree(engine_dir, copy)
    path = copy / ENGINE_MANIFEST
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return copy


def test_a_built_torch_engine_reads_as_typed_fields(engine_dir: Path) -> None:
    manifest = read(engine_dir)
    assert (manifest.backend, manifest.target, manifest.device) == ("torch", "cpu-test", "cpu")
    assert manifest.sm is None and manifest.dtype == "float32"
    assert manifest.limits == BuildLimits(max_batch_size=2, max_input_len=16, max_seq_len=32)
    assert manifest.program == TorchProgram(compile="none", cuda_graphs=False)
    assert manifest.model is not None and manifest.model["num_layers"] == 2
    assert manifest.layout is not None and len(manifest.layout) == 1
    assert manifest.model_sha == "abc123" and manifest.lineage["recipe"] == "none"
    assert manifest.artifact is None and manifest.build is None and manifest.llm_api is None
    # every limit is recorded, also those the target left at their defaults
    written = json.loads((engine_dir / ENGINE_MANIFEST).read_text())
    assert set(written["limits"]) == set(BuildLimits.model_fields)


def test_read_then_write_gives_back_the_same_bytes(engine_dir: Path, tmp_path: Path) -> None:
    write(tmp_path, read(engine_dir))
    assert (tmp_path / ENGINE_MANIFEST).read_bytes() == (engine_dir / ENGINE_MANIFEST).read_bytes()


def test_a_tensorrt_llm_hf_checkpoint_reads_with_its_llm_api_settings(tmp_path: Path) -> None:
    target = H100_HF.model_copy(update={"limits": BuildLimits(max_input_len=256, max_seq_len=512)})
    out = trtllm.package_hf_checkpoint(
        make_tiny_llama(tmp_path / "hf"),
        target,
        tmp_path / "artifact",
        {},
        api.load_contract("1.3"),
        tools={"tensorrt_llm": "1.3.0", "gpu_sm": "sm90"},
    )
    manifest = read(out)
    assert (manifest.backend, manifest.artifact, manifest.sm) == ("tensorrt_llm", "hf_checkpoint", "sm90")
    assert isinstance(manifest.llm_api, LlmApi) and manifest.llm_api.llm_class == "tensorrt_llm:LLM"
    assert manifest.llm_api.options_file == trtllm.LLM_API_OPTIONS and manifest.contract.series == "1.3"
    assert manifest.program is None
    assert "class" in json.loads((out / ENGINE_MANIFEST).read_text())["llm_api"]  # the key as written


def test_a_dir_without_a_record_or_with_bad_json_is_refused(engine_dir: Path, tmp_path: Path) -> None:
    missing = re.escape(f"{tmp_path}: no kiln-engine.json") + ".*kiln compile"
    with pytest.raises(EngineMismatchError, match=missing):
        read(tmp_path)
    (tmp_path / ENGINE_MANIFEST).write_text('{"backend": "torch",')
    with pytest.raises(EngineMismatchError, match=r"kiln-engine.json: not valid JSON .*rebuild the engine"):
        read(tmp_path)
    (tmp_path / ENGINE_MANIFEST).write_text("[]")
    with pytest.raises(EngineMismatchError, match="kiln-engine.json: expected a JSON object, got list"):
        read(tmp_path)


def without(key: str):
    return lambda record: {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (without("toolchain"), "toolchain: missing"),
        (
            lambda r: {**r, "limits": {**r["limits"], "max_seq_len": "long"}},
            "limits.max_seq_len: Input should be a valid integer",
        ),
        (lambda r: {**r, "backend": "onnx"}, "backend: Input should be 'torch' or 'tensorrt_llm'"),
        (
            lambda r: {**r, "program": {**r["program"], "compile": "jit"}},
            "program.compile: Input should be 'inductor' or 'none'",
        ),
        (without("program"), "program: missing (every torch engine records it)"),
        (lambda r: {**r, "device": "cuda", "sm": None}, "sm: missing (every cuda engine records it)"),
        (lambda r: {**r, "format_version": 2}, "engine format 2 but this kiln reads format 1"),
    ],
)
def test_a_missing_or_invalid_field_is_named(engine_dir: Path, tmp_path: Path, edit, message: str) -> None:
    bad = edited(engine_dir, tmp_path, edit)
    where = re.escape(f"{bad / ENGINE_MANIFEST}: ")
    with pytest.raises(EngineMismatchError, match=where + ".*" + re.escape(message) + ".*rebuild the engine"):
        read(bad)
    with pytest.raises(EngineMismatchError, match=re.escape(message)):
        TorchBackend().load(bad)  # the loader reads through the same check


def test_keys_a_newer_kiln_adds_are_kept_and_written_back(engine_dir: Path, tmp_path: Path) -> None:
    newer = edited(
        engine_dir,
        tmp_path,
        lambda r: {**r, "speculative": {"draft": "x"}, "program": {**r["program"], "moe": "triton"}},
    )
    manifest = read(newer)
    assert manifest.to_dict()["speculative"] == {"draft": "x"}
    assert manifest.to_dict()["program"]["moe"] == "triton"
    assert TorchBackend().load(newer).max_seq_len == 32  # an unknown kernel choice is ignored, not an error


def test_the_registry_manifest_embeds_the_record_and_round_trips_it(engine_dir: Path, tmp_path: Path) -> None:
    # a hand-written record without the optional keys: the copy must not grow them (its sha256 is registered)
    record = {
        "format_version": 1,
        "backend": "torch",
        "target": "cpu",
        "device": "cpu",
        "dtype": "bfloat16",
        "limits": {"max_batch_size": 4},
        "toolchain": {"torch": "2.9.0", "triton": None},
        "program": {"compile": "none", "cuda_graphs": False},
        "model": {},
        "layout": [{}],
    }
    for engine in (read(engine_dir), EngineManifest.model_validate(record)):
        stored = Manifest(
            model="m",
            target="cpu",
            recipe="none",
            build_key="ab" * 32,
            created_at="now",
            files=[],
            engine=engine,
            lineage={},
        ).to_bytes()
        again = Manifest.from_bytes(stored, "manifest.json")
        assert isinstance(again.engine, EngineManifest) and again.to_bytes() == stored
        assert json.loads(stored)["engine"] == engine.to_dict()
    assert EngineManifest.model_validate(record).to_dict() == record
    broken = json.loads(stored)
    del broken["engine"]["toolchain"]
    with pytest.raises(IntegrityError, match="engine.toolchain: missing"):
        Manifest.from_bytes(json.dumps(broken).encode(), "manifest.json")


def test_a_fetched_dir_is_verified_by_the_caller_before_it_loads(engine_dir: Path, tmp_path: Path) -> None:
    version = open_store((tmp_path / "store").as_uri()).child("m/cpu/" + "cd" * 32)
    manifest, _ = upload_version(
        version,
        engine_dir,
        model="m",
        target="cpu",
        recipe="none",
        build_key="cd" * 32,
        engine=read(engine_dir),
        lineage={},
    )
    fetched = download_version(version, tmp_path / "fetched", manifest)
    verify_if_fetched(fetched)
    verify_if_fetched(engine_dir)  # built here: nothing to check against
    weights = fetched / "rank0.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(IntegrityError, match="rank0.safetensors: missing or does not match its sha256"):
        verify_if_fetched(fetched)
