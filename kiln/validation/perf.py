"""Performance of an engine: latency percentiles and throughput over a concurrency sweep, and roofline.

Every level of ``evaluation.concurrency`` submits that many requests at once to ``Engine.generate``
(after a warm-up round of the same shape), with fixed prompt lengths, seeded prompt tokens and greedy
decoding to exactly ``gen_len`` tokens, so two runs of one engine measure the same work. ``sweep`` is the
one measuring code path: validation, ``kiln bench ENGINE_DIR`` and ``kiln bench --url`` (rounds of
streaming HTTP requests against an OpenAI-compatible server) all run it, so their numbers mean the same. On
GPUs the decode step time is compared with the memory-bandwidth roofline: the bytes a step must read (all
weights plus the live KV cache) divided by the step time, as a share of the device's copy bandwidth.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from kiln.constants import ENGINE_MANIFEST
from kiln.engine import manifest as engine_manifest
from kiln.engine.base import Engine, GenerationRequest, SamplingParams
from kiln.errors import GenerationLimitError
from kiln.profiles import Evaluation

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}
_SAFETENSORS_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
EMBEDDING = "transformer.vocab_embedding.weight"  # a decode step reads one row of it, not the table


@dataclass(frozen=True)
class Percentiles:
    """p50/p90/p99 and mean of one latency, in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Percentiles | None:
        if len(values_ms) == 0:
            return None
        p50, p90, p99 = np.percentile(np.asarray(values_ms, dtype=np.float64), [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(np.mean(values_ms)))


@dataclass(frozen=True)
class DecodeCost:
    """Bytes one decode step reads: every weight once, plus each sequence's KV cache so far."""

    weight_bytes: int
    kv_bytes_per_token: int

    def bytes_per_step(self, concurrency: int, context_tokens: float) -> float:
        return self.weight_bytes + concurrency * context_tokens * self.kv_bytes_per_token


@dataclass(frozen=True)
class ConcurrencyResult:
    """One level of the sweep: ``requests`` requests sent ``concurrency`` at a time."""

    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: Percentiles
    itl_ms: Percentiles | None
    """Inter-token latency: gaps between a request's consecutive output tokens (None when gen_len is 1)."""
    decode_bytes_per_step: float | None = None
    roofline_pct: float | None = None


@dataclass(frozen=True)
class PerfResult:
    """The whole sweep for one engine, plus peak memory and the bandwidth figure used for the roofline."""

    device: str
    prompt_len: int
    gen_len: int
    seed: int
    warmup_rounds: int
    points: list[ConcurrencyResult]
    skipped: dict[int, str] = field(default_factory=dict)
    """Concurrency levels not measured, with the reason (e.g. above the engine's max_batch_size)."""
    peak_memory_bytes: int = 0
    bandwidth_bytes_per_s: float | None = None
    bandwidth_source: str | None = None
    decode_cost: DecodeCost | None = None

    @property
    def best_tokens_per_s(self) -> float | None:
        """Peak output tokens/s over the sweep: the speed ``min_tokens_per_s`` and ``select: fastest`` use."""
        return max((p.output_tokens_per_s for p in self.points), default=None)

    @property
    def ttft_p90_ms(self) -> float | None:
        """p90 TTFT at the lowest measured concurrency (an unloaded engine): what ``max_ttft_p90_ms``
        checks."""
        return self.points[0].ttft_ms.p90 if self.points else None

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["skipped"] = [{"concurrency": c, "reason": r} for c, r in sorted(self.skipped.items())]
        return data


CPU_PERF_REQUESTS = 4
GPU_PERF_REQUESTS = 8
CPU_PERF_MAX_NEW_TOKENS = 16


def sweep_settings(evaluation: Evaluation, device: str) -> tuple[int, int]:
    """(timed requests per concurrency level, output tokens per request) of the sweep on ``device``.

    Unset ``perf_requests`` / ``perf_max_new_tokens`` default to a full sweep on GPUs and a cheaper one on
    CPU (fewer requests, at most 16 output tokens), where decoding is slow and the sweep dominated validation.
    Prompt lengths and seeds are the same either way.
    """
    on_gpu = device.startswith("cuda")
    requests = evaluation.perf_requests or (GPU_PERF_REQUESTS if on_gpu else CPU_PERF_REQUESTS)
    gen_len = evaluation.perf_max_new_tokens or (
        evaluation.max_new_tokens if on_gpu else min(evaluation.max_new_tokens, CPU_PERF_MAX_NEW_TOKENS)
    )
    return requests, gen_len


def seeded_prompts(count: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``count`` prompts of exactly ``prompt_len`` token ids, the same for every engine given the seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, prompt_len), generator=generator).tolist()


def roofline_pct(
    cost: DecodeCost, concurrency: int, context_tokens: float, step_s: float, bandwidth_bytes_per_s: float
) -> float:
    """Achieved bytes/s of a decode step as a percentage of the device's memory bandwidth."""
    return 100.0 * cost.bytes_per_step(concurrency, context_tokens) / step_s / bandwidth_bytes_per_s


@functools.lru_cache(maxsize=8)
def measure_copy_bandwidth(device: str = "cuda", size_mib: int = 1024, iterations: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (as the roofline's reference)."""
    dev = torch.device(device)
    nbytes = size_mib << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(dev)
    seconds = start.elapsed_time(end) / 1000.0
    return 2.0 * nbytes * iterations / seconds


def decode_cost_from_dir(engine_dir: Path) -> DecodeCost | None:
    """Weight bytes read per decode step and KV bytes per token, from a torch engine's ``kiln-engine.json``
    (its model shape; the embedding table is left out: a step reads one row of it) or else a TRT-LLM
    ``config.json`` (all safetensors bytes count as weights).

    None when the dir holds neither: the roofline is then not reported rather than guessed.
    """
    engine_dir = Path(engine_dir)
    weights = sum(p.stat().st_size for p in engine_dir.rglob("*.safetensors"))
    if (engine_dir / ENGINE_MANIFEST).is_file() and weights:
        manifest = engine_manifest.read(engine_dir)
        model = manifest.model or {}  # a torch engine's shape; TensorRT-LLM's is in its config.json
        if {"num_layers", "num_kv_heads", "head_size"} <= model.keys():
            kv_bytes = 1 if manifest.kv_cache_quant_algo else _DTYPE_BYTES[manifest.dtype]
            return DecodeCost(
                weight_bytes=_tensor_bytes(engine_dir, skip=EMBEDDING),
                kv_bytes_per_token=2
                * model["num_layers"]
                * model["num_kv_heads"]
                * model["head_size"]
                * kv_bytes,
            )
    config_path = next(
        (
            p
            for p in sorted(engine_dir.rglob("config.json"))
            if "num_hidden_layers" in p.read_text(errors="ignore")
        ),
        None,
    )
    if config_path is None or weights == 0:
        return None
    config = json.loads(config_path.read_text())
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_size = int(config.get("head_size") or config["hidden_size"] // heads)
    kv_algo = ((config.get("quantization") or {}).get("kv_cache_quant_algo") or "").lower()
    kv_bytes = _DTYPE_BYTES.get(kv_algo) or _DTYPE_BYTES.get(str(config.get("dtype")), 2)
    return DecodeCost(
        weight_bytes=weights,
        kv_bytes_per_token=2 * int(config["num_hidden_layers"]) * kv_heads * head_size * kv_bytes,
    )


def _tensor_bytes(engine_dir: Path, skip: str) -> int:
    """Bytes of every tensor in the dir's rank files but ``skip`` (read from the headers, not the data)."""
    total = 0
    for path in sorted(engine_dir.glob("rank*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name != skip:
                    t = f.get_slice(name)
                    total += math.prod(t.get_shape()) * _SAFETENSORS_BYTES[t.get_dtype()]
    return total


@dataclass(frozen=True)
class BenchPrompt:
    """One request of a sweep: its prompt (token ids, or text where the driver tokenizes) and output
    length."""

    prompt: list[int] | str
    max_tokens: int


@dataclass(frozen=True)
class RequestTiming:
    """What one request measured: output tokens and when each arrived, in seconds since it was sent."""

    output_tokens: int
    ttft_s: float
    token_times_s: list[float]
    prompt_tokens: int | None = None


RoundFn = Callable[[list[BenchPrompt]], tuple[float, list[RequestTiming]]]
"""Send a round of prompts at once, wait for all; returns (wall seconds, one timing per prompt). The sweep
calls it the same way whatever drives the requests: ``EngineRounds`` (in process, what validation and
``kiln bench ENGINE_DIR`` run) or ``kiln.serve.client.OpenAIRounds`` (streaming HTTP, ``kiln bench
--url``)."""


class EngineRounds:
    """Rounds run by ``Engine.generate``: greedy, no stop ids, so every request makes exactly
    ``max_tokens``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, prompts: list[BenchPrompt]) -> tuple[float, list[RequestTiming]]:
        requests = []
        for p in prompts:
            if isinstance(p.prompt, str):
                raise ValueError("EngineRounds takes token-id prompts; tokenize text prompts first")
            requests.append(
                GenerationRequest(p.prompt, SamplingParams(max_new_tokens=p.max_tokens, temperature=0.0))
            )
        start = time.perf_counter()
        results = self.engine.generate(requests)
        wall = time.perf_counter() - start
        return wall, [
            self._timing(result, len(r.prompt_token_ids)) for result, r in zip(results, requests, strict=True)
        ]

    def _timing(self, result: object, prompt_tokens: int) -> RequestTiming:
        times = list(result.token_times_s)  # type: ignore[attr-defined]
        first = result.ttft_s if result.ttft_s is not None else (times[0] if times else None)  # type: ignore[attr-defined]
        if first is None:
            raise ValueError(
                f"engine {type(self.engine).__name__} returned neither ttft_s nor token_times_s: "
                "validation cannot measure latency without them"
            )
        return RequestTiming(len(result.token_ids), first, times, prompt_tokens)  # type: ignore[attr-defined]


def measure_level(
    run_round: RoundFn, concurrency: int, prompts: list[BenchPrompt], warmup_rounds: int, rounds: int
) -> ConcurrencyResult:
    """``warmup_rounds`` untimed rounds, then ``rounds`` timed rounds of ``concurrency`` prompts sent at
    once."""
    for _ in range(warmup_rounds):
        run_round([prompts[i % len(prompts)] for i in range(concurrency)])
    wall, ttft_ms, itl_ms, tokens = 0.0, [], [], 0
    for r in range(rounds):
        batch = [prompts[(r * concurrency + i) % len(prompts)] for i in range(concurrency)]
        elapsed, timings = run_round(batch)
        wall += elapsed
        for timing in timings:
            tokens += timing.output_tokens
            ttft_ms.append(1000.0 * timing.ttft_s)
            times = timing.token_times_s
            itl_ms.extend(1000.0 * (b - a) for a, b in zip(times, times[1:], strict=False))
    requests = rounds * concurrency
    return ConcurrencyResult(
        concurrency=concurrency,
        requests=requests,
        output_tokens=tokens,
        wall_s=wall,
        output_tokens_per_s=tokens / wall,
        requests_per_s=requests / wall,
        ttft_ms=Percentiles.of(ttft_ms),
        itl_ms=Percentiles.of(itl_ms),
    )


def sweep(
    run_round: RoundFn,
    levels: Sequence[int],
    prompts: list[BenchPrompt],
    *,
    prompt_len: int,
    gen_len: int,
    seed: int = 0,
    device: str = "cpu",
    max_batch_size: int | None = None,
    decode_cost: DecodeCost | None = None,
    warmup_rounds: int = 1,
    min_requests: int = 8,
    bandwidth_bytes_per_s: float | None = None,
    peak_memory_bytes: Callable[[], int] | None = None,
    on_level: Callable[[int], None] | None = None,
) -> PerfResult:
    """The one measuring code path: each concurrency level of ``levels`` (ascending) as ``measure_level``,
    enough rounds for ``min_requests`` requests; levels above ``max_batch_size`` or refused with
    ``GenerationLimitError`` are recorded in ``skipped``. On CUDA, with ``decode_cost``, each level's median
    ITL is compared with the memory-bandwidth roofline (``bandwidth_bytes_per_s`` or the measured copy
    bandwidth); elsewhere the roofline is None."""
    levels = sorted(set(levels))
    on_gpu = device.startswith("cuda")
    bandwidth, source = None, None
    if on_gpu and decode_cost is not None:
        bandwidth = bandwidth_bytes_per_s or measure_copy_bandwidth(device)
        source = "given" if bandwidth_bytes_per_s else "measured device-to-device copy (read + write)"
    points, skipped = [], {}
    for concurrency in levels:
        if on_level:
            on_level(concurrency)
        if max_batch_size is not None and concurrency > max_batch_size:
            skipped[concurrency] = f"above the engine's max_batch_size ({max_batch_size})"
            continue
        try:
            point = measure_level(
                run_round, concurrency, prompts, warmup_rounds, math.ceil(min_requests / concurrency)
            )
        except GenerationLimitError as exc:
            skipped[concurrency] = str(exc)
            continue
        if bandwidth and decode_cost and point.itl_ms:
            context = prompt_len + (gen_len - 1) / 2
            point = ConcurrencyResult(
                **{
                    **point.__dict__,
                    "decode_bytes_per_step": decode_cost.bytes_per_step(concurrency, context),
                    "roofline_pct": roofline_pct(
                        decode_cost, concurrency, context, point.itl_ms.p50 / 1000.0, bandwidth
                    ),
                }
            )
        points.append(point)
    return PerfResult(
        device=device,
        prompt_len=prompt_len,
        gen_len=gen_len,
        seed=seed,
        warmup_rounds=warmup_rounds,
        points=points,
        skipped=skipped,
        peak_memory_bytes=int(peak_memory_bytes()) if peak_memory_bytes else 0,
        bandwidth_bytes_per_s=bandwidth,
        bandwidth_source=source,
        decode_cost=decode_cost,
    )


def measure_performance(
    engine: Engine,
    evaluation: Evaluation,
    *,
    prompt_len: int,
    gen_len: int,
    seed: int = 0,
    device: str = "cpu",
    vocab_size: int | None = None,
    max_batch_size: int | None = None,
    decode_cost: DecodeCost | None = None,
    warmup_rounds: int = 1,
    min_requests: int = 8,
    bandwidth_bytes_per_s: float | None = None,
    on_level: Callable[[int], None] | None = None,
) -> PerfResult:
    """TTFT/ITL percentiles, tokens/s and requests/s at each ``evaluation.concurrency`` level, peak memory.

    Seeded prompts of exactly ``prompt_len`` tokens, greedy to exactly ``gen_len`` tokens, through
    ``sweep`` with ``EngineRounds`` (what ``kiln bench ENGINE_DIR`` runs too). Each level runs
    ``warmup_rounds`` untimed rounds, then enough rounds for ``min_requests`` requests. Levels above
    ``max_batch_size`` (or that the engine refuses with ``GenerationLimitError``) are recorded in
    ``skipped`` with the reason. On CUDA the roofline uses ``bandwidth_bytes_per_s`` or, when not given,
    the device's measured copy bandwidth; on CPU it is None.
    """
    if prompt_len < 1 or gen_len < 1:
        raise ValueError(f"prompt_len ({prompt_len}) and gen_len ({gen_len}) must be >= 1")
    vocab = vocab_size or int(engine.logits([0]).shape[-1])
    levels = sorted(set(evaluation.concurrency))
    prompts = [
        BenchPrompt(p, gen_len)
        for p in seeded_prompts(max(max(levels), min_requests), prompt_len, vocab, seed)
    ]
    return sweep(
        EngineRounds(engine),
        levels,
        prompts,
        prompt_len=prompt_len,
        gen_len=gen_len,
        seed=seed,
        device=device,
        max_batch_size=max_batch_size,
        decode_cost=decode_cost,
        warmup_rounds=warmup_rounds,
        min_requests=min_requests,
        bandwidth_bytes_per_s=bandwidth_bytes_per_s,
        peak_memory_bytes=engine.memory_bytes,
        on_level=on_level,
    )
