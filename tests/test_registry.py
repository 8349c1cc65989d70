"""Registry end to end: publish (idempotent, crash-safe), aliases, promote/rollback, GPU-aware fetch, CLI.

Against the embedded default (SQLite + file://) and real servers on 127.0.0.1 (``mlflow server`` with a
SQLite backend and artifact serving, SeaweedFS for S3).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from kiln.cli import app
from kiln.engine.manifest import read
from kiln.errors import (
    EngineMismatchError,
    IntegrityError,
    NotPromotableError,
    RegistryConfigError,
    RegistryError,
    VersionNotFoundError,
)
from kiln.profiles import Registry
from kiln.registry import (
    ForcedFetchWarning,
    TransferEvent,
    check_registry,
    fetch,
    list_versions,
    promote,
    publish,
    rollback,
)
from kiln.registry.store import list_version_keys, open_store, upload_version

TORCH_VERSION = importlib.metadata.version("torch")


def make_engine(
    root: Path, *, seed: int = 0, files: int = 3, size: int = 20_000, sm: str | None = None
) -> Path:
    """An engine dir of random bytes plus the record fetch checks (this machine's torch, CPU or ``sm``)."""
    rng = __import__("random").Random(seed)
    root.mkdir(parents=True)
    for index in range(files):
        (root / f"rank{index}.safetensors").write_bytes(rng.randbytes(size))
    record = {
        "format_version": 1,
        "backend": "torch",
        "target": "h100" if sm else "cpu",
        "device": "cuda" if sm else "cpu",
        "sm": sm,
        "dtype": "bfloat16",
        "limits": {},
        "toolchain": {"torch": TORCH_VERSION},
        "program": {"compile": "none", "cuda_graphs": False},
        "model": {},
        "layout": [],
    }
    (root / "kiln-engine.json").write_text(json.dumps(record))
    return root


def key(n: int) -> str:
    return f"{n:064x}"


def do_publish(
    engine: Path,
    registry: Registry,
    build_key: str,
    *,
    passed: bool = True,
    recommended: bool = True,
    recipe: str = "fp8",
    target: str = "cpu",
    report: Path | None = None,
    on_progress=None,
):
    return publish(
        engine,
        registry=registry,
        build_key=build_key,
        lineage={"recipe": recipe, "target": target, "model_sha": "f" * 40, "calibration_sha256": "c" * 64},
        metrics={"perplexity": 32.5, "tokens_per_s": 120.0},
        params={"model_repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "recipe": recipe, "target": target},
        artifacts=[report] if report else [],
        passed_gates=passed,
        recommended=recommended,
        on_progress=on_progress,
    )


@pytest.fixture
def server_registry(kiln_home: Path, s3_env, mlflow_server) -> Registry:
    """A fresh model name on the shared MLflow server, engines in a fresh SeaweedFS bucket."""
    return Registry(
        model_name=f"m-{uuid.uuid4().hex[:8]}",
        tracking_uri=mlflow_server.url,
        store_uri=f"s3://{s3_env.make_bucket()}/engines",
    )


# --- embedded default: SQLite + file:// under KILN_HOME -----------------------------------------------------


def test_embedded_default_publish_is_idempotent_and_cli_promotes_and_fetches(
    kiln_home: Path, tmp_path: Path
) -> None:
    registry = Registry(model_name="tiny")
    check_registry(registry)
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    first = do_publish(make_engine(tmp_path / "a"), registry, key(1), report=report)
    assert (first.name, first.version, first.reused, first.candidate) == ("tiny.cpu", "1", False, True)
    assert first.uri == (kiln_home / "store" / "tiny" / "cpu" / key(1)).as_uri()
    again = do_publish(make_engine(tmp_path / "a2"), registry, key(1))
    assert (again.version, again.reused) == ("1", True)
    failed = do_publish(
        make_engine(tmp_path / "b", seed=1), registry, key(2), passed=False, recipe="int4_awq"
    )
    assert (failed.version, failed.candidate) == ("2", False)

    client = MlflowClient(registry.resolved_tracking_uri)
    run = client.get_run(first.run_id)
    assert run.data.metrics["perplexity"] == 32.5 and run.data.params["recipe"] == "fp8"
    assert run.data.tags["kiln.lineage.model_sha"] == "f" * 40 and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "kiln")} | {
        a.path for a in client.list_artifacts(first.run_id, "reports")
    }
    assert {"kiln/manifest.json", "kiln/lineage.json", "reports/report.md"} <= artifacts

    runner = CliRunner()
    listed = runner.invoke(app, ["versions", "tiny", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["version"]: row for row in json.loads(listed.output)}
    assert rows["1"]["aliases"] == ["candidate"] and rows["1"]["passed_gates"]
    assert rows["2"]["aliases"] == [] and not rows["2"]["passed_gates"] and rows["2"]["recipe"] == "int4_awq"

    refused = runner.invoke(app, ["promote", "tiny", "2", "--target", "cpu"])
    assert refused.exit_code == 2 and "failed its gates" in refused.output
    promoted = runner.invoke(
        app, ["promote", "tiny", "candidate", "--target", "cpu", "--reason", "first rollout"]
    )
    assert promoted.exit_code == 0, promoted.output
    assert str(client.get_model_version_by_alias("tiny.cpu", "production").version) == "1"

    out = tmp_path / "served"
    fetched = runner.invoke(app, ["fetch", "tiny@production", "--target", "cpu", "--output", str(out)])
    assert fetched.exit_code == 0, fetched.output
    assert (out / "rank0.safetensors").read_bytes() == (tmp_path / "a" / "rank0.safetensors").read_bytes()
    busy = runner.invoke(app, ["fetch", "tiny@production", "--target", "cpu", "--output", str(out)])
    assert busy.exit_code == 2 and "not empty" in busy.output


def test_overrides_lineage_params_plots_and_no_secrets_in_mlflow(
    kiln_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    secret = "hf_secret_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    store_dir, db = tmp_path / "override-store", tmp_path / "override.db"
    monkeypatch.setenv("KILN_STORE_URI", store_dir.as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    registry = Registry(
        model_name="sec",
        store_uri="file:///nonexistent/profile-store",
        tracking_uri="sqlite:////nonexistent/profile.db",
    )  # both overridden by the variables
    fig, ax = plt.subplots()
    ax.plot([1, 4], [100.0, 300.0])
    plot = tmp_path / "latency_vs_throughput.png"
    fig.savefig(plot)
    plt.close(fig)
    lineage = {
        "recipe": "fp8",
        "target": "cpu",
        "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "model_sha": "f" * 40,
        "calibration_sha256": "c" * 64,
        "toolchain": {"torch": TORCH_VERSION},
        "source": "https://user:hunter2pass@hub.example/models",
        "hf_token": "also-a-secret",
        "note": f"downloaded with {secret}",
    }
    published = publish(
        make_engine(tmp_path / "engine"),
        registry=registry,
        build_key=key(11),
        lineage=lineage,
        metrics={"perplexity": 31.0},
        params={"recipe.name": "fp8", "api_token": "tok-xyz-987", "hub.auth": f"Bearer {secret}"},
        artifacts=[plot],
        passed_gates=True,
        recommended=True,
    )
    assert published.uri == (store_dir / "sec" / "cpu" / key(11)).as_uri()
    assert db.is_file() and not (kiln_home / "mlflow.db").exists()

    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(published.run_id)
    params, tags = run.data.params, run.data.tags
    assert params["lineage.model_sha"] == "f" * 40 and params["lineage.calibration_sha256"] == "c" * 64
    assert params["lineage.repo_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert params["lineage.toolchain.torch"] == TORCH_VERSION and params["recipe.name"] == "fp8"
    assert params["api_token"] == params["hub.auth"] == params["lineage.hf_token"] == "***"
    assert params["lineage.source"] == "https://***@hub.example/models"
    assert params["lineage.note"] == "downloaded with ***"
    png = Path(
        client.download_artifacts(published.run_id, "reports/latency_vs_throughput.png", str(tmp_path / "dl"))
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    texts = [
        json.dumps(params),
        json.dumps(tags),
        Path(client.download_artifacts(published.run_id, "kiln", str(tmp_path / "dl2")))
        .joinpath("lineage.json")
        .read_text(),
        (store_dir / "sec" / "cpu" / key(11) / "manifest.json").read_text(),
        json.dumps(client.get_model_version("sec.cpu", published.version).tags),
    ]
    for text in texts:
        for leaked in (secret, "hunter2pass", "also-a-secret", "tok-xyz-987"):
            assert leaked not in text


# --- real servers: mlflow server + SeaweedFS ----------------------------------------------------------------

_PUBLISHER = """
import json, os, signal, sys
from pathlib import Path
from kiln.profiles import Registry
from kiln.registry import publish

args = json.loads(sys.argv[1])

def die_after_second_file(event):
    if event.files_done == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash between two file uploads, nothing flushed

publish(Path(args["engine"]), registry=Registry(**args["registry"]), build_key=args["key"],
        lineage={"recipe": "fp8", "target": "cpu"}, metrics={"perplexity": 30.0}, params={}, artifacts=[],
        passed_gates=True, recommended=True, on_progress=die_after_second_file)
"""


@pytest.mark.servers
def test_publisher_killed_between_uploads_leaves_no_version_and_rerun_publishes_exactly_one(
    server_registry: Registry, tmp_path: Path
) -> None:
    engine = make_engine(tmp_path / "engine", files=4)
    args = {"engine": str(engine), "registry": server_registry.model_dump(), "key": key(7)}
    proc = subprocess.run(
        [sys.executable, "-c", _PUBLISHER, json.dumps(args)],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    client = MlflowClient(server_registry.tracking_uri, server_registry.tracking_uri)
    name = f"{server_registry.model_name}.cpu"
    store = open_store(server_registry.store_uri)
    assert (
        store.child(f"{server_registry.model_name}/cpu/{key(7)}").stat("files/kiln-engine.json") is not None
    )
    assert list_version_keys(store, server_registry.model_name, "cpu") == []
    assert client.search_model_versions(f"name = '{name}'") == []

    events: list[TransferEvent] = []
    published = do_publish(engine, server_registry, key(7), on_progress=events.append)
    assert (published.version, published.reused, published.candidate) == ("1", False, True)
    assert [e.skipped for e in events] == [True, True, False, False, False]  # resumed, not re-uploaded
    assert do_publish(engine, server_registry, key(7)).reused
    assert [mv.version for mv in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert list_version_keys(store, server_registry.model_name, "cpu") == [key(7)]


@pytest.mark.servers
def test_crash_between_upload_and_registration_is_completed_by_rerun(
    server_registry: Registry, tmp_path: Path
) -> None:
    """The state such a crash leaves: files + manifest in the store, a RUNNING run, no model version."""
    model = server_registry.model_name
    engine = make_engine(tmp_path / "engine")
    version_store = open_store(server_registry.store_uri).child(f"{model}/cpu/{key(3)}")
    upload_version(
        version_store,
        engine,
        model=model,
        target="cpu",
        recipe="fp8",
        build_key=key(3),
        engine=read(engine),
        lineage={},
    )
    client = MlflowClient(server_registry.tracking_uri, server_registry.tracking_uri)
    experiment = client.create_experiment(f"kiln/{model}")
    stale = client.create_run(experiment, tags={"kiln.build_key": key(3)}).info.run_id

    events: list[TransferEvent] = []
    published = do_publish(engine, server_registry, key(3), on_progress=events.append)
    assert events == []  # the manifest was there: nothing uploaded again
    assert published.version == "1" and published.run_id == stale
    assert client.get_run(stale).info.status == "FINISHED"
    assert len(client.search_runs([experiment])) == 1


@pytest.mark.servers
def test_promote_and_rollback_move_production_on_mlflow_server(
    server_registry: Registry, tmp_path: Path
) -> None:
    model, tracking = server_registry.model_name, server_registry.tracking_uri
    for n in (1, 2, 3):
        do_publish(make_engine(tmp_path / f"e{n}", seed=n), server_registry, key(n))
    do_publish(make_engine(tmp_path / "bad", seed=9), server_registry, key(4), passed=False)
    client = MlflowClient(tracking, tracking)
    name = f"{model}.cpu"
    assert client.get_registered_model(name).aliases == {"candidate": "3"}

    def production() -> str | None:
        return client.get_registered_model(name).aliases.get("production")

    with pytest.raises(VersionNotFoundError, match="no version holds 'production'"):
        rollback(model, "cpu", tracking_uri=tracking)
    for n in ("1", "2", "3"):
        assert promote(model, n, "cpu", reason=f"roll out {n}", tracking_uri=tracking).version == n
    with pytest.raises(NotPromotableError, match="failed its gates"):
        promote(model, "4", "cpu", tracking_uri=tracking)
    with pytest.raises(VersionNotFoundError, match="no version or alias '99'"):
        promote(model, "99", "cpu", tracking_uri=tracking)
    assert production() == "3"

    assert rollback(model, "cpu", reason="latency regression", tracking_uri=tracking).version == "2"
    assert rollback(model, "cpu", tracking_uri=tracking).version == "1"
    with pytest.raises(VersionNotFoundError, match="no earlier production version"):
        rollback(model, "cpu", tracking_uri=tracking)
    assert production() == "1"

    tags = client.get_model_version(name, "2").tags
    assert (
        tags["kiln.production.action"] == "rollback"
        and tags["kiln.production.reason"] == "latency regression"
    )
    assert "@" in tags["kiln.production.by"] and tags["kiln.production.at"].endswith("Z")
    history = json.loads(client.get_registered_model(name).tags["kiln.history.production"])
    assert [(h["action"], h["version"], h["previous"]) for h in history] == [
        ("promote", "1", None),
        ("promote", "2", "1"),
        ("promote", "3", "2"),
        ("rollback", "2", "3"),
        ("rollback", "1", "2"),
    ]
    listed = {info.version: info for info in list_versions(model, tracking_uri=tracking)}
    assert listed["1"].aliases == ["production"] and listed["3"].aliases == ["candidate"]
    assert listed["4"].passed_gates is False and listed["1"].metrics["perplexity"] == 32.5


@pytest.mark.servers
def test_fetch_verifies_checksums_and_refuses_another_gpu(server_registry: Registry, tmp_path: Path) -> None:
    model, tracking = server_registry.model_name, server_registry.tracking_uri
    cpu = do_publish(make_engine(tmp_path / "cpu"), server_registry, key(1))
    gpu = do_publish(make_engine(tmp_path / "gpu", sm="sm90", seed=5), server_registry, key(2), target="h100")

    out = fetch(f"{model}@candidate", "cpu", tmp_path / "ok", tracking_uri=tracking)
    assert (out / "rank1.safetensors").read_bytes() == (tmp_path / "cpu" / "rank1.safetensors").read_bytes()

    with pytest.raises(EngineMismatchError, match="built for sm90.*this machine has no CUDA GPU"):
        fetch(f"{model}@candidate", "h100", tmp_path / "refused", tracking_uri=tracking)
    assert not (tmp_path / "refused").exists()
    with pytest.warns(ForcedFetchWarning, match="sm90"):
        forced = fetch(
            f"{model}@v{gpu.version}", "h100", tmp_path / "forced", force=True, tracking_uri=tracking
        )
    assert (forced / "kiln-engine.json").is_file()

    bucket, prefix = cpu.uri.removeprefix("s3://").split("/", 1)
    s3 = open_store(f"s3://{bucket}").client
    s3.put_object(Bucket=bucket, Key=f"{prefix}/files/rank2.safetensors", Body=b"not the engine")
    with pytest.raises(IntegrityError, match="rank2.safetensors: checksum mismatch"):
        fetch(f"{model}@candidate", "cpu", tmp_path / "tampered", tracking_uri=tracking)
    assert not (tmp_path / "tampered").exists()

    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    manifest["files"] = manifest["files"][:1]
    s3.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json", Body=json.dumps(manifest).encode())
    with pytest.raises(IntegrityError, match="sha256 differs from the one registered"):
        fetch(f"{model}@candidate", "cpu", tmp_path / "swapped", tracking_uri=tracking)
    with pytest.raises(IntegrityError, match="manifest changed"):
        promote(model, "candidate", "cpu", tracking_uri=tracking)


@pytest.mark.servers
def test_mlflow_down_fails_clearly_before_any_upload_and_rerun_completes(
    server_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = server_registry.model_copy(update={"tracking_uri": dead})
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    started = time.monotonic()
    with pytest.raises(RegistryError, match=f"MLflow tracking server {dead} is unreachable"):
        check_registry(down)
    engine = make_engine(tmp_path / "engine")
    with pytest.raises(RegistryError, match=f"MLflow at {dead}"):
        do_publish(engine, down, key(5))
    assert time.monotonic() - started < 30
    store = open_store(server_registry.store_uri)
    assert list_version_keys(store, server_registry.model_name, "cpu") == []

    assert do_publish(engine, server_registry, key(5)).version == "1"


@pytest.mark.servers
def test_registry_misconfiguration_is_refused_before_work(server_registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryConfigError, match="bucket 'kiln-absent-bucket' does not exist"):
        check_registry(server_registry.model_copy(update={"store_uri": "s3://kiln-absent-bucket/engines"}))
    with pytest.raises(RegistryConfigError, match="remote MLflow server but the store is file://"):
        check_registry(server_registry.model_copy(update={"store_uri": (tmp_path / "s").as_uri()}))
    check_registry(server_registry)


@pytest.mark.servers
def test_half_registered_version_is_refused_and_completed_by_rerun(
    server_registry: Registry, tmp_path: Path
) -> None:
    """A crash after create_model_version: the version exists, ``kiln.state=registering``, no alias yet."""
    model, tracking = server_registry.model_name, server_registry.tracking_uri
    engine = make_engine(tmp_path / "engine")
    first = do_publish(engine, server_registry, key(21))
    client = MlflowClient(tracking, tracking)
    name = f"{model}.cpu"
    client.set_model_version_tag(name, first.version, "kiln.state", "registering")
    client.delete_registered_model_alias(name, "candidate")

    with pytest.raises(NotPromotableError, match="not completely published"):
        fetch(f"{model}@v{first.version}", "cpu", tmp_path / "out", tracking_uri=tracking)
    with pytest.raises(NotPromotableError, match="not completely published"):
        promote(model, first.version, "cpu", tracking_uri=tracking)
    assert not (tmp_path / "out").exists()
    assert "production" not in client.get_registered_model(name).aliases

    events: list[TransferEvent] = []
    again = do_publish(engine, server_registry, key(21), on_progress=events.append)
    assert (again.version, again.reused, again.candidate) == (first.version, True, True) and events == []
    assert client.get_model_version(name, first.version).tags["kiln.state"] == "published"
    assert [mv.version for mv in client.search_model_versions(f"name = '{name}'")] == [first.version]
    assert fetch(f"{model}@candidate", "cpu", tmp_path / "out", tracking_uri=tracking).is_dir()


_RACER = """
import json, sys, time
from pathlib import Path
from kiln.profiles import Registry
from kiln.registry import publish

args = json.loads(sys.argv[1])
while time.time() < args["start_at"]:  # both publishers leave the starting line together
    time.sleep(0.005)
out = publish(Path(args["engine"]), registry=Registry(**args["registry"]), build_key=args["key"],
              lineage={"recipe": "fp8", "target": "cpu"}, metrics={"perplexity": 30.0}, params={}, artifacts=[],
              passed_gates=True, recommended=True)
print(json.dumps({"version": str(out.version), "uri": out.uri}))
"""  # noqa: E501 (the script run in a subprocess, kept as it is)


@pytest.mark.servers
@pytest.mark.slow
def test_two_concurrent_publishers_of_one_build_leave_exactly_one_version(
    server_registry: Registry, tmp_path: Path
) -> None:
    engine = make_engine(tmp_path / "engine", files=4, size=200_000)
    args = {
        "engine": str(engine),
        "registry": server_registry.model_dump(),
        "key": key(31),
        "start_at": time.time() + 8,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, json.dumps(args)],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1]
    client = MlflowClient(server_registry.tracking_uri, server_registry.tracking_uri)
    name = f"{server_registry.model_name}.cpu"
    assert [mv.version for mv in client.search_model_versions(f"name = '{name}'")] == [results[0]["version"]]
    assert client.get_registered_model(name).aliases == {"candidate": results[0]["version"]}
    store = open_store(server_registry.store_uri)
    assert list_version_keys(store, server_registry.model_name, "cpu") == [key(31)]


class _Relay:
    """A TCP relay to the MLflow server that can be cut: the server 'goes down' for clients using it."""

    def __init__(self, upstream: str) -> None:
        import threading

        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.cut_off = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self.cut_off:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_off:
                client.close()
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.cut_off = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.mark.servers
def test_mlflow_down_after_upload_leaves_nothing_visible_and_rerun_completes(
    server_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    relay = _Relay(server_registry.tracking_uri)
    via_relay = server_registry.model_copy(update={"tracking_uri": relay.url})
    engine = make_engine(tmp_path / "engine", files=3)

    def server_dies_after_last_file(event: TransferEvent) -> None:
        if event.files_done == event.files_total:
            relay.cut()

    with pytest.raises(RegistryError, match=f"MLflow at {relay.url}"):
        do_publish(engine, via_relay, key(41), on_progress=server_dies_after_last_file)
    assert relay.cut_off  # the upload finished; registration is what failed
    client = MlflowClient(server_registry.tracking_uri, server_registry.tracking_uri)
    name = f"{server_registry.model_name}.cpu"
    assert client.search_model_versions(f"name = '{name}'") == []
    with pytest.raises(VersionNotFoundError):
        fetch(
            f"{server_registry.model_name}@candidate",
            "cpu",
            tmp_path / "out",
            tracking_uri=server_registry.tracking_uri,
        )

    events: list[TransferEvent] = []
    published = do_publish(engine, server_registry, key(41), on_progress=events.append)
    assert (published.version, published.reused, published.candidate) == ("1", False, True) and events == []
    assert [mv.version for mv in client.search_model_versions(f"name = '{name}'")] == ["1"]


def test_an_alias_moved_outside_kiln_is_noticed_by_versions_and_fetch(
    kiln_home: Path, tmp_path: Path
) -> None:
    """Moved in the MLflow UI (any client), an alias bypasses kiln's recorded history: say so."""
    registry = Registry(model_name="moved")
    check_registry(registry)
    do_publish(make_engine(tmp_path / "a"), registry, key(1))
    do_publish(make_engine(tmp_path / "b", seed=1), registry, key(2))
    runner = CliRunner()
    assert runner.invoke(app, ["promote", "moved", "1", "--target", "cpu", "--reason", "r"]).exit_code == 0
    quiet = runner.invoke(app, ["versions", "moved"])
    assert quiet.exit_code == 0 and "moved outside kiln" not in quiet.output  # every move so far recorded

    MlflowClient(registry.resolved_tracking_uri).set_registered_model_alias("moved.cpu", "production", "2")
    listed = runner.invoke(app, ["versions", "moved"], env={"COLUMNS": "200"})
    text = " ".join(listed.output.split())
    assert (
        listed.exit_code == 0 and "moved.cpu@production points at v2" in text and "moved outside kiln" in text
    )
    assert "last recorded move put it on v1" in text
    fetched = runner.invoke(
        app,
        ["fetch", "moved@production", "--target", "cpu", "--output", str(tmp_path / "o")],
        env={"COLUMNS": "200"},
    )
    assert fetched.exit_code == 0 and "moved outside kiln" in " ".join(fetched.output.split())


def test_runs_show_curves_their_source_and_open_on_the_runs_view(kiln_home: Path, tmp_path: Path) -> None:
    """Per-concurrency metrics also form one series with step = concurrency (MLflow draws a curve), runs carry
    MLflow's user/source tags, and the experiment is marked as model runs (not MLflow 3's GenAI overview)."""
    import getpass

    registry = Registry(model_name="curves")
    check_registry(registry)
    published = publish(
        make_engine(tmp_path / "a"),
        registry=registry,
        build_key=key(7),
        lineage={"recipe": "fp8", "target": "cpu"},
        metrics={"itl_p50_ms_c1": 12.0, "itl_p50_ms_c4": 15.5, "tokens_per_s": 80.0},
        params={},
        artifacts=[],
        passed_gates=True,
        recommended=True,
    )
    client = MlflowClient(registry.resolved_tracking_uri)
    history = client.get_metric_history(published.run_id, "itl_p50_ms")
    assert sorted((m.step, m.value) for m in history) == [(1, 12.0), (4, 15.5)]
    run = client.get_run(published.run_id)
    assert run.data.metrics["itl_p50_ms_c4"] == 15.5  # the names the gates read stay
    assert run.data.tags["mlflow.user"] == getpass.getuser() and run.data.tags[
        "mlflow.source.name"
    ].startswith("kiln")
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_interrupt_mid_registration_ends_the_run_killed_and_a_rerun_completes(
    kiln_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or kiln build's SIGTERM handler) lands while the version is being created: the MLflow run ends
    KILLED instead of RUNNING forever, and the rerun of the same build completes one version."""
    from kiln.registry import mlflow_registry

    registry = Registry(model_name="cut")
    check_registry(registry)
    real = mlflow_registry.ensure_registered_model

    # the signal arrives between logging the run and registering the version
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow_registry, "ensure_registered_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        do_publish(make_engine(tmp_path / "a"), registry, key(9))
    client = MlflowClient(registry.resolved_tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(mlflow_registry.N.experiment_name("cut")).experiment_id]
    )
    assert [r.info.status for r in runs] == ["KILLED"]
    monkeypatch.setattr(mlflow_registry, "ensure_registered_model", real)
    again = do_publish(make_engine(tmp_path / "a2"), registry, key(9))
    assert again.version == "1" and client.get_run(again.run_id).info.status == "FINISHED"
