"""``kiln serve`` end to end: a real server subprocess on 127.0.0.1, the real ``openai`` client and raw HTTP.

Most tests run a small random Llama (4 layers, SmolLM2's real tokenizer and chat template, ~10 ms a decode
step on CPU, so slots stay busy long enough to test queueing, disconnects and draining); the ``smollm2`` ones
run the real SmolLM2-135M-Instruct engine (its 32-client test is ``slow``: minutes on a loaded 2-core host).
Helpers here (``tiny_engine``, ``KilnServer``) are reused by
tests/test_bench.py and tests/test_pyfunc.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from kiln.cli import app
from kiln.engine.base import GenerationRequest, SamplingParams
from kiln.engine.torch import TorchBackend
from kiln.profiles import Target
from tests.fixtures.models import make_tiny_llama
from tests.fixtures.servers import ServerProcess, free_port, start_server

API_KEY = "kiln-test-key-5f1e0c9a7b"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "My favourite colour is",
    "In 1492,",
    "The quick brown fox",
    "Hello, my name is",
]
runner = CliRunner()


def tiny_engine(
    root: Path, smollm2_dir: Path, *, max_batch_size: int = 8, max_input_len: int = 64, max_seq_len: int = 512
) -> Path:
    """A 4-layer random Llama with SmolLM2's vocabulary, tokenizer and chat template, compiled for CPU."""
    hf = make_tiny_llama(
        root / "hf", vocab=49152, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512
    )
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy2(smollm2_dir / name, hf / name)
    target = Target(
        name="cpu-tiny",
        dtype="float32",
        limits={"max_batch_size": max_batch_size, "max_input_len": max_input_len, "max_seq_len": max_seq_len},
    )
    return TorchBackend().compile(hf, target, root / "engine", {"tokenizer_dir": str(hf)})


@dataclass
class KilnServer:
    """A ``kiln serve`` subprocess (own process group) and how to reach it."""

    url: str
    process: ServerProcess
    model: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0, timeout=120, **kwargs
        )

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=30).text

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (all label sets) in one scrape."""
        pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
        return sum(float(value) for _, value in pattern.findall(self.metrics()))

    def log(self) -> str:
        return self.process.log_tail(10**7)


def start_kiln_serve(
    what: str | Path,
    log_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    api_key: str | None = None,
    model: str | None = None,
) -> KilnServer:
    """Start ``kiln serve WHAT`` on a free port of 127.0.0.1 and wait (bounded) for /health."""
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "from kiln.cli import app; app()",
        "serve",
        str(what),
        "--port",
        str(port),
        *args,
    ]
    full_env = {**os.environ, **(env or {})}
    if api_key:
        full_env["KILN_API_KEY"] = api_key
    log_dir.mkdir(parents=True, exist_ok=True)
    process = start_server(
        "kiln serve",
        cmd,
        env=full_env,
        log_path=log_dir / f"serve-{port}.log",
        ready_url=f"http://127.0.0.1:{port}/health",
        timeout_s=180,
    )
    return KilnServer(f"http://127.0.0.1:{port}", process, model or Path(str(what)).name, api_key)


def greedy_alone(engine, codec, prompt_ids: list[int], max_tokens: int) -> str:
    """What one request alone on the engine generates (greedy, stops at EOS), as text."""
    result = engine.generate(
        [
            GenerationRequest(
                prompt_ids, SamplingParams(max_new_tokens=max_tokens, stop_token_ids=codec.eos_token_ids)
            )
        ]
    )[0]
    return codec.decode(result.token_ids)


def sse_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


# --- the scheduler the server runs (in process) -------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return tiny_engine(tmp_path_factory.mktemp("serve-tiny"), smollm2_dir)


@pytest.fixture(scope="module")
def engine(engine_dir: Path):
    return TorchBackend().load(engine_dir)


@pytest.fixture(scope="module")
def codec(engine_dir: Path):
    from kiln.serve.text import TextCodec

    return TextCodec(engine_dir)


@pytest.fixture
def one_thread():
    """Tiny CPU steps in this process on one thread: on a shared 2-core host OpenMP's second (spinning) thread
    makes them ~10x slower, and these tests are about scheduling, not intra-op parallelism."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_scheduler_requests_joining_and_leaving_a_running_batch_get_their_single_request_tokens(
    engine, one_thread
) -> None:
    """Requests added between steps join the running batch; a cancelled one frees its slot; each output
    equals what the request generates alone (greedy and seeded sampling)."""
    prompts = [[5 + i, 17, 300 + 7 * i, 42][: 2 + i % 3] for i in range(6)]
    sampling = [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=7, temperature=0.8, seed=3),
        SamplingParams(max_new_tokens=20),
        SamplingParams(max_new_tokens=5),
        SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, seed=9),
        SamplingParams(max_new_tokens=15),
    ]
    alone = [
        engine.generate([GenerationRequest(p, s)])[0].token_ids
        for p, s in zip(prompts, sampling, strict=True)
    ]
    scheduler = engine.scheduler(concurrency=3)
    tokens: dict[int, list[int]] = {}
    finished: dict[int, list[int]] = {}
    scheduler.add(GenerationRequest(prompts[0], sampling[0]), 0)
    scheduler.add(GenerationRequest(prompts[1], sampling[1]), 1)
    victim = scheduler.add(GenerationRequest([7, 8, 9], SamplingParams(max_new_tokens=400)), "victim")
    batch_sizes, step = [], 0
    while scheduler.has_work:
        if step == 3:  # mid-run: more requests arrive, one is cancelled (its slot goes to a waiting one)
            for i in range(2, 6):
                scheduler.add(GenerationRequest(prompts[i], sampling[i]), i)
            assert scheduler.num_waiting == 4 and scheduler.num_running == 3
            assert scheduler.cancel(victim) and not scheduler.cancel(victim)
        events = scheduler.step()
        batch_sizes.append(len({e.request_id for e in events}))  # requests served by this step
        for event in events:
            tokens.setdefault(event.request_id, []).append(event.token_id)
            if event.result is not None:
                finished[event.request_id] = event.result.token_ids
        step += 1
    assert [finished[i] for i in range(6)] == alone
    assert all(tokens[i] == alone[i] for i in range(6))
    assert victim not in finished and len(tokens[victim]) < 10
    assert max(batch_sizes) == 3  # the concurrency bound held while several ran at once


def test_text_stream_pieces_add_up_to_the_full_decode_and_stop_strings_are_cut(codec) -> None:
    """Token by token: multi-byte characters are held until complete, a stop string spanning tokens ends the
    text before it, and the pieces always add up to the one-shot decode."""
    text = "Héllo 😀 wörld, naïve café — stop here please; then more text"
    ids = codec.encode_prompt(text)
    stream = codec.stream()
    pieces = [stream.push(t) for t in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == codec.decode(ids) == stream.final_text
    assert all("\ufffd" not in piece for piece in pieces)
    stopping = codec.stream(stop=["stop here", "never"])
    sent = ""
    for token in ids:
        sent += stopping.push(token)
        if stopping.stopped:
            break
    sent += stopping.finish()
    assert stopping.stopped and sent == stopping.final_text == text[: text.index("stop here")]
    ended = codec.stream(stop_token_ids=[ids[3]])  # a stop token's own text is left out
    assert "".join([*(ended.push(t) for t in ids[:4]), ended.finish()]) == codec.decode(ids[:3])


def test_rust_decode_stream_sends_the_same_pieces_as_the_windowed_decode(codec) -> None:
    """The per-token path (tokenizers' DecodeStream) and the windowed decode it replaces stream the same
    pieces, random ids and special tokens included."""
    import random

    from kiln.serve.text import TextCodec

    assert codec._decode_stream is not None  # SmolLM2's fast tokenizer takes the Rust path
    windowed = TextCodec.__new__(TextCodec)
    windowed.__dict__.update(codec.__dict__, _decode_stream=None, _backend=None)
    rng = random.Random(0)
    ids = codec.encode_prompt("Héllo 😀 wörld, naïve café") + [
        rng.randrange(len(codec.tokenizer)) for _ in range(300)
    ]
    fast, slow = codec.stream(), windowed.stream()
    assert [fast.push(t) for t in ids] + [fast.finish()] == [slow.push(t) for t in ids] + [slow.finish()]


def test_tokenizer_thread_encodes_what_queued_meanwhile_as_one_batch(codec, monkeypatch) -> None:
    """Text queued while the tokenizer thread works comes back to the loop in one callback (one submit
    write, one prefill), each request with its own ids or its own error."""
    import asyncio

    from kiln.serve import app as serve_app

    settled: list[int] = []
    real_settle = serve_app._settle
    monkeypatch.setattr(serve_app, "_settle", lambda done: (settled.append(len(done)), real_settle(done)))
    gate = threading.Event()
    texts = [f"{PROMPTS[i % len(PROMPTS)]} " + "-" * 300 + f" #{i}" for i in range(12)]

    def first(text: str) -> list[int]:  # holds the thread until the other eleven are queued
        gate.wait(30)
        return codec.encode_prompt(text)

    def refuse(_text: str) -> list[int]:
        raise ValueError("no chat template")

    async def burst() -> list:
        thread = serve_app.TokenizerThread()
        try:
            head = asyncio.ensure_future(thread.encode(first, texts[0]))
            await asyncio.sleep(0.05)  # the thread took it and waits
            rest = [asyncio.ensure_future(thread.encode(codec.encode_prompt, t)) for t in texts[1:]]
            bad = asyncio.ensure_future(thread.encode(refuse, "x"))
            await asyncio.sleep(0)
            gate.set()
            return await asyncio.gather(head, *rest, bad, return_exceptions=True)
        finally:
            thread.close()

    *ids, error = asyncio.run(burst())
    assert ids == [codec.encode_prompt(t) for t in texts]
    assert isinstance(error, ValueError) and "no chat template" in str(error)
    assert settled == [1, 12]


def test_frames_between_the_http_and_engine_processes_survive_any_split() -> None:
    from kiln.serve.wire import FrameReader, Steps, json_frame, steps_frame

    steps = Steps(3, 1, 700, [4, 9, 4], [17, 2, 99], [0.25, 0.5, 0.75], bytes([0, 2, 1]), [2, 1])
    data = (
        json_frame({"admitted": [[4, None], [5, "too long"]]})
        + steps_frame(steps)
        + json_frame({"stop": True})
    )
    for size in (1, 3, 7, len(data)):
        reader, frames = FrameReader(), []
        for at in range(0, len(data), size):
            frames += reader.feed(data[at : at + size])
        assert frames[0] == {"admitted": [[4, None], [5, "too long"]]} and frames[2] == {"stop": True}
        got = frames[1]
        assert (
            got.running,
            got.waiting,
            got.cached_tokens,
            list(got.request_ids),
            list(got.token_ids),
            list(got.times_s),
            got.finish,
            list(got.batch_sizes),
        ) == (3, 1, 700, [4, 9, 4], [17, 2, 99], [0.25, 0.5, 0.75], bytes([0, 2, 1]), [2, 1])


def _prefill_waves(engine, batch_wait_s: float, arriving: int, late_s: float) -> list[int]:
    """Requests per prefill when the engine process's loop (``kiln.serve.worker.serve``, on a thread over a
    socket pair) gets one add saying ``arriving`` more are coming, then the rest ``late_s`` later."""
    import socket

    from kiln.serve.wire import FrameReader, json_frame
    from kiln.serve.worker import serve

    ours, theirs = socket.socketpair()
    worker = threading.Thread(target=serve, args=(engine, theirs), daemon=True)
    worker.start()

    def add(i: int, coming: int) -> bytes:
        sampling = {"max_new_tokens": 2}
        now = time.perf_counter()
        item = {"id": i, "prompt": [5, 6 + i], "sampling": sampling, "arrived": now, "sent": now}
        return json_frame({"add": {**item, "arriving": coming}})

    ours.sendall(json_frame({"settings": {"batch_wait_s": batch_wait_s}}) + add(0, arriving))
    time.sleep(late_s)
    ours.sendall(b"".join(add(i, arriving - i) for i in range(1, arriving + 1)))
    reader, waves, finished = FrameReader(), [], 0
    ours.settimeout(60)
    while finished < arriving + 1:
        for frame in reader.feed(ours.recv(1 << 16)):
            if isinstance(frame, dict) and "prefilled" in frame:
                waves.append(len(frame["prefilled"]))
            elif not isinstance(frame, dict):
                finished += sum(1 for f in frame.finish if f)
    ours.sendall(json_frame({"stop": True}))
    worker.join(30)
    ours.close()
    return waves


def test_idle_engine_waits_for_requests_still_arriving_so_a_burst_is_one_prefill(engine, one_thread) -> None:
    """An add that says more requests reached the server makes an idle engine wait for them (bounded by
    --batch-wait-ms): one prefill of the burst instead of a first small one that the rest queue behind;
    with nothing said to be coming, or a wait of 0, the first request is prefilled at once."""
    assert _prefill_waves(engine, batch_wait_s=5.0, arriving=3, late_s=0.3) == [4]
    assert _prefill_waves(engine, batch_wait_s=0.0, arriving=3, late_s=0.3) == [1, 3]
    assert _prefill_waves(engine, batch_wait_s=5.0, arriving=0, late_s=0.0) == [1]
    # the wait is bounded: what is said to be coming but never comes delays the first by batch_wait_s
    t0 = time.perf_counter()
    assert _prefill_waves(engine, batch_wait_s=0.2, arriving=3, late_s=1.0) == [1, 3]
    assert time.perf_counter() - t0 < 5


# --- one shared server: API key, default queue --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_kiln_serve(
        engine_dir,
        tmp_path_factory.mktemp("serve-logs"),
        "--max-waiting",
        "32",
        "--max-body-bytes",
        "65536",
        api_key=API_KEY,
    )
    try:
        yield srv
    finally:
        srv.process.stop(grace_s=30)


def test_openai_client_completions_and_chat_equal_kiln_generate(
    server: KilnServer, engine_dir: Path, codec
) -> None:
    """Greedy completions and chat, streamed and not, through the real openai client: the text `kiln generate`
    prints, one SSE chunk per token, usage in every response."""
    client = server.client()
    from kiln.serve.app import THREAD_CHARS

    long_prompt = "Once upon a time " + "-" * THREAD_CHARS  # tokenized on the server's tokenizer thread
    for prompt in [*PROMPTS[:3], long_prompt]:
        generated = runner.invoke(
            app, ["generate", str(engine_dir), "--prompt", prompt, "--max-new-tokens", "12", "--json"]
        )
        assert generated.exit_code == 0, generated.output
        expected = json.loads(generated.stdout.splitlines()[-1])
        plain = client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0)
        assert plain.choices[0].text == expected["text"]
        assert plain.choices[0].finish_reason == expected["finish_reason"]
        assert plain.usage.completion_tokens == len(expected["token_ids"])
        assert plain.usage.prompt_tokens == len(codec.encode_prompt(prompt))
        chunks = list(
            client.completions.create(
                model=server.model, prompt=prompt, max_tokens=12, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in chunks) == expected["text"]
        assert len(chunks) == len(expected["token_ids"])  # one chunk per token
        assert chunks[-1].usage.completion_tokens == len(expected["token_ids"])

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    templated = codec.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    generated = runner.invoke(
        app, ["generate", str(engine_dir), "--prompt", templated, "--max-new-tokens", "10", "--json"]
    )
    expected = json.loads(generated.stdout.splitlines()[-1])
    chat = client.chat.completions.create(model=server.model, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == expected["text"] and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(codec.encode_chat(messages))
    stream = list(
        client.chat.completions.create(
            model=server.model,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected["text"]
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == len(expected["token_ids"])
    assert len([c for c in stream if c.choices]) == 1 + len(
        expected["token_ids"]
    )  # role chunk + one per token
    long_messages = [{"role": "user", "content": long_prompt}]
    long_chat = client.chat.completions.create(
        model=server.model, messages=long_messages, max_tokens=2, temperature=0
    )
    assert long_chat.usage.prompt_tokens == len(codec.encode_chat(long_messages))


def test_sampling_fields_stop_strings_and_stop_token_ids(
    server: KilnServer, engine, codec, one_thread
) -> None:
    client = server.client()
    prompt = PROMPTS[1]
    ids = codec.encode_prompt(prompt)
    full = engine.generate([GenerationRequest(ids, SamplingParams(max_new_tokens=16))])[0].token_ids
    text = codec.decode(full)
    # a stop string: the text up to it (excluded), finish_reason stop, the same streamed
    words = text.split(" ")
    stop = " " + words[3]
    cut = text[: text.index(stop)]
    plain = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=16, temperature=0, stop=[stop]
    )
    assert (plain.choices[0].text, plain.choices[0].finish_reason) == (cut, "stop")
    streamed = list(
        client.completions.create(
            model=server.model, prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True
        )
    )
    assert (
        "".join(c.choices[0].text for c in streamed) == cut
        and streamed[-1].choices[0].finish_reason == "stop"
    )
    # a stop token id (vLLM's extension): generation ends on it, its text is left out
    stop_id = full[5]
    first = full.index(stop_id)
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "stop_token_ids": [stop_id],
    }
    answer = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=60).json()
    assert answer["choices"][0]["text"] == codec.decode(full[:first])
    assert (
        answer["usage"]["completion_tokens"] == first + 1 and answer["choices"][0]["finish_reason"] == "stop"
    )
    # seeded sampling is reproducible and differs from greedy; top_k=1 is greedy
    seeded = [
        client.completions.create(
            model=server.model, prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.95, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1] != text
    top1 = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=16, temperature=1.5, seed=1, extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == text
    # a prompt of token ids and a batch of prompts (one choice each)
    batch = client.completions.create(
        model=server.model, prompt=[ids, codec.encode_prompt(PROMPTS[2])], max_tokens=4, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == codec.decode(full[:4])
    assert batch.usage.prompt_tokens == len(ids) + len(codec.encode_prompt(PROMPTS[2]))


def test_32_concurrent_streaming_clients_get_their_own_outputs_from_one_batch(server: KilnServer) -> None:
    """32 clients at once (max_batch_size 8, the rest queue): each stream equals that prompt's single-request
    greedy output (the same prompt sent alone before), and the engine served them in shared steps."""
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in range(32)]
    alone_client = server.client()
    expected = [
        alone_client.completions.create(model=server.model, prompt=p, max_tokens=16, temperature=0)
        .choices[0]
        .text
        for p in prompts
    ]
    steps_before = server.metric("kiln_batch_size_count")
    small_before = server.metric('kiln_batch_size_bucket{le="1.0"}')
    stages = ("submit", "wire", "queue", "prefill")
    stages_before = {s: server.metric(f"kiln_request_{s}_time_seconds_count") for s in stages}
    prefills_before = server.metric("kiln_prefill_batch_size_count")
    prefilled_before = server.metric("kiln_prefill_batch_size_sum")
    running_seen: list[float] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            running_seen.append(server.metric("kiln_num_requests_running"))
            time.sleep(0.05)

    def one(prompt: str) -> str:
        client = server.client()
        stream = client.completions.create(
            model=server.model, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        return "".join(chunk.choices[0].text for chunk in stream)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    with ThreadPoolExecutor(max_workers=32) as pool:
        outputs = list(pool.map(one, prompts))
    done.set()
    scraper.join()
    assert outputs == expected
    steps = server.metric("kiln_batch_size_count") - steps_before
    single = server.metric('kiln_batch_size_bucket{le="1.0"}') - small_before
    assert steps > 0 and single < steps / 2, "most engine steps should serve more than one request"
    assert max(running_seen) > 1
    # every request's time before its first token, stage by stage, and the prefills that admitted them:
    # 8 slots take at least 4 prefills for 32 requests, and the 24 queued ones waited for a slot
    for stage in stages:
        assert server.metric(f"kiln_request_{stage}_time_seconds_count") - stages_before[stage] == 32, stage
    assert server.metric("kiln_prefill_batch_size_sum") - prefilled_before == 32
    assert 4 <= server.metric("kiln_prefill_batch_size_count") - prefills_before < 32
    assert server.metric('kiln_request_queue_time_seconds_bucket{le="+Inf"}') > server.metric(
        'kiln_request_queue_time_seconds_bucket{le="0.005"}'
    ), "requests that waited for a slot queued for longer than a step"


def test_request_over_the_engine_limits_gets_400_naming_the_limit(server: KilnServer) -> None:
    client = server.client()
    long_prompt = " ".join(["word"] * 80)  # > max_input_len 64 tokens
    with pytest.raises(openai.BadRequestError, match="exceeds max_input_len 64"):
        client.completions.create(model=server.model, prompt=long_prompt, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="exceeds max_seq_len 512"):
        client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=600)
    with pytest.raises(openai.BadRequestError, match="exceeds max_input_len 64"):
        client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": long_prompt}]
        )
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model=server.model, prompt="hi", n=2)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="hi")
    bad = httpx.post(
        f"{server.url}/v1/completions",
        content=b"{not json",
        headers={**server.headers, "content-type": "application/json"},
        timeout=30,
    )
    assert bad.status_code == 400 and "error" in bad.json()


def test_body_over_the_size_limit_gets_413(server: KilnServer) -> None:
    body = json.dumps({"model": server.model, "prompt": "x" * 70_000, "max_tokens": 1}).encode()
    response = httpx.post(
        f"{server.url}/v1/completions",
        content=body,
        timeout=30,
        headers={**server.headers, "content-type": "application/json"},
    )
    assert response.status_code == 413 and "65536 bytes" in response.json()["error"]["message"]


def test_api_key_is_required_everywhere_but_health_and_never_logged(server: KilnServer) -> None:
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 401
    wrong = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "hi"},
        timeout=30,
        headers={"Authorization": "Bearer not-the-key"},
    )
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in server.client().models.list()] == [server.model]
    assert server.metric('kiln_requests_rejected_total{reason="unauthorized"}') >= 3
    assert API_KEY not in server.log() and "not-the-key" not in server.log()
    assert "Once upon a time" not in server.log()  # prompts are not logged unless --log-requests


def test_client_killed_mid_stream_frees_its_slot(server: KilnServer, tmp_path: Path) -> None:
    cancelled = server.metric('kiln_requests_finished_total{reason="cancelled"}')
    tokens_before = server.metric("kiln_generation_tokens_total")
    script = tmp_path / "client.py"
    script.write_text(
        "import httpx, sys\n"
        "body = {'prompt': 'Tell me a long story', 'max_tokens': 450, 'temperature': 0, 'stream': True}\n"
        f"with httpx.stream('POST', '{server.url}/v1/completions', json=body, timeout=60,\n"
        f"                  headers={{'Authorization': 'Bearer {API_KEY}'}}) as r:\n"
        "    for line in r.iter_lines():\n"
        "        print(line, flush=True)\n"
    )
    client = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        seen = 0
        while seen < 3:  # a few tokens arrived: the request holds a slot
            if client.stdout.readline().startswith("data: "):
                seen += 1
        client.kill()
        client.wait(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (
            server.metric('kiln_requests_finished_total{reason="cancelled"}') > cancelled
            and server.metric("kiln_num_requests_running") == 0
        ):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the killed client's request still runs:\n{server.metrics()}")
    assert server.metric("kiln_generation_tokens_total") - tokens_before < 450  # stopped early, not finished
    # and the slot serves the next request
    assert (
        server.client()
        .completions.create(model=server.model, prompt="Hi", max_tokens=3)
        .usage.completion_tokens
    )


# --- servers of their own: a tiny queue, draining, registry references --------------------------------------


def _stream_async(url: str, body: dict, results: list, index: int, headers: dict | None = None) -> None:
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, timeout=120, headers=headers or {}
    ) as response:
        results[index] = (
            response.status_code,
            sse_events(response) if response.status_code == 200 else json.loads(response.read()),
        )


def _wait_for(predicate, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_full_queue_gets_429_with_retry_after_and_never_hangs(engine_dir: Path, tmp_path: Path) -> None:
    srv = start_kiln_serve(engine_dir, tmp_path, "--max-waiting", "1")  # 8 slots + 1 waiting
    try:
        body = {"prompt": "Tell me a long story", "max_tokens": 150, "temperature": 0, "stream": True}
        results: list = [None] * 9
        threads = [threading.Thread(target=_stream_async, args=(srv.url, body, results, i)) for i in range(9)]
        for t in threads:
            t.start()
        _wait_for(
            lambda: (
                srv.metric("kiln_num_requests_running") == 8 and srv.metric("kiln_num_requests_waiting") == 1
            ),
            what="8 running + 1 waiting",
        )
        started = time.monotonic()
        refused = httpx.post(
            f"{srv.url}/v1/completions", json={"prompt": "one more", "max_tokens": 2}, timeout=30
        )
        assert time.monotonic() - started < 5
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "waiting" in refused.json()["error"]["message"]
        for t in threads:
            t.join(timeout=120)
        assert all(
            status == 200 and events[-1]["choices"][0]["finish_reason"] == "length"
            for status, events in results
        )
        assert srv.metric('kiln_requests_rejected_total{reason="queue_full"}') == 1
    finally:
        srv.process.stop(grace_s=30)


def test_sigterm_drains_admitted_requests_and_refuses_new_ones(engine_dir: Path, tmp_path: Path) -> None:
    # a drain bound far above the run's length: the default 30 s aborted requests on a loaded 2-core host
    srv = start_kiln_serve(engine_dir, tmp_path, "--max-waiting", "8", "--drain-timeout", "300")
    body = {"prompt": "Count with me", "max_tokens": 200, "temperature": 0, "stream": True}
    results: list = [None] * 12  # 8 run, 4 wait for a slot
    threads = [threading.Thread(target=_stream_async, args=(srv.url, body, results, i)) for i in range(12)]
    try:
        for t in threads:
            t.start()
        _wait_for(
            lambda: (
                srv.metric("kiln_num_requests_running") == 8 and srv.metric("kiln_num_requests_waiting") == 4
            ),
            what="8 running + 4 waiting",
        )
        os.killpg(srv.process.proc.pid, signal.SIGTERM)
        _wait_for(lambda: httpx.get(f"{srv.url}/health", timeout=10).status_code == 503, what="draining")
        refused = httpx.post(
            f"{srv.url}/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=30
        )
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        for t in threads:
            t.join(timeout=120)
        assert srv.process.proc.wait(timeout=60) == 0
    finally:
        srv.process.stop(grace_s=5)
    for status, events in results:  # every admitted request finished, none lost or cut
        assert status == 200
        assert (
            sum(1 for e in events if e["choices"]) == 200
            and events[-1]["choices"][0]["finish_reason"] == "length"
        )
    assert "drained: every admitted request finished" in srv.log()


def test_drain_is_bounded_by_the_drain_timeout(engine_dir: Path, tmp_path: Path) -> None:
    """Requests still running when --drain-timeout passes are ended with an error event; the server exits."""
    srv = start_kiln_serve(engine_dir, tmp_path, "--drain-timeout", "0.2")
    body = {"prompt": "Go on forever", "max_tokens": 440, "temperature": 0, "stream": True}
    results: list = [None] * 2
    threads = [threading.Thread(target=_stream_async, args=(srv.url, body, results, i)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        _wait_for(lambda: srv.metric("kiln_num_requests_running") == 2, what="2 running")
        signalled = time.monotonic()
        os.killpg(srv.process.proc.pid, signal.SIGTERM)
        assert srv.process.proc.wait(timeout=60) == 0
        for t in threads:
            t.join(timeout=60)
        assert time.monotonic() - signalled < 15
    finally:
        srv.process.stop(grace_s=5)
    for status, events in results:
        assert status == 200 and "drain timeout" in events[-1]["error"]["message"]
        assert sum(1 for e in events if e.get("choices")) < 440
    assert "drain timeout (0.2 s): aborting 2 request(s)" in srv.log()


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def test_engine_process_dying_fails_requests_in_flight_and_health(engine_dir: Path, tmp_path: Path) -> None:
    """The engine runs in a process of its own: when it dies, streams in flight end with an error event, new
    requests and /health get 503 naming it, and the server does not hang."""
    srv = start_kiln_serve(engine_dir, tmp_path)
    try:
        (engine_pid,) = _children(srv.process.proc.pid)
        body = {"prompt": "Tell me a long story", "max_tokens": 400, "temperature": 0, "stream": True}
        results: list = [None]
        thread = threading.Thread(target=_stream_async, args=(srv.url, body, results, 0))
        thread.start()
        _wait_for(lambda: srv.metric("kiln_num_requests_running") == 1, what="1 running")
        os.kill(engine_pid, signal.SIGKILL)
        thread.join(timeout=60)
        status, events = results[0]
        assert status == 200 and "engine process exited" in events[-1]["error"]["message"]
        health = httpx.get(f"{srv.url}/health", timeout=10)
        assert health.status_code == 503 and "engine process exited" in health.json()["error"]
        refused = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and "restart" in refused.json()["error"]["message"]
    finally:
        srv.process.stop(grace_s=10)


def test_serve_a_registry_reference_fetches_verifies_and_refuses_another_gpu(
    engine_dir: Path, kiln_home: Path, tmp_path: Path, codec, engine, one_thread
) -> None:
    """`kiln serve NAME@production --target cpu` fetches (every sha256 checked) into KILN_HOME and serves it;
    a version built for a GPU this machine lacks is refused before anything is downloaded."""
    from kiln.profiles import Registry
    from kiln.registry import promote, publish

    registry = Registry(model_name="tiny")
    lineage = {"recipe": "none", "target": "cpu", "model_sha": "f" * 40}
    publish(
        engine_dir,
        registry=registry,
        build_key="a" * 64,
        lineage=lineage,
        metrics={"perplexity": 1.0},
        params={},
        artifacts=[],
        passed_gates=True,
        recommended=True,
    )
    promote("tiny", "candidate", "cpu")
    gpu_engine = tmp_path / "gpu-engine"
    gpu_engine.mkdir()
    (gpu_engine / "rank0.safetensors").write_bytes(b"0" * 100)
    (gpu_engine / "kiln-engine.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "backend": "torch",
                "target": "h100",
                "device": "cuda",
                "sm": "sm90",
                "gpu": "h100",
                "dtype": "bfloat16",
                "limits": {},
                "toolchain": {"torch": "2.13.0"},
                "program": {"compile": "inductor", "cuda_graphs": True},
                "model": {},
                "layout": [],
            }
        )
    )
    publish(
        gpu_engine,
        registry=registry,
        build_key="b" * 64,
        lineage={**lineage, "target": "h100"},
        metrics={},
        params={},
        artifacts=[],
        passed_gates=True,
        recommended=False,
    )
    refused = runner.invoke(app, ["serve", "tiny@v1", "--target", "h100"])
    assert refused.exit_code != 0 and "built for sm90" in " ".join(refused.output.split())
    assert not (kiln_home / "serving" / "tiny.h100").exists() or not any(
        (kiln_home / "serving" / "tiny.h100").iterdir()
    )

    srv = start_kiln_serve(
        "tiny@production",
        tmp_path / "logs",
        "--target",
        "cpu",
        model="tiny.cpu",
        env={"KILN_HOME": str(kiln_home)},
    )
    try:
        answer = srv.client().completions.create(
            model="tiny.cpu", prompt=PROMPTS[0], max_tokens=6, temperature=0
        )
        assert answer.choices[0].text == greedy_alone(engine, codec, codec.encode_prompt(PROMPTS[0]), 6)
        assert "tiny.cpu@production (v1)" in httpx.get(f"{srv.url}/v1/models").json()["data"][0]["root"]
    finally:
        srv.process.stop(grace_s=30)
    served = next((kiln_home / "serving" / "tiny.cpu").iterdir())
    assert served.name.startswith("v1-") and (served / "kiln-manifest.json").is_file()
    # a second start reuses the verified copy; a tampered copy is refused when the engine loads
    weights = served / "rank0.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    tampered = runner.invoke(app, ["serve", "tiny@production", "--target", "cpu", "--port", str(free_port())])
    assert tampered.exit_code != 0 and "does not match its sha256" in " ".join(tampered.output.split())


def test_tensorrt_llm_engine_dir_prints_the_trtllm_serve_command_where_it_cannot_run(tmp_path: Path) -> None:
    artifact = tmp_path / "trt-hf"
    artifact.mkdir()
    (artifact / "llm_api_options.yaml").write_text("kv_cache_config: {free_gpu_memory_fraction: 0.9}\n")
    (artifact / "kiln-engine.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "backend": "tensorrt_llm",
                "artifact": "hf_checkpoint",
                "target": "h100-trtllm",
                "device": "cuda",
                "sm": "sm90",
                "gpu": "h100",
                "dtype": "bfloat16",
                "toolchain": {"tensorrt_llm": "1.3.0"},
                "limits": {"max_batch_size": 8},
                "contract": {"series": "1.3", "source": "tensorrt_llm-1.3.json"},
                "llm_api": {
                    "class": "tensorrt_llm:LLM",
                    "settings": {},
                    "options_file": "llm_api_options.yaml",
                },
            }
        )
    )
    result = runner.invoke(app, ["serve", str(artifact), "--port", "8123"])
    assert result.exit_code != 0
    assert (
        f"trtllm-serve {artifact} --backend pytorch "
        f"--extra_llm_api_options {artifact / 'llm_api_options.yaml'} "
        "--host 127.0.0.1 --port 8123"
    ) in result.stdout.splitlines()
    flat = " ".join(result.output.split())
    assert (
        "tensorrt_llm" in flat and "cannot be served here" in flat and "run the trtllm-serve command" in flat
    )
    keyed = runner.invoke(app, ["serve", str(artifact), "--api-key", "secret-1"])
    assert keyed.exit_code == 2 and "no API key option" in " ".join(keyed.output.split())


# --- the real model -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_engine(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    target = Target(
        name="cpu", dtype="float32", limits={"max_batch_size": 32, "max_input_len": 256, "max_seq_len": 512}
    )
    return TorchBackend().compile(
        smollm2_dir,
        target,
        tmp_path_factory.mktemp("smollm2") / "engine",
        {"tokenizer_dir": str(smollm2_dir)},
    )


@pytest.fixture(scope="module")
def smollm2_server(smollm2_engine: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_kiln_serve(
        smollm2_engine, tmp_path_factory.mktemp("smollm2-logs"), "--served-model-name", "smollm2"
    )
    srv.model = "smollm2"
    try:
        yield srv
    finally:
        srv.process.stop(grace_s=60)


def test_smollm2_openai_completions_and_chat_equal_kiln_generate(
    smollm2_server: KilnServer, smollm2_engine: Path
) -> None:
    from kiln.serve.text import TextCodec

    codec = TextCodec(smollm2_engine)
    client = smollm2_server.client()
    prompt = "The capital of France is"
    generated = runner.invoke(
        app, ["generate", str(smollm2_engine), "--prompt", prompt, "--max-new-tokens", "12", "--json"]
    )
    expected = json.loads(generated.stdout.splitlines()[-1])
    assert "Paris" in expected["text"]
    plain = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
    streamed = list(
        client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    )
    assert plain.choices[0].text == expected["text"] == "".join(c.choices[0].text for c in streamed)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    templated = codec.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    generated = runner.invoke(
        app, ["generate", str(smollm2_engine), "--prompt", templated, "--max-new-tokens", "16", "--json"]
    )
    expected = json.loads(generated.stdout.splitlines()[-1])
    chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=16, temperature=0, stream=True
        )
    )
    assert chat.choices[0].message.content == expected["text"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert "Paris" in expected["text"]


@pytest.mark.slow
def test_smollm2_32_concurrent_streams_each_equal_their_single_request_output(
    smollm2_server: KilnServer, smollm2_engine: Path, one_thread
) -> None:
    from kiln.serve.text import TextCodec

    codec = TextCodec(smollm2_engine)
    engine = TorchBackend().load(smollm2_engine)
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(32)]
    expected = [greedy_alone(engine, codec, codec.encode_prompt(p), 8) for p in prompts]
    engine.close()
    before = smollm2_server.metric("kiln_batch_size_count")
    single_before = smollm2_server.metric('kiln_batch_size_bucket{le="1.0"}')

    def one(prompt: str) -> str:
        stream = smollm2_server.client().completions.create(
            model="smollm2", prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        return "".join(chunk.choices[0].text for chunk in stream)

    with ThreadPoolExecutor(max_workers=32) as pool:
        outputs = list(pool.map(one, prompts))
    assert outputs == expected
    steps = smollm2_server.metric("kiln_batch_size_count") - before
    assert steps > 0 and smollm2_server.metric('kiln_batch_size_bucket{le="1.0"}') - single_before < steps / 2
