"""Registered versions are MLflow models: ``mlflow.pyfunc.load_model("models:/NAME@production")`` and
``mlflow models serve`` work on what ``kiln build`` publishes, with kiln's manifest still the source of truth.

Against the embedded default (SQLite + ``file://`` store under KILN_HOME, as the registry tests) and a real
``mlflow server`` with a SeaweedFS S3 store; the engine is the small random Llama of tests/test_serve.py
(SmolLM2's tokenizer and chat template).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from kiln.profiles import Registry
from kiln.registry import promote, publish
from tests.fixtures.servers import free_port, start_server
from tests.test_serve import PROMPTS, greedy_alone, one_thread, tiny_engine  # noqa: F401 (one_thread: fixture)

LINEAGE = {"recipe": "none", "target": "cpu", "model_sha": "f" * 40}


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return tiny_engine(tmp_path_factory.mktemp("pyfunc"), smollm2_dir, max_batch_size=4, max_seq_len=256)


@pytest.fixture(scope="module")
def reference(engine_dir: Path):
    """(engine, codec) in this process, to say what the model generates."""
    from kiln.engine.torch import TorchBackend
    from kiln.serve.text import TextCodec

    return TorchBackend().load(engine_dir), TextCodec(engine_dir)


def _publish(engine_dir: Path, registry: Registry, key: str = "c" * 64):
    version = publish(
        engine_dir,
        registry=registry,
        build_key=key,
        lineage=LINEAGE,
        metrics={"perplexity": 9.0},
        params={},
        artifacts=[],
        passed_gates=True,
        recommended=True,
    )
    promote(registry.model_name, version.version, "cpu", tracking_uri=registry.resolved_tracking_uri)
    return version


@pytest.fixture
def published(engine_dir: Path, kiln_home: Path, monkeypatch: pytest.MonkeyPatch):
    registry = Registry(model_name="tiny")
    version = _publish(engine_dir, registry)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.resolved_tracking_uri)
    return registry, version


def test_a_published_version_is_a_pyfunc_model_over_the_one_copy_of_the_engine(
    published,
    reference,
    one_thread,  # noqa: F811
) -> None:
    import mlflow.pyfunc
    import pandas as pd

    registry, version = published
    prefix = Path(version.uri.removeprefix("file://"))
    mlmodel = yaml.safe_load((prefix / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert (flavor["loader_module"], flavor["data"]) == ("kiln.registry.pyfunc", "files")
    assert (
        mlmodel["metadata"]["kiln"]["manifest_sha256"]
        == MlflowClient(registry.resolved_tracking_uri)
        .get_model_version("tiny.cpu", version.version)
        .tags["kiln.manifest_sha256"]
    )
    assert any(
        line.startswith("kiln-llm==") for line in (prefix / "requirements.txt").read_text().splitlines()
    )
    assert {"prompt", "messages"} == {c["name"] for c in json.loads(mlmodel["signature"]["inputs"])}
    # the weights are stored once: in the version's files/, not again for the flavor or in the run's artifacts
    weights = [p.relative_to(prefix).as_posix() for p in prefix.rglob("*.safetensors")]
    assert weights == ["files/rank0.safetensors"]
    run_files = MlflowClient(registry.resolved_tracking_uri).list_artifacts(version.run_id, "kiln")
    assert not [f.path for f in run_files if f.path.endswith(".safetensors")]

    engine, codec = reference
    model = mlflow.pyfunc.load_model("models:/tiny.cpu@production")
    out = model.predict(pd.DataFrame({"prompt": PROMPTS[:3]}), params={"max_tokens": 8})
    assert list(out["text"]) == [greedy_alone(engine, codec, codec.encode_prompt(p), 8) for p in PROMPTS[:3]]
    assert list(out["completion_tokens"]) == [8, 8, 8] and list(out["finish_reason"]) == ["length"] * 3
    assert list(out["prompt_tokens"]) == [len(codec.encode_prompt(p)) for p in PROMPTS[:3]]
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = model.predict(pd.DataFrame({"messages": [messages]}), params={"max_tokens": 6})
    assert chat["text"][0] == greedy_alone(engine, codec, codec.encode_chat(messages), 6)
    default = model.predict({"prompt": PROMPTS[0]})  # signature defaults: greedy, 64 tokens
    assert default["completion_tokens"][0] == 64


def test_pyfunc_load_refuses_a_modified_weight_file(published) -> None:
    import mlflow.pyfunc

    from kiln.errors import IntegrityError

    _, version = published
    weights = Path(version.uri.removeprefix("file://")) / "files" / "rank0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        mlflow.pyfunc.load_model("models:/tiny.cpu@production")


def test_mlflow_models_serve_answers_invocations(
    published,
    reference,
    kiln_home: Path,
    tmp_path: Path,
    one_thread,  # noqa: F811
) -> None:
    registry, _ = published
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    # `mlflow models serve` execs `uvicorn` from PATH: the venv's bin, as in an activated environment
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry.resolved_tracking_uri,
        "KILN_HOME": str(kiln_home),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PATH": f"{mlflow.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    server = start_server(
        "mlflow models serve",
        [
            str(mlflow),
            "models",
            "serve",
            "-m",
            "models:/tiny.cpu@production",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        log_path=tmp_path / "models-serve.log",
        ready_url=f"http://127.0.0.1:{port}/ping",
        timeout_s=180,
    )
    try:
        answer = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            timeout=120,
            json={
                "dataframe_records": [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1]}],
                "params": {"max_tokens": 6},
            },
        )
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
    finally:
        server.stop()
    engine, codec = reference
    assert [p["text"] for p in predictions] == [
        greedy_alone(engine, codec, codec.encode_prompt(p), 6) for p in PROMPTS[:2]
    ]
    assert [p["completion_tokens"] for p in predictions] == [6, 6]


@pytest.mark.servers
def test_pyfunc_loads_from_an_mlflow_server_with_an_s3_store(
    engine_dir: Path,
    kiln_home: Path,
    s3_env,
    mlflow_server,
    reference,
    monkeypatch,
    one_thread,  # noqa: F811
) -> None:
    import mlflow.pyfunc

    registry = Registry(
        model_name=f"m-{uuid.uuid4().hex[:8]}",
        tracking_uri=mlflow_server.url,
        store_uri=f"s3://{s3_env.make_bucket()}/engines",
    )
    _publish(engine_dir, registry, key="d" * 64)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    model = mlflow.pyfunc.load_model(f"models:/{registry.model_name}.cpu@production")
    out = model.predict([{"prompt": PROMPTS[2]}], params={"max_tokens": 5})
    engine, codec = reference
    assert out["text"][0] == greedy_alone(engine, codec, codec.encode_prompt(PROMPTS[2]), 5)
