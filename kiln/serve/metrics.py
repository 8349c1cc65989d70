"""Prometheus metrics of one ``kiln serve`` process (its own registry, scraped at ``GET /metrics``).

Names follow vLLM's where one exists (``kiln_`` instead of ``vllm:``): request and token counters, time
to first token, inter-token latency and end-to-end latency histograms, running / waiting requests, KV
cache use, and the batch size of every engine step (how many requests one forward pass served). Where a
request's time before its first token goes (as vLLM's queue and prefill time): in the HTTP process (arrival
to its submit frame written), on the wire (written to read by the engine process), queued in the engine
process (read to its prefill starting), its prefill; and how many requests each prefill admitted together.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
# the HTTP process's and the wire's share of a request are tens of microseconds when all is well
_SHORT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, *_LATENCY_BUCKETS)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Histogram:
    """A Prometheus histogram for the per-token path: ``observe`` is one bisect and two additions (no lock,
    no loop over buckets), for a single writer (the asyncio thread, which also serves the scrapes)."""

    def __init__(
        self, name: str, documentation: str, *, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = [float(b) for b in buckets]
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self._sum)


class ServerMetrics:
    """Every metric the server exports, updated on the HTTP process's asyncio thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kiln_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.finished = Counter(
            "kiln_requests_finished",
            "Generation requests that ended, by finish reason (stop, length, cancelled, aborted, error)",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "kiln_requests_rejected",
            "Requests refused before generation, by reason "
            "(queue_full, draining, invalid, too_large, unauthorized)",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "kiln_time_to_first_token_seconds",
            "Arrival to first token (queueing + prefill)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "kiln_inter_token_latency_seconds",
            "Gap between consecutive tokens of a request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kiln_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "kiln_batch_size",
            "Requests served by one engine step (decode batch or requests prefilled together)",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.submit_time = Histogram(
            "kiln_request_submit_time_seconds",
            "HTTP process: request arrival (headers read) to its submit frame written to the engine process "
            "(body read, validation, tokenization, framing, waiting for the event loop)",
            buckets=_SHORT_BUCKETS,
            registry=r,
        )
        self.wire_time = Histogram(
            "kiln_request_wire_time_seconds",
            "Submit frame written by the HTTP process to read by the engine process",
            buckets=_SHORT_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "kiln_request_queue_time_seconds",
            "Engine process: request read to its prefill starting (the step running meanwhile, a free slot)",
            buckets=_SHORT_BUCKETS,
            registry=r,
        )
        self.prefill_time = Histogram(
            "kiln_request_prefill_time_seconds",
            "Engine process: prefill start to the request's first token",
            buckets=_SHORT_BUCKETS,
            registry=r,
        )
        self.prefill_batch_size = Histogram(
            "kiln_prefill_batch_size",
            "Requests one prefill admitted together (a burst arriving in waves makes several small ones)",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.running = Gauge("kiln_num_requests_running", "Requests holding a KV cache slot", registry=r)
        self.waiting = Gauge("kiln_num_requests_waiting", "Admitted requests waiting for a slot", registry=r)
        self.kv_cache_usage = Gauge(
            "kiln_kv_cache_usage_ratio",
            "KV cache positions held by running requests / all positions (max_batch_size x max_seq_len)",
            registry=r,
        )
        self.kv_slots_used = Gauge(
            "kiln_kv_cache_slots_used", "KV cache slots (sequences) in use", registry=r
        )
        self.limit = Gauge(
            "kiln_engine_limit",
            "The engine's build limits and the server's queue bound",
            ["limit"],
            registry=r,
        )
        self.draining = Gauge("kiln_draining", "1 while the server drains after SIGTERM/SIGINT", registry=r)
