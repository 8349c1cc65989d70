"""Rounds of streaming requests against an OpenAI-compatible server (``kiln bench --url``).

Each round sends its prompts at once as ``POST /v1/completions`` with ``stream: true``, greedy, ``ignore_eos``
(vLLM's extension, honoured by kiln serve and vLLM) so every request makes ``max_tokens`` tokens as the
in-process rounds do, and times each streamed chunk from the moment its request was sent: the first is the
TTFT, the gaps are the inter-token latencies (kiln serve sends one chunk per token). Token counts come from
the stream's ``usage`` when the server sends it, else from the chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from kiln.errors import GenerationLimitError, KilnError
from kiln.validation.perf import BenchPrompt, RequestTiming


class BenchRequestError(KilnError):
    """The server refused or broke a benchmark request (status and its message)."""


class OpenAIRounds:
    """A ``RoundFn`` (kiln.validation.perf) over an OpenAI-compatible server's streaming completions."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout_s, connect=30.0)
        self.model = model or self._served_model()

    def _served_model(self) -> str:
        try:
            response = httpx.get(f"{self.base_url}/v1/models", headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise BenchRequestError(f"{self.base_url}: cannot reach the server ({exc})") from None
        if response.status_code != 200:
            raise BenchRequestError(f"{self.base_url}/v1/models: HTTP {response.status_code}: {response.text[:300]}")
        models = response.json().get("data") or []
        if not models:
            raise BenchRequestError(f"{self.base_url}/v1/models lists no model; pass --model")
        return str(models[0]["id"])

    def __call__(self, prompts: list[BenchPrompt]) -> tuple[float, list[RequestTiming]]:
        return asyncio.run(self._round(prompts))

    async def _round(self, prompts: list[BenchPrompt]) -> tuple[float, list[RequestTiming]]:
        limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                     limits=limits) as client:
            start = time.perf_counter()
            timings = await asyncio.gather(*(self._one(client, p) for p in prompts))
            return time.perf_counter() - start, list(timings)

    async def _one(self, client: httpx.AsyncClient, prompt: BenchPrompt) -> RequestTiming:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt.prompt, "max_tokens": prompt.max_tokens,
                                "temperature": 0.0, "stream": True, "ignore_eos": True,
                                "stream_options": {"include_usage": True}}
        times: list[float] = []
        usage: dict[str, Any] | None = None
        sent = time.perf_counter()
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:500]
                error = GenerationLimitError if response.status_code == 400 else BenchRequestError
                raise error(f"{self.base_url}/v1/completions: HTTP {response.status_code}: {text}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BenchRequestError(f"{self.base_url}: stream error: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    if choice.get("text") or choice.get("finish_reason") is None or not times:
                        times.append(time.perf_counter() - sent)
        if not times:
            raise BenchRequestError(f"{self.base_url}: a streamed completion returned no token")
        tokens = int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else len(times)
        prompt_tokens = int(usage["prompt_tokens"]) if usage and "prompt_tokens" in usage else None
        return RequestTiming(tokens, times[0], times, prompt_tokens)
