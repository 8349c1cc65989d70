"""``kiln bench ENGINE_DIR`` (in process) vs ``kiln bench --url`` against ``kiln serve`` on CPU, same prompts,
same sweep (run by hand; not a test).

    .venv/bin/python bench/serve_cpu.py [--parts smollm2,micro] [--out bench/results]

Two engines, each compiled for CPU into a temp dir:

- ``smollm2``: the real SmolLM2-135M-Instruct (``$KILN_HOME/assets``, as ``scripts/setup.sh`` prepares it),
float32,
  max_batch_size 8, concurrency 1,4,8, 128 prompt tokens -> 32 output tokens. A 40-75 ms decode step: what
  serving costs is small next to it.
- ``micro``: a random-weight 2-layer Llama (hidden 64, vocab 4096, SmolLM2's tokenizer), max_batch_size 64,
  concurrency 1,8,32,64, 128 -> 128 tokens, torch on one thread. Its decode step at 64 requests takes about a
  millisecond, so tokens come as fast as the 1B engine makes them on an H200 (~45k/s at 64): the server's own
  per-token work (HTTP, one SSE chunk per token, detokenizing, the hand-off from the engine) is what the
  comparison shows, with the CPU seconds the server spent per token.

Both commands run as their own processes, one after the other, with the same JSONL prompts
(``--dataset``, seeded token ids): ``kiln bench ENGINE_DIR ... --json``, then ``kiln serve ENGINE_DIR`` on a
free loopback port and ``kiln bench --url http://127.0.0.1:PORT ... --json``. Both run
``kiln.validation.perf.sweep``. The helpers here (``KilnServe``, ``overhead``) are reused by
``bench/serve_gpu.py``. Writes ``serve_cpu.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KILN = [sys.executable, "-c", "from kiln.cli import app; app()"]
MICRO = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 4096,
    "max_position_embeddings": 1024,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of ``pid`` itself and of its live descendants (Linux ``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(p: int) -> tuple[int, float] | None:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick  # ppid, utime + stime

    table = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := stat(int(p))) is not None}
    children, frontier = 0.0, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, seconds) in table.items():
            if ppid == parent:
                children += seconds
                frontier.append(child)
    return {"self": table.get(pid, (0, 0.0))[1], "children": children}


class KilnServe:
    """``kiln serve ENGINE_DIR`` (or ``argv``, given the port) as a subprocess in its own session on a free
    loopback port, ready once ``/health`` answers."""

    def __init__(
        self,
        engine_dir: Path,
        env: dict[str, str],
        log_path: Path,
        *args: str,
        timeout_s: float = 600,
        argv: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [*(argv or [*KILN, "serve"]), str(engine_dir), "--port", str(self.port), *args]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"kiln serve exited {self.proc.returncode} during start-up:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - started > timeout_s:
                self.stop()
                raise SystemExit(f"kiln serve not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)
        self.ready_s = time.perf_counter() - started

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def metrics(self, prefix: str) -> dict[str, float]:
        """The server's Prometheus samples whose names start with ``prefix`` (sample name with labels ->
        value)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as response:
            text = response.read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(prefix)
        }

    def generated_tokens(self) -> float:
        return sum(self.metrics("kiln_generation_tokens_total").values())

    def cpu(self) -> dict[str, float]:
        return cpu_seconds(self.proc.pid)

    def stop(self, grace_s: float = 60) -> None:
        """SIGTERM (the server drains), SIGKILL after ``grace_s``."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=grace_s)


def server_cost(before: dict[str, float], after: dict[str, float], tokens: float) -> dict[str, float | None]:
    """CPU microseconds the server's processes spent per generated token over a window."""
    if tokens <= 0:
        return {"tokens": tokens, "us_per_token": None}
    total = (after["self"] + after["children"]) - (before["self"] + before["children"])
    return {
        "tokens": tokens,
        "cpu_s": round(total, 2),
        "us_per_token": round(1e6 * total / tokens, 1),
        "front_us_per_token": round(1e6 * (after["self"] - before["self"]) / tokens, 1),
        "engine_process_us_per_token": round(1e6 * (after["children"] - before["children"]) / tokens, 1),
    }


def overhead(engine_points: list[dict], url_points: list[dict]) -> list[dict]:
    """Per level: what the server costs against in process (output tok/s lost, TTFT and ITL added)."""
    by_level = {p["concurrency"]: p for p in url_points}
    rows = []
    for p in engine_points:
        q = by_level.get(p["concurrency"])
        if q is None:
            continue
        row = {
            "concurrency": p["concurrency"],
            "tok_s_ratio": round(q["output_tokens_per_s"] / p["output_tokens_per_s"], 3),
            "tok_s_overhead_pct": round(100 * (1 - q["output_tokens_per_s"] / p["output_tokens_per_s"]), 1),
        }
        for key in ("p50", "p90", "p99"):
            row[f"ttft_{key}_added_ms"] = round(q["ttft_ms"][key] - p["ttft_ms"][key], 2)
        if p.get("itl_ms") and q.get("itl_ms"):
            row["itl_p50_added_ms"] = round(q["itl_ms"]["p50"] - p["itl_ms"]["p50"], 3)
        rows.append(row)
    return rows


def table(engine_points: list[dict], url_points: list[dict]) -> list[str]:
    """Both modes per level, with the server's ratio to in process."""
    lines = [
        "| concurrency | mode | req/s | output tok/s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | "
        "HTTP / in process tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    by_level = {p["concurrency"]: p for p in url_points}
    for point in engine_points:
        other = by_level.get(point["concurrency"])
        for mode, p in (("in process", point), ("kiln serve", other)):
            if p is None:
                continue
            ttft, itl = p["ttft_ms"], p["itl_ms"] or {"p50": 0, "p90": 0, "p99": 0}
            ratio = f"{other['output_tokens_per_s'] / point['output_tokens_per_s']:.3f}" if p is other else ""
            lines.append(
                f"| {p['concurrency']} | {mode} | {p['requests_per_s']:.2f} | "
                f"{p['output_tokens_per_s']:.0f} | {ttft['p50']:.1f} / {ttft['p90']:.1f} / "
                f"{ttft['p99']:.1f} | {itl['p50']:.2f} / {itl['p90']:.2f} / {itl['p99']:.2f} | {ratio} |"
            )
    return lines


def write_dataset(path: Path, count: int, input_len: int, vocab: int, output_len: int, seed: int = 0) -> Path:
    """``count`` prompts of ``input_len`` seeded random token ids (both modes send exactly these)."""
    rng = random.Random(seed)
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt_token_ids": [rng.randrange(vocab) for _ in range(input_len)],
                    "max_tokens": output_len,
                }
            )
            + "\n"
            for _ in range(count)
        )
    )
    return path


def bench(args: list[str], env: dict[str, str]) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [*KILN, "bench", *args, "--json"], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"kiln bench {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout), time.perf_counter() - started


def compare(engine_dir: Path, sweep: list[str], env: dict[str, str], log_dir: Path) -> dict:
    """``kiln bench ENGINE_DIR``, then ``kiln bench --url`` against a fresh ``kiln serve`` of the same dir."""
    in_process, engine_s = bench([str(engine_dir), *sweep], env)
    server = KilnServe(engine_dir, env, log_dir / "serve.log")
    try:
        tokens, cpu = server.generated_tokens(), server.cpu()
        over_http, url_s = bench(["--url", server.url, *sweep], env)
        cost = server_cost(cpu, server.cpu(), server.generated_tokens() - tokens)
    finally:
        server.stop()
    return {
        "wall_s": {
            "engine": round(engine_s, 1),
            "url": round(url_s, 1),
            "serve_ready": round(server.ready_s, 1),
        },
        "engine": in_process,
        "url": over_http,
        "server_cpu": cost,
        "overhead": overhead(in_process["points"], over_http["points"]),
    }


def sweep_url_per_level(server: KilnServe, levels: list[int], args: list[str], env: dict[str, str]) -> dict:
    """``kiln bench --url`` one level at a time, with the server's CPU per token of each level."""
    points, costs, wall = [], [], 0.0
    for level in levels:
        tokens, cpu = server.generated_tokens(), server.cpu()
        document, seconds = bench(["--url", server.url, "-c", str(level), *args], env)
        wall += seconds
        points += document["points"]
        costs.append(
            {"concurrency": level, **server_cost(cpu, server.cpu(), server.generated_tokens() - tokens)}
        )
    return {**document, "points": points, "server_cpu": costs, "wall_s": round(wall, 1)}


def fake_worker(argv: list[str]) -> None:
    """A stand-in engine process speaking kiln.serve.wire: it admits every request and every ``--step-ms``
    makes one token for each running one (up to 64), sleeping in between, so that only the HTTP process
    works. A step that admits requests first stalls ``--prefill-ms`` per request joining (a GPU prefill's
    cost, which is what a burst arriving in several waves pays several times) and sends their first
    tokens."""
    import select

    from kiln.serve.wire import FrameReader, Steps, json_frame, steps_frame

    parser = argparse.ArgumentParser()
    parser.add_argument("--step-ms", type=float, required=True)
    parser.add_argument("--prefill-ms", type=float, default=0.0, help="per request a prefill admits")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("engine_dir")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as the real one: the HTTP process says when to stop
    sock, reader, rng = socket.socket(fileno=args.fd), FrameReader(), random.Random(0)
    limits = {"max_batch_size": 64, "max_input_len": 256, "max_seq_len": 512, "device": "none"}
    sock.sendall(json_frame({"ready": limits}))
    running: dict[int, list[float]] = {}  # id -> [tokens left, arrived]
    waiting: list[tuple[int, list[float]]] = []
    step_s, next_step = args.step_ms / 1000, time.perf_counter()
    while True:
        timeout = max(0.0, next_step - time.perf_counter()) if running or waiting else None
        if select.select([sock], [], [], timeout)[0]:
            data = sock.recv(1 << 20)
            if not data:
                return
            admitted = []
            for frame in reader.feed(data):
                if "stop" in frame:
                    return
                if "add" in frame:
                    add = frame["add"]
                    state = [
                        add["sampling"]["max_new_tokens"],
                        add["arrived"],
                        add.get("sent", 0.0),
                        time.perf_counter(),
                    ]
                    waiting.append((add["id"], state))
                    admitted.append([add["id"], None])
                if "cancel" in frame:
                    running.pop(frame["cancel"], None)
                    waiting = [w for w in waiting if w[0] != frame["cancel"]]
            if admitted:
                sock.sendall(json_frame({"admitted": admitted}))
            if not running:
                next_step = time.perf_counter() + step_s
        now = time.perf_counter()
        if now < next_step or not (running or waiting):
            continue
        ids, tokens, times, finish = [], [], [], bytearray()
        joining = waiting[: 64 - len(running)]
        del waiting[: len(joining)]
        if joining and args.prefill_ms:
            time.sleep(len(joining) * args.prefill_ms / 1000)
            done = time.perf_counter()
            prefilled = [[s[3] - s[2], now - s[3], done - now] for _, s in joining]
            for request_id, state in joining:
                state[0] -= 1
                ids.append(request_id)
                tokens.append(rng.randrange(17, MICRO["vocab_size"]))
                times.append(done - state[1])
                finish.append(1 if state[0] <= 0 else 0)
            sock.sendall(
                steps_frame(
                    Steps(len(running), len(waiting), 0, ids, tokens, times, bytes(finish), [len(ids)])
                )
                + json_frame({"prefilled": prefilled})
            )
            ids, tokens, times, finish = [], [], [], bytearray()
            now = next_step = done  # the decode was stalled meanwhile: its pace resumes from here
        running.update((request_id, state) for request_id, state in joining if state[0] > 0)
        for request_id, state in list(running.items()):
            state[0] -= 1
            ids.append(request_id)
            tokens.append(rng.randrange(17, MICRO["vocab_size"]))
            times.append(now - state[1])
            finish.append(1 if state[0] <= 0 else 0)
            if state[0] <= 0:
                del running[request_id]
        sock.sendall(
            steps_frame(Steps(len(running), len(waiting), 0, ids, tokens, times, bytes(finish), [len(ids)]))
        )
        next_step += step_s


def front_end(argv: list[str]) -> None:
    """``kiln serve``'s HTTP process over ``fake_worker`` (``--step-ms``), on ``--port``."""
    from kiln.serve.app import ServeSettings
    from kiln.serve.loop import EngineProcess
    from kiln.serve.server import serve_engine

    parser = argparse.ArgumentParser()
    parser.add_argument("--step-ms", type=float, required=True)
    parser.add_argument("--prefill-ms", type=float, default=0.0)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("engine_dir", type=Path)
    args = parser.parse_args(argv)
    engine = EngineProcess.start(
        args.engine_dir,
        worker=[
            *(sys.executable, __file__, "fake-worker"),
            *("--step-ms", str(args.step_ms), "--prefill-ms", str(args.prefill_ms)),
        ],
    )
    serve_engine(
        engine,
        args.engine_dir,
        ServeSettings(model_name="fake", source="fake engine"),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
    )


def compile_smollm2(out: Path) -> Path:
    """The real SmolLM2-135M-Instruct, float32, max_batch_size 8."""
    from kiln.assets import SMOLLM2_DIR
    from kiln.constants import assets_dir
    from kiln.engine.torch import TorchBackend
    from kiln.profiles import Target

    hf = assets_dir() / SMOLLM2_DIR
    target = Target(
        name="cpu", dtype="float32", limits={"max_batch_size": 8, "max_input_len": 512, "max_seq_len": 1024}
    )
    return TorchBackend().compile(hf, target, out, {"tokenizer_dir": str(hf)})


def compile_micro(out: Path) -> Path:
    """The random 2-layer Llama of MICRO with SmolLM2's tokenizer (ids below 4096 are ordinary byte-level
    tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kiln.assets import SMOLLM2_DIR
    from kiln.constants import assets_dir
    from kiln.engine.torch import TorchBackend
    from kiln.profiles import Target

    torch.manual_seed(0)
    hf = out / "hf"
    LlamaForCausalLM(LlamaConfig(**MICRO, architectures=["LlamaForCausalLM"])).save_pretrained(hf)
    target = Target(
        name="cpu", dtype="float32", limits={"max_batch_size": 64, "max_input_len": 256, "max_seq_len": 512}
    )
    return TorchBackend().compile(
        hf, target, out / "engine", {"model_sha": "random"}, tokenizer_dir=assets_dir() / SMOLLM2_DIR
    )


PARTS = {
    "smollm2": {
        "compile": compile_smollm2,
        "vocab": 49152,
        "concurrency": "1,4,8",
        "input_len": 128,
        "output_len": 32,
        "requests": 8,
        "env": {"OMP_WAIT_POLICY": "PASSIVE"},
    },
    "micro": {
        "compile": compile_micro,
        "vocab": MICRO["vocab_size"],
        "concurrency": "1,8,32,64",
        "input_len": 128,
        "output_len": 128,
        "requests": 128,
        "env": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    },
}


def frontend_part(tmp: Path, step_ms: float) -> dict:
    """The HTTP process alone: ``kiln serve``'s app over ``fake_worker``, whose tokens cost nothing to
    make."""
    engine_dir = compile_micro(tmp / "engine")  # only its tokenizer is used
    dataset = write_dataset(tmp / "prompts.jsonl", 64, 128, MICRO["vocab_size"], 128)
    env = dict(os.environ)
    server = KilnServe(
        engine_dir,
        env,
        tmp / "front-end.log",
        "--step-ms",
        str(step_ms),
        argv=[sys.executable, __file__, "front-end"],
    )
    try:
        url = sweep_url_per_level(
            server, [1, 8, 32, 64], ["--dataset", str(dataset), "--requests", "128"], env
        )
    finally:
        server.stop()
    ideal = {p["concurrency"]: p["concurrency"] * 1000 / step_ms for p in url["points"]}
    return {
        "step_ms": step_ms,
        "url": url,
        "rows": [
            {
                "concurrency": p["concurrency"],
                "output_tokens_per_s": round(p["output_tokens_per_s"]),
                "ideal_tokens_per_s": round(ideal[p["concurrency"]]),
                "share_of_ideal": round(p["output_tokens_per_s"] / ideal[p["concurrency"]], 3),
                "itl_p50_ms": round(p["itl_ms"]["p50"], 3),
                "ttft_p50_ms": round(p["ttft_ms"]["p50"], 2),
                "front_us_per_token": cost["front_us_per_token"],
            }
            for p, cost in zip(url["points"], url["server_cpu"], strict=True)
        ],
    }


def before_and_after(result: dict) -> list[str]:
    """The micro part run alternately by the server before and after a change (``--ab``), with the host's
    load."""
    runs = result.get("ab") or []
    if not runs:
        return []
    levels = [o["concurrency"] for o in runs[0]["overhead"]]
    lines = [
        "",
        "## micro: the server before and after the engine moved to a process of its own, run alternately",
        "",
        "`before`: the server at 8814f37 (one process, the engine on a thread of it, one asyncio hand-off "
        "per token, a single-process httpx client); `after`: this one. Same command, `--parts micro`, one "
        "after the other; HTTP / in process output tok/s per concurrency, and the server's CPU per token.",
        "",
        "| run | 1-min load before | " + " | ".join(f"c{c}" for c in levels) + " | server CPU us/token |",
        "| --- | --- | " + " | ".join("---" for _ in levels) + " | --- |",
    ]
    for run in runs:
        ratios = {o["concurrency"]: o["tok_s_ratio"] for o in run["overhead"]}
        lines.append(
            f"| {run['name']} | {run['load'][0]:.1f} | "
            + " | ".join(str(ratios.get(c, "-")) for c in levels)
            + f" | {run['server_cpu'].get('us_per_token')} |"
        )
    return lines


READING = """## Reading it

- Two cores, shared with other jobs (the load averages above), carry everything here: the engine's compute,
  the HTTP process, the benchmark's client processes and the in-process benchmark. The `micro` engine needs a
  core of its own to make its ~12k tokens/s, so over HTTP the comparison measures how the cores are shared,
  not what serving costs per token: before and after overlap within the run-to-run spread, in both
  directions. What serving costs on a GPU host (an engine process with its own core and the GPU, an HTTP
  process with another) is measured by `bench/serve_gpu.py`.
- `frontend` is the HTTP process's own cost, with an engine that costs nothing: its CPU per token falls
  from ~240 us at concurrency 1 (every token is a wake-up of the event loop and a write of its own) to
  ~18 us at 64, where one engine step's tokens arrive in one frame and a client that fell behind gets several
  tokens in one write (ITL p50 ~0 there: tokens arrive in bursts because this host's two cores are busy,
  client included).
- `smollm2`: a 75-500 ms step, next to which serving adds little at concurrency 1; the higher levels lose
  more over HTTP on this host because the engine process and the HTTP process compete for the same cores."""


def markdown(result: dict) -> str:
    lines = [
        "# kiln serve on CPU: in process vs over HTTP",
        "",
        f"Command: `{result['command']}` ({result['machine']}; 1-min load average "
        f"{result['load_average'][0]:.1f} before, {result['load_average_after'][0]:.1f} after: other jobs "
        "share the cores, so single samples are noisy).",
        "",
        "Each part runs two commands, each its own process, one after the other, on the same JSONL prompts:",
        "",
        "- in process: `kiln bench ENGINE_DIR --dataset PROMPTS.jsonl -c LEVELS --requests N --json`",
        "- over HTTP: `kiln serve ENGINE_DIR --port PORT`, then `kiln bench --url http://127.0.0.1:PORT "
        "--dataset PROMPTS.jsonl -c LEVELS --requests N --json`",
    ]
    front = result.get("frontend")
    if front:
        lines += [
            "",
            "## frontend: the HTTP process alone, over a stand-in engine making a step every "
            f"{front['step_ms']} ms",
            "",
            "`kiln serve`'s HTTP process (the same app, `bench/serve_cpu.py front-end`) over `fake_worker`, "
            "an engine process that admits every request and makes one token per running request per step "
            "at no cost: what the server can carry when tokens come as fast as from the 1B engine on an "
            "H200.",
            "",
            "| concurrency | output tok/s | the stand-in's rate | share | ITL p50 ms | TTFT p50 ms | "
            "HTTP process CPU us/token |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['concurrency']} | {r['output_tokens_per_s']} | {r['ideal_tokens_per_s']} | "
            f"{r['share_of_ideal']} | {r['itl_p50_ms']} | {r['ttft_p50_ms']} | {r['front_us_per_token']} |"
            for r in front["rows"]
        ]
    lines += before_and_after(result)
    for name, run in result["parts"].items():
        first = run["engine"]
        cost = run["server_cpu"]
        lines += [
            "",
            f"## {name}: {run['description']}",
            "",
            f"{first['prompt_len']} prompt tokens -> {first['gen_len']} output tokens, greedy, "
            f"{run['settings']['requests']}+ requests per level after {first['warmup_rounds']} warm-up "
            f"round(s); environment {run['settings']['env']}.",
            "",
            *table(first["points"], run["url"]["points"]),
            "",
            "| concurrency | tok/s lost over HTTP | TTFT p50 added ms | ITL p50 added ms |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {o['concurrency']} | {o['tok_s_overhead_pct']}% | {o['ttft_p50_added_ms']} | "
            f"{o.get('itl_p50_added_ms', '-')} |"
            for o in run["overhead"]
        ]
        if cost and cost.get("us_per_token") is not None:
            lines += [
                "",
                f"Server CPU over the `--url` sweep: {cost['us_per_token']} us per generated token "
                f"(HTTP process {cost['front_us_per_token']} us, engine process "
                f"{cost['engine_process_us_per_token']} us; {int(cost['tokens'])} tokens).",
            ]
    lines += ["", READING]
    return "\n".join(lines) + "\n"


def ab_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        data = json.loads(path.read_text())
        micro = data["parts"]["micro"]
        runs.append(
            {
                "name": path.stem,
                "command": data["command"],
                "load": data["load_average"],
                "overhead": micro["overhead"],
                "server_cpu": micro["server_cpu"],
            }
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    if len(sys.argv) > 1 and sys.argv[1] in ("fake-worker", "front-end"):
        (fake_worker if sys.argv[1] == "fake-worker" else front_end)(sys.argv[2:])
        return
    parser.add_argument(
        "--parts",
        default="smollm2,micro,frontend",
        help=f"comma-separated, of {sorted(PARTS) + ['frontend']}",
    )
    parser.add_argument(
        "--step-ms", type=float, default=1.4, help="the stand-in engine's step (frontend part)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="serve_cpu", help="file stem of the results")
    parser.add_argument("--render", type=Path, help="only rewrite the markdown of an existing results JSON")
    parser.add_argument(
        "--ab",
        type=Path,
        nargs="*",
        default=[],
        help="results JSONs of alternate before/after runs of the micro part (named by file stem)",
    )
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        if args.ab:
            result["ab"] = ab_runs(args.ab)
            args.render.write_text(json.dumps(result, indent=2, default=str) + "\n")
        (args.out / f"{args.name}.md").write_text(markdown(result))
        return
    load_before = os.getloadavg()
    parts, frontend = {}, None
    with tempfile.TemporaryDirectory(prefix="kiln-serve-cpu-") as tmp:
        for name in args.parts.split(","):
            if name == "frontend":
                frontend = frontend_part(Path(tmp) / name, args.step_ms)
                print(f"frontend: {json.dumps(frontend['rows'])}", flush=True)
                continue
            part = PARTS[name]
            work = Path(tmp) / name
            engine_dir = part["compile"](work / "engine")
            dataset = write_dataset(
                work / "prompts.jsonl", 64, part["input_len"], part["vocab"], part["output_len"]
            )
            sweep = [
                "-c",
                part["concurrency"],
                "--dataset",
                str(dataset),
                "--requests",
                str(part["requests"]),
            ]
            env = {**os.environ, **part["env"]}
            run = compare(engine_dir, sweep, env, work)
            run["description"] = (part["compile"].__doc__ or name).split("\n")[0].strip()
            run["settings"] = {
                k: part[k] for k in ("concurrency", "input_len", "output_len", "requests", "env")
            }
            parts[name] = run
            print(f"{name}: {json.dumps(run['overhead'])} server cpu {run['server_cpu']}", flush=True)
    result = {
        "command": " ".join([".venv/bin/python bench/serve_cpu.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average": load_before,
        "load_average_after": os.getloadavg(),
        "parts": parts,
        "frontend": frontend,
        "ab": ab_runs(args.ab),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
