"""Faults with real servers and real processes: nothing half-visible, reruns converge to exactly one version.

Cases already covered elsewhere (publisher SIGKILLed mid-upload, crash between upload and registration,
MLflow down before upload, two concurrent publishers, two processes on one cache key) are listed in
docs/RELIABILITY.md with their tests; this file adds the server-side and environment faults.
"""

from __future__ import annotations

import errno
import http.server
import multiprocessing
import os
import shutil
import subprocess
import threading
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kiln.cache import StepCache
from kiln.errors import RegistryError
from kiln.profiles import HubModel, Registry
from kiln.registry.store import list_version_keys, open_store
from tests.fixtures.hub import LocalHub, model_repo_files
from tests.fixtures.servers import S3Server, launch_mlflow, launch_seaweedfs
from tests.test_registry import do_publish, key, make_engine


def _versions(registry: Registry, target: str = "cpu") -> list[str]:
    client = MlflowClient(registry.tracking_uri, registry.tracking_uri)
    name = f"{registry.model_name}.{target}"
    return sorted(str(mv.version) for mv in client.search_model_versions(f"name = '{name}'"))


def _point_at(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


# --- S3 server dies mid-upload ------------------------------------------------------------------------------


@pytest.mark.servers
@pytest.mark.slow  # its own SeaweedFS, started twice
def test_s3_server_stopped_mid_upload_leaves_no_version_and_rerun_publishes_one(
    kiln_home: Path, mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "weed"
    s3 = launch_seaweedfs(root)  # private: this test kills it
    try:
        _point_at(s3, monkeypatch)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # a dead endpoint fails in seconds, not minutes
        registry = Registry(
            model_name=f"m-{uuid.uuid4().hex[:8]}",
            tracking_uri=mlflow_server.url,
            store_uri=f"s3://{s3.make_bucket()}/engines",
        )
        engine = make_engine(tmp_path / "engine", files=4)

        def kill_server_after_second_file(event) -> None:
            if event.files_done == 2 and s3.process.proc.poll() is None:
                s3.process.stop(grace_s=0.5)

        with pytest.raises(RegistryError) as error:
            do_publish(engine, registry, key(21), on_progress=kill_server_after_second_file)
        assert s3.endpoint_url.split("//")[1] in str(error.value)  # names the endpoint it could not reach
        assert _versions(registry) == []  # nothing registered

        s3 = launch_seaweedfs(root)  # same data dir, new ports: the half-upload is still there
        _point_at(s3, monkeypatch)
        store = open_store(registry.store_uri)
        assert list_version_keys(store, registry.model_name, "cpu") == []  # no manifest: not a version
        first = do_publish(engine, registry, key(21))
        again = do_publish(engine, registry, key(21))
        assert (first.version, first.reused, again.version, again.reused) == ("1", False, "1", True)
        assert _versions(registry) == ["1"]
        assert list_version_keys(store, registry.model_name, "cpu") == [key(21)]
    finally:
        s3.process.stop(grace_s=0.5)


# --- MLflow server dies mid-publish -------------------------------------------------------------------------


@pytest.mark.servers
@pytest.mark.slow  # its own mlflow server, started twice (~25 s)
def test_mlflow_server_stopped_mid_publish_is_completed_by_rerun_into_one_version(
    kiln_home: Path, s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mlflow"
    server = launch_mlflow(root)  # private: this test kills it
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        registry = Registry(
            model_name=f"m-{uuid.uuid4().hex[:8]}",
            tracking_uri=server.url,
            store_uri=f"s3://{s3_env.make_bucket()}/engines",
        )
        engine = make_engine(tmp_path / "engine", files=3)

        def kill_mlflow_after_upload(event) -> None:
            # the last engine file is up; MLflow dies before the run/version calls that follow
            if event.files_done == event.files_total and server.process.proc.poll() is None:
                server.process.stop(grace_s=2)

        with pytest.raises(RegistryError, match="MLflow"):
            do_publish(engine, registry, key(22), on_progress=kill_mlflow_after_upload)

        server = launch_mlflow(root)  # same database, new port
        registry = registry.model_copy(update={"tracking_uri": server.url})
        assert _versions(registry) == []  # the crash left no model version
        first = do_publish(engine, registry, key(22))
        assert (first.version, first.reused) == ("1", False)
        assert do_publish(engine, registry, key(22)).reused
        client = MlflowClient(server.url, server.url)
        mv = client.get_model_version(f"{registry.model_name}.cpu", "1")
        assert mv.tags["kiln.state"] == "published" and _versions(registry) == ["1"]
    finally:
        server.process.stop(grace_s=2)


# --- the hub answers 500 then recovers ---------------------------------------------------------------------


class _FlakyProxy:
    """An HTTP proxy in front of the local hub that answers 500 to the first ``failures`` requests."""

    def __init__(self, upstream: str, failures: int) -> None:
        self.upstream, self.failures, self.served_500 = upstream.rstrip("/"), failures, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self, method: str) -> None:
                if proxy.served_500 < proxy.failures:
                    proxy.served_500 += 1
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection"}}
                request = urllib.request.Request(proxy.upstream + self.path, method=method, headers=headers)
                try:
                    response = _OPENER.open(request, timeout=30)
                except urllib.error.HTTPError as exc:
                    response = exc
                body = response.read()
                self.send_response(response.status if hasattr(response, "status") else response.code)
                for name, value in response.headers.items():
                    if name.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(name, value)
                # HEAD: the upstream's length (the client sizes the download from it)
                length = response.headers.get("Content-Length") if method == "HEAD" else None
                self.send_header("Content-Length", length or str(len(body)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_HEAD(self) -> None:
                self._forward("HEAD")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # the client follows the hub's redirects itself
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def test_hub_500s_are_transient_and_the_download_task_retries_into_one_snapshot(
    prefect_harness, local_hub: LocalHub, tiny_hub_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow

    from kiln.hub import fetch_model
    from kiln.tasks import build as build_tasks

    local_hub.create_repo("org/flaky", model_repo_files(tiny_hub_model_dir, tiny_hub_model_dir))
    proxy = _FlakyProxy(local_hub.url, failures=1000)
    monkeypatch.setenv("HF_ENDPOINT", proxy.url)
    try:
        # a hub that keeps failing: a clear error, classed transient (retried), nothing in the HF cache
        with pytest.raises(Exception) as error:
            fetch_model(HubModel(repo_id="org/flaky", revision="main"))
        assert "is failing or busy (HTTP 500)" in str(error.value) or "cannot reach" in str(error.value), (
            error.value
        )
        assert "HF_TOKEN" not in str(error.value)  # a server error is not the user's credentials
        assert build_tasks.transient(error.value)
        assert not list(Path(os.environ["KILN_HOME"]).rglob("*.safetensors"))

        # the hub recovers after a few 500s: the real download task's retries get one pinned snapshot
        proxy.served_500, proxy.failures = 0, 3
        monkeypatch.setattr(build_tasks.download, "retry_delay_seconds", [0.1, 0.1, 0.1])
        from kiln.profiles import load_request

        monkeypatch.setenv("KILN_PROFILES_DIR", str(Path(__file__).resolve().parents[1] / "profiles"))
        request = load_request(
            {
                "name": "flaky",
                "model": {"repo_id": "org/flaky", "revision": "main"},
                "recipes": ["none"],
                "targets": ["cpu"],
                "registry": {"model_name": "flaky"},
            }
        )

        @flow(name="kiln-flaky-hub")
        def fetch_once():
            return build_tasks.download(request)

        snapshot = fetch_once()
        assert proxy.served_500 == 3
        assert snapshot.sha == local_hub.repos[("model", "org/flaky")].refs["main"]
        assert len(list(Path(os.environ["KILN_HOME"]).rglob("model.safetensors"))) == 1
    finally:
        proxy.close()


def test_a_hub_that_keeps_failing_exits_with_the_transient_code_not_the_input_code(
    local_hub: LocalHub, tiny_hub_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5xx after every retry is the hub's trouble, not a bad profile: exit 75 (EX_TEMPFAIL), so a scheduler
    retries it later instead of paging someone to fix an input."""
    import yaml
    from typer.testing import CliRunner

    from kiln.cli import app
    from kiln.errors import HubUnavailableError

    local_hub.create_repo("org/down", model_repo_files(tiny_hub_model_dir, tiny_hub_model_dir))
    proxy = _FlakyProxy(local_hub.url, failures=1000)
    monkeypatch.setenv("HF_ENDPOINT", proxy.url)
    profile = tmp_path / "down.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "name": "down",
                "model": {"repo_id": "org/down", "revision": "main"},
                "recipes": [{"name": "none", "quantization": "none"}],
                "targets": [{"name": "cpu"}],
                "registry": {"model_name": "down"},
            }
        )
    )
    try:
        with pytest.raises(HubUnavailableError) as error:
            from kiln.hub import fetch_model

            fetch_model(HubModel(repo_id="org/down", revision="main"))
        assert error.value.retryable and error.value.exit_code == 75
        result = CliRunner().invoke(
            app, ["quantize", str(profile), "--recipe", "none", "--output", str(tmp_path / "out")]
        )
        assert result.exit_code == 75, result.output
        assert "failing or busy" in " ".join(result.output.split()) or "cannot reach" in result.output
    finally:
        proxy.close()


# --- disk full in KILN_HOME ---------------------------------------------------------------------------------


@pytest.fixture
def small_kiln_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """KILN_HOME on a 1 MiB tmpfs (needs root / CAP_SYS_ADMIN; skipped where mounting is refused)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    monkeypatch.setenv("KILN_HOME", str(mount))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KILN_STORE_URI", raising=False)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@dataclass
class _Out:
    path: str
    size: int


def test_disk_full_during_a_step_leaves_no_entry_and_a_rerun_with_space_computes_once(
    small_kiln_home: Path,
) -> None:
    cache = StepCache("quantize")
    calls = []

    def compute(out: Path) -> _Out:
        calls.append(out)
        data = os.urandom(512 * 1024)
        for index in range(4):  # 2 MiB into a 1 MiB disk
            (out / f"rank{index}.safetensors").write_bytes(data)
        return _Out(str(out), 4 * len(data))

    with pytest.raises(OSError) as error:
        cache.run("k" * 64, compute, _Out)
    assert error.value.errno == errno.ENOSPC
    assert cache.get("k" * 64, _Out) is None  # no record: the half-written output is never reused
    # the failed step's partial output does not keep the disk full for the next step
    assert shutil.disk_usage(small_kiln_home).used < 256 * 1024

    def small(out: Path) -> _Out:
        calls.append(out)
        (out / "rank0.safetensors").write_bytes(b"x" * 1000)
        return _Out(str(out), 1000)

    assert not cache.run("k" * 64, small, _Out).reused
    assert cache.run("k" * 64, small, _Out).reused and len(calls) == 2


def test_disk_full_inside_safetensors_gets_the_clear_message_naming_the_step_and_path(
    small_kiln_home: Path,
) -> None:
    """safetensors reports ENOSPC only as text ("No space left on device (os error 28)"); the step says what
    to do, names the path, and keeps nothing partial."""
    import torch
    from safetensors.torch import save_file

    from kiln.errors import DiskFullError

    cache = StepCache("compile")

    def compute(out: Path) -> _Out:
        save_file({"w": torch.zeros(1024, 1024)}, str(out / "rank0.safetensors"))  # 4 MiB into a 1 MiB disk
        return _Out(str(out), 0)

    with pytest.raises(DiskFullError) as error:
        cache.run("d" * 64, compute, _Out)
    message = str(error.value)
    assert message.startswith("compile: cannot write ") and str(cache.output_dir("d" * 64)) in message
    assert "No space left on device" in message and "free space" in message
    assert error.value.errno == errno.ENOSPC and not cache.entry_dir("d" * 64).exists()


def test_disk_full_in_the_store_leaves_no_version_and_rerun_publishes_one(
    small_kiln_home: Path, tmp_path: Path
) -> None:
    """The embedded registry (file:// store + SQLite under KILN_HOME) on a full disk."""
    store_dir = small_kiln_home / "store"
    registry = Registry(
        model_name="full",
        store_uri=store_dir.as_uri(),
        # the DB elsewhere: only the store fills
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    big = make_engine(tmp_path / "engine-big", files=3, size=512 * 1024)
    with pytest.raises(RegistryError, match=r"store file://.*cannot write .*No space left on device"):
        do_publish(big, registry, key(23))
    assert not [p for p in store_dir.rglob("*.tmp")]  # no partial file left behind
    assert list_version_keys(open_store(registry.store_uri), "full", "cpu") == []
    assert _versions(registry) == []
    # space freed (the half upload removed by the operator): one version, and a rerun reuses it
    shutil.rmtree(store_dir)
    small = make_engine(tmp_path / "engine-small", files=2, size=10_000)
    assert do_publish(small, registry, key(23)).version == "1"
    assert do_publish(small, registry, key(23)).reused and _versions(registry) == ["1"]


# --- concurrency: different keys share one cache ------------------------------------------------------------


def _compute_key(root: str, key_: str, marker: str) -> tuple[str, bool]:
    @dataclass
    class R:
        path: str
        value: str

    def compute(out: Path) -> R:
        with open(marker, "a") as f:
            f.write(key_ + "\n")
        (out / "w.bin").write_text(key_ * 1000)
        return R(str(out), key_)

    hit = StepCache("quantize", root=Path(root)).run(key_, compute, R)
    return hit.value.value + ":" + Path(hit.value.path, "w.bin").read_text()[: len(key_)], hit.reused


def test_concurrent_steps_of_different_keys_share_a_cache_without_mixing(tmp_path: Path) -> None:
    marker = tmp_path / "calls"
    keys = ["a" * 64, "b" * 64, "a" * 64, "b" * 64]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_compute_key, [(str(tmp_path / "c"), k, str(marker)) for k in keys])
    assert sorted(marker.read_text().split()) == ["a" * 64, "b" * 64]  # each key computed exactly once
    for k, (value, _) in zip(keys, results, strict=True):
        assert value == f"{k}:{k}"  # each process got its own key's files
    assert sorted(reused for _, reused in results) == [False, False, True, True]


# --- process killed during calibration, then rerun ----------------------------------------------------------

_CALIBRATE = """
import json, os, signal, sys
from dataclasses import dataclass
from pathlib import Path
from kiln.cache import StepCache
from kiln.calibration import calibration_set
from kiln.hub import load_tokenizer
from kiln.profiles import load_request
from kiln.quantize import quantize

args = json.loads(sys.argv[1])
request = load_request({"name": "kill", "model": {"local_dir": args["model"]}, "recipes": ["fp8"],
                        "targets": ["cpu"], "registry": {"model_name": "kill"}})
recipe = request.recipes[0]
cal = calibration_set(recipe.calibration.model_copy(update={"num_samples": 4, "seq_len": 32}),
                      load_tokenizer(args["model"]))

@dataclass
class Out:
    trtllm: str

def die_mid_calibration(done, total):
    if args["kill"] and done == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # nothing flushed, no cleanup runs

def compute(out):
    result = quantize(Path(args["model"]), recipe, layouts=[(1, 1)], output_dir=out, dtype="float32", device="cpu",
                      lineage={}, calibration=cal, formats=("trtllm",), batch_size=1, on_progress=die_mid_calibration)
    return Out(str(next(iter(result.trtllm_dirs.values()))))

hit = StepCache("quantize").run("c" * 64, compute, Out)
print(json.dumps({"reused": hit.reused, "trtllm": hit.value.trtllm}))
"""  # noqa: E501 (the script run in a subprocess, kept as it is)


@pytest.mark.slow  # three ModelOpt runs in fresh processes (~1 min on 2 cores)
def test_process_killed_during_calibration_leaves_no_checkpoint_and_rerun_computes_one(
    kiln_home: Path, tiny_hub_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import signal
    import sys

    monkeypatch.setenv("KILN_PROFILES_DIR", str(Path(__file__).resolve().parents[1] / "profiles"))

    def run(kill: bool) -> subprocess.CompletedProcess:
        args = json.dumps({"model": str(tiny_hub_model_dir), "kill": kill})
        return subprocess.run(
            [sys.executable, "-c", _CALIBRATE, args],
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=300,
        )

    killed = run(kill=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    entry = kiln_home / "cache" / "quantize" / ("c" * 64)
    assert not (entry / "record.json").exists() and not list(entry.rglob("rank0.safetensors"))

    first = run(kill=False)
    assert first.returncode == 0, first.stderr[-2000:]
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert result["reused"] is False and Path(result["trtllm"], "rank0.safetensors").is_file()
    again = json.loads(run(kill=False).stdout.strip().splitlines()[-1])
    assert again == {"reused": True, "trtllm": result["trtllm"]}
    assert [p.name for p in (kiln_home / "cache" / "quantize").iterdir() if p.is_dir()] == ["c" * 64]


def test_concurrent_first_uses_of_a_fresh_mlflow_store_all_succeed(tmp_path: Path) -> None:
    """Two `kiln build`s on a fresh KILN_HOME raced in MLflow's schema migration (alembic "Online migration
    expected to match one row" / "duplicate column name"): four real processes at once all check it."""
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys; from kiln.registry.mlflow_registry import check_tracking; "
        "check_tracking(sys.argv[1], 'm')"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(outputs)[-3000:]
    from kiln.registry.naming import experiment_name

    assert MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment_name("m")) is not None


# --- Ctrl-C / SIGTERM during a real build ------------------------------------------------------------------


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_an_interrupted_build_stops_in_seconds_with_one_line_exit_130_and_cancelled_runs(
    tiny_hub_model_dir: Path, tmp_path: Path, signum: str
) -> None:
    """Ctrl-C used to print a KeyboardInterrupt step line, hang minutes retrying the embedded server (which
    the terminal's Ctrl-C had killed too) and dump ~350 lines of tracebacks, leaving the runs Running. The
    signal goes to the whole process group, as a terminal sends Ctrl-C."""
    import signal
    import sqlite3
    import sys
    import time

    import yaml
    from filelock import FileLock

    home = tmp_path / "home"
    profile = tmp_path / "p.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "name": "interrupted",
                "model": {"local_dir": str(tiny_hub_model_dir)},
                "recipes": [
                    {"name": "none", "quantization": "none"},
                    {"name": "wo", "quantization": "int8_wo"},
                ],
                "targets": [
                    {
                        "name": "cpu",
                        "dtype": "float32",
                        "limits": {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 128},
                    }
                ],
                "evaluation": {"heldout_tokens": 2048, "prompts": 2, "max_new_tokens": 4, "concurrency": [1]},
                "registry": {"model_name": "interrupted"},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(KILN_HOME=str(home), PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "kiln"), "build", str(profile)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # interrupt once a step has finished: the flow is mid-way
            line = proc.stdout.readline()
            lines.append(line)
            if "quantize" in line and ("✓" in line or "↺" in line) or not line:
                break
        assert proc.poll() is None, "".join(lines)
        os.killpg(proc.pid, getattr(signal, signum))
        start = time.monotonic()
        rest, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, "".join(lines) + rest
    assert elapsed < 30, f"took {elapsed:.0f}s to stop"
    assert "interrupted after" in rest and "Traceback" not in rest and len(rest.splitlines()) <= 6, rest
    db = sqlite3.connect(home / "prefect" / "prefect.db")
    flows = db.execute("select state_type from flow_run").fetchall()
    assert ("CANCELLED",) in flows and ("RUNNING",) not in flows, flows
    assert ("RUNNING",) not in db.execute("select state_type from task_run").fetchall()
    for lock in (home / "cache").rglob("*.lock"):  # the step-cache locks are free for the rerun
        FileLock(str(lock), timeout=0).acquire()
