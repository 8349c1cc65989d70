"""Rounds of streaming requests against an OpenAI-compatible server (``kiln bench --url``).

Each round sends its prompts at once as ``POST /v1/completions`` with ``stream: true``, greedy, ``ignore_eos``
(vLLM's extension, honoured by kiln serve and vLLM) so every request makes ``max_tokens`` tokens as the
in-process rounds do, and times each streamed chunk from the moment its request was sent: the first is the
TTFT, the gaps are the inter-token latencies (kiln serve sends one chunk per token). Token counts come from
the stream's ``usage`` when the server sends it, else from the chunks.

The requests of a round are spread over a few client processes (``python -m kiln.serve.client``, JSON lines
on stdin/stdout; half the cores, at most 8), each with its own event loop and kept-alive connections, all
starting at one agreed instant: parsing one SSE event per token per client is work of its own, and at tens
of thousands of tokens/s one Python process would measure itself rather than the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from kiln.errors import GenerationLimitError, KilnError

if TYPE_CHECKING:  # the client processes import neither torch nor the sweep
    from kiln.validation.perf import BenchPrompt, RequestTiming

_START_DELAY_S = 0.05  # from handing the round to the client processes to its agreed start


class BenchRequestError(KilnError):
    """The server refused or broke a benchmark request (status and its message)."""


class OpenAIRounds:
    """A ``RoundFn`` (kiln.validation.perf) over an OpenAI-compatible server's streaming completions."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        processes: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.processes = processes or max(1, min(8, (os.cpu_count() or 2) // 2))
        self.model = model or self._served_model()
        self._workers: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    def _served_model(self) -> str:
        try:
            response = httpx.get(
                f"{self.base_url}/v1/models", headers=self.headers, timeout=httpx.Timeout(60.0)
            )
        except httpx.HTTPError as exc:
            raise BenchRequestError(f"{self.base_url}: cannot reach the server ({exc})") from None
        if response.status_code != 200:
            raise BenchRequestError(
                f"{self.base_url}/v1/models: HTTP {response.status_code}: {response.text[:300]}"
            )
        models = response.json().get("data") or []
        if not models:
            raise BenchRequestError(f"{self.base_url}/v1/models lists no model; pass --model")
        return str(models[0]["id"])

    def body(self, prompt: BenchPrompt) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": prompt.prompt,
            "max_tokens": prompt.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }

    def __call__(self, prompts: list[BenchPrompt]) -> tuple[float, list[RequestTiming]]:
        from kiln.validation.perf import RequestTiming

        workers = self._started(min(len(prompts), self.processes))
        start_at = time.perf_counter() + _START_DELAY_S
        shares = [list(range(i, len(prompts), len(workers))) for i in range(len(workers))]
        for worker, share in zip(workers, shares, strict=True):
            job = {"start_at": start_at, "bodies": [self.body(prompts[i]) for i in share]}
            worker.stdin.write(json.dumps(job) + "\n")
            worker.stdin.flush()
        timings: list[RequestTiming | None] = [None] * len(prompts)
        ends, errors = [], []
        for worker, share in zip(
            workers, shares, strict=True
        ):  # every answer is read: the next round starts clean
            answer = _answer(worker)
            if "error" in answer:
                errors.append(answer["error"])
                continue
            ends.append(answer["end"])
            for index, (tokens, ttft, times, prompt_tokens) in zip(share, answer["timings"], strict=True):
                timings[index] = RequestTiming(tokens, ttft, times, prompt_tokens)
        if errors:
            error = GenerationLimitError if errors[0]["type"] == "GenerationLimitError" else BenchRequestError
            raise error(errors[0]["message"])
        return max(ends) - start_at, timings  # type: ignore[return-value]

    def close(self) -> None:
        self._finalizer()

    def _started(self, count: int) -> list[subprocess.Popen]:
        import kiln

        kiln_root = str(Path(kiln.__file__).resolve().parents[1])  # the children import this same kiln
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [kiln_root, os.environ.get("PYTHONPATH")])),
        }
        while len(self._workers) < count:
            worker = subprocess.Popen(
                [sys.executable, "-m", "kiln.serve.client"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            # the key on a pipe, never on a command line
            worker.stdin.write(
                json.dumps({"base_url": self.base_url, "api_key": self.api_key, "timeout_s": self.timeout_s})
                + "\n"
            )
            worker.stdin.flush()
            self._workers.append(worker)
        return self._workers[:count]


def _answer(worker: subprocess.Popen) -> dict[str, Any]:
    line = worker.stdout.readline()
    if not line:
        return {
            "error": {
                "type": "BenchRequestError",
                "message": f"a benchmark client process exited with code {worker.wait()}",
            }
        }
    return json.loads(line)


def _stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        try:
            worker.stdin.close()  # end of input: it exits
            worker.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            worker.kill()
    workers.clear()


# -- a client process ---------------------------------------------------------------------------------------


async def _one(client: httpx.AsyncClient, body: dict[str, Any], base_url: str) -> list[Any]:
    times: list[float] = []
    usage: dict[str, Any] | None = None
    sent = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:500]
            error = GenerationLimitError if response.status_code == 400 else BenchRequestError
            raise error(f"{base_url}/v1/completions: HTTP {response.status_code}: {text}")
        pending = b""
        chunks = response.aiter_bytes()
        try:
            async for data in chunks:  # SSE events split here: one bytes split per read, not a line iterator
                arrived = time.perf_counter() - sent
                buffer = pending + data
                if b"\r" in buffer:  # servers may end SSE lines with CRLF
                    buffer = buffer.replace(b"\r\n", b"\n")
                events = buffer.split(b"\n\n")
                pending = events.pop()
                for event in events:
                    if not event.startswith(b"data:"):
                        continue
                    payload = event[5:].strip()
                    if payload == b"[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise BenchRequestError(f"{base_url}: stream error: {chunk['error']}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        if choice.get("text") or choice.get("finish_reason") is None or not times:
                            times.append(arrived)
        finally:
            await chunks.aclose()
    if not times:
        raise BenchRequestError(f"{base_url}: a streamed completion returned no token")
    tokens = int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else len(times)
    prompt_tokens = int(usage["prompt_tokens"]) if usage and "prompt_tokens" in usage else None
    return [tokens, times[0], times, prompt_tokens]


async def _round(clients: list[httpx.AsyncClient], job: dict[str, Any], base_url: str) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, job["start_at"] - time.perf_counter()))
    try:
        requests = zip(clients, job["bodies"], strict=False)  # more clients than bodies after a larger round
        timings = await asyncio.gather(*(_one(client, body, base_url) for client, body in requests))
    except (KilnError, httpx.HTTPError) as exc:
        kind = "GenerationLimitError" if isinstance(exc, GenerationLimitError) else "BenchRequestError"
        message = str(exc) if isinstance(exc, KilnError) else f"{base_url}: {type(exc).__name__}: {exc}"
        return {"error": {"type": kind, "message": message}}
    return {"timings": timings, "end": time.perf_counter()}


def main() -> None:
    """A client process: a config line, then one round per line on stdin, its timings as a line on stdout."""
    config = json.loads(sys.stdin.readline())
    base_url = config["base_url"]
    headers = {"Authorization": f"Bearer {config['api_key']}"} if config.get("api_key") else {}
    loop = asyncio.new_event_loop()
    # one client (one kept-alive connection) per concurrent stream: httpcore's pool does work per event that
    # grows with the connections it holds, which would make the client, not the server, the limit
    clients: list[httpx.AsyncClient] = []
    try:
        for line in sys.stdin:
            job = json.loads(line)
            while len(clients) < len(job["bodies"]):
                clients.append(
                    httpx.AsyncClient(
                        base_url=base_url,
                        headers=headers,
                        timeout=httpx.Timeout(config["timeout_s"], connect=30.0),
                    )
                )
            answer = loop.run_until_complete(_round(clients, job, base_url))
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        for client in clients:
            loop.run_until_complete(client.aclose())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


if __name__ == "__main__":
    main()
