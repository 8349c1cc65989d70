"""Bad inputs through the real CLI: each is one clear error naming the cause, exit code 2, before any work.

"Before any work" is checked on disk: the build never got as far as Prefect (no ``$KILN_HOME/prefect``) nor
the step cache (no ``$KILN_HOME/cache``). Function-level cases already covered elsewhere are listed in
docs/RELIABILITY.md (tests/test_profiles.py, tests/test_hub.py, tests/test_preflight.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kiln.cli import app
from tests.fixtures.models import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _profile(root: Path, body: dict | str) -> Path:
    """A request inside a copy of the repo's profiles/ tree, so named recipes/targets resolve."""
    profiles = root / "profiles"
    (profiles / "examples").mkdir(parents=True, exist_ok=True)
    for lib in ("recipes.yaml", "targets.yaml"):
        (profiles / lib).write_text((REPO / "profiles" / lib).read_text())
    path = profiles / "examples" / "req.yaml"
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def _body(model: dict | None = None, **overrides) -> dict:
    return {
        "name": "t",
        "model": model or {"repo_id": "org/model", "revision": "main"},
        "recipes": ["none"],
        "targets": ["cpu"],
        "registry": {"model_name": "m"},
    } | overrides


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 attention heads, 2 KV heads: tp_size 3 splits neither
    return make_tiny_llama(tmp_path_factory.mktemp("bad-inputs") / "tiny", heads=4, kv_heads=2)


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _assert_refused(result, *needles: str, home: Path) -> None:
    assert result.exit_code == 2, result.output
    text = "".join(result.output.split())  # rich wraps long lines, even inside paths
    for needle in needles:
        assert "".join(needle.split()) in text, (needle, result.output)
    assert "Traceback" not in result.output
    # nothing started: the flow was never called and KILN_HOME is untouched (no Prefect DB, MLflow DB, cache)
    assert flow_calls == []
    assert not any(home.iterdir()), sorted(p.name for p in home.iterdir())


flow_calls: list[tuple] = []


@pytest.fixture(autouse=True)
def _flow_tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records any call of the build flow: a refused input must never get that far."""
    import kiln.flows.build

    flow_calls.clear()
    monkeypatch.setattr(kiln.flows.build, "build", lambda *a, **k: flow_calls.append((a, k)) or [])


STATIC_CASES = {
    "malformed-yaml": ("name: [unclosed\nmodel: {repo_id: org/model\n", ["not valid YAML"]),
    "unknown-field": (_body(regsitry={"model_name": "m"}), ["regsitry"]),
    "unknown-recipe": (_body(recipes=["fp9"]), ["unknown recipe 'fp9'", "fp8"]),
    "unknown-target": (_body(targets=["h900"]), ["h900", "cpu"]),
    "repo-id-traversal": (_body({"repo_id": "../../etc/passwd", "revision": "main"}), ["repo_id"]),
    "seq-len-below-input-len": (
        _body(targets=[{"name": "c", "limits": {"max_input_len": 512, "max_seq_len": 256}}]),
        ["max_seq_len (256) must be greater than max_input_len (512)"],
    ),
    "nvfp4-on-cpu": (_body(recipes=["nvfp4"]), ["nvfp4"]),
    "unknown-kv-dtype": (
        _body(recipes=[{"name": "k", "quantization": "fp8", "kv_cache_dtype": "int4"}]),
        ["kv_cache_dtype", "'auto', 'fp8' or 'int8'"],
    ),
}


@pytest.mark.parametrize("command", ["build", "check"])
@pytest.mark.parametrize("case", sorted(STATIC_CASES))
def test_bad_profile_is_refused_with_exit_2_before_any_work(
    case: str, command: str, tmp_path: Path, kiln_home: Path
) -> None:
    body, needles = STATIC_CASES[case]
    path = _profile(tmp_path, body)
    args = ["build", str(path)] if command == "build" else ["profiles", "check", str(path)]
    _assert_refused(runner.invoke(app, args), *needles, home=kiln_home)


def _pickle_only(model: Path) -> None:
    (model / "model.safetensors").unlink()
    # never loaded: only the file name matters to the check
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def _corrupt_header(model: Path) -> None:
    path = model / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    # same size, header no longer JSON: what a truncated/garbled download looks like
    path.write_bytes(data[:8] + b"{" + b"\x00" * (length - 1) + data[8 + length :])


def _unsupported_architecture(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["architectures"], config["model_type"] = ["MambaForCausalLM"], "mamba"
    (model / "config.json").write_text(json.dumps(config))


LOCAL_CASES = {
    "pickle-only": (_pickle_only, ["pickle", "pytorch_model.bin"]),
    "corrupt-safetensors-header": (_corrupt_header, ["model.safetensors", "not a valid safetensors file"]),
    "unsupported-architecture": (_unsupported_architecture, ["MambaForCausalLM", "LlamaForCausalLM"]),
}


@pytest.mark.parametrize("command", ["build", "check"])
@pytest.mark.parametrize("case", sorted(LOCAL_CASES))
def test_bad_local_model_is_refused_by_build_before_prefect(
    case: str, command: str, tiny_dir: Path, tmp_path: Path, kiln_home: Path
) -> None:
    """``kiln profiles check`` refuses what ``kiln build`` refuses before any work, not only the profile's
    fields."""
    spoil, needles = LOCAL_CASES[case]
    model = _copy_model(tiny_dir, tmp_path / "model")
    spoil(model)
    path = _profile(tmp_path, _body({"local_dir": str(model)}))
    args = ["build", str(path)] if command == "build" else ["profiles", "check", str(path)]
    _assert_refused(runner.invoke(app, args), *needles, home=kiln_home)


def test_tp_size_not_dividing_the_heads_is_refused_before_prefect(
    tiny_dir: Path, tmp_path: Path, kiln_home: Path
) -> None:
    target = {
        "name": "h100-tp3",
        "backend": "torch",
        "device": "cuda",
        "gpu": "h100",
        "sm": "sm90",
        "gpu_memory_gib": 80,
        "gpus_per_worker": 3,
        "dtype": "bfloat16",
        "limits": {"max_input_len": 64, "max_seq_len": 128, "tp_size": 3},
    }
    path = _profile(tmp_path, _body({"local_dir": str(tiny_dir)}, targets=[target]))
    _assert_refused(
        runner.invoke(app, ["build", "--dispatch", "deployments", str(path)]),
        "tp_size 3 does not divide the model's 4 attention heads",
        home=kiln_home,
    )


def test_missing_local_dir_and_bad_dispatch_are_refused(tmp_path: Path, kiln_home: Path) -> None:
    path = _profile(tmp_path, _body({"local_dir": str(tmp_path / "nowhere")}))
    _assert_refused(runner.invoke(app, ["build", str(path)]), "is not a directory", home=kiln_home)
    path = _profile(tmp_path, _body())
    _assert_refused(
        runner.invoke(app, ["build", "--dispatch", "everywhere", str(path)]),
        "--dispatch",
        "inline",
        home=kiln_home,
    )


def test_profiles_check_runs_the_parallelism_rules_build_runs(
    tiny_dir: Path, tmp_path: Path, kiln_home: Path
) -> None:
    """tp 3 on a cpu target: `kiln build` refused it within a second, `kiln profiles check` said ok."""
    target = {"name": "cpu-tp3", "limits": {"max_input_len": 64, "max_seq_len": 128, "tp_size": 3}}
    path = _profile(tmp_path, _body({"local_dir": str(tiny_dir)}, targets=[target]))
    _assert_refused(runner.invoke(app, ["profiles", "check", str(path)]), "tp_size 3", home=kiln_home)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_cuda_torch_target_built_in_process_without_a_gpu_is_refused_at_preflight(
    tiny_dir: Path, tmp_path: Path, kiln_home: Path
) -> None:
    """It used to download, calibrate and quantize, then fail at compile; with --dispatch deployments the
    target's pool must have the GPU, so the same request passes pre-flight there."""
    target = {
        "name": "h100",
        "backend": "torch",
        "device": "cuda",
        "gpu": "h100",
        "sm": "sm90",
        "gpu_memory_gib": 80,
        "dtype": "bfloat16",
        "limits": {"max_input_len": 64, "max_seq_len": 128},
    }
    path = _profile(tmp_path, _body({"local_dir": str(tiny_dir)}, targets=[target]))
    _assert_refused(
        runner.invoke(app, ["build", "--dispatch", "inline", str(path)]),
        "no CUDA GPU here",
        "--dispatch deployments",
        home=kiln_home,
    )
    from kiln.preflight import check_request
    from kiln.profiles import load_request

    check_request(load_request(path), local_targets=False)  # no error: the pool's machines have the GPU
