"""The engine thread: one thread owns the engine's scheduler; HTTP handlers talk to it through queues.

Handlers (on the asyncio loop) ``submit`` a request and read its tokens from an ``asyncio.Queue``; the
engine thread takes new requests and cancellations between steps, so requests from many clients join one
running batch (in-flight batching) up to the engine's ``max_batch_size``, and tokens go back to each
request's queue through ``loop.call_soon_threadsafe``. Admission is bounded: at most ``max_batch_size +
max_waiting`` requests are in flight, past that ``submit`` raises ``QueueFull`` (the server answers 429).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from kiln.engine.base import GenerationRequest, StreamingEngine, TokenEvent
from kiln.serve.metrics import ServerMetrics

log = logging.getLogger("kiln.serve")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its bound."""


class EngineFailed(Exception):
    """The engine raised during a step; requests in flight then fail and the server reports unhealthy."""


@dataclass(frozen=True)
class Aborted:
    """Sent to a request's queue when it ends without a result (engine failure, drain deadline)."""

    reason: str


@dataclass
class _Request:
    id: int
    request: GenerationRequest
    arrived: float
    queue: asyncio.Queue
    last_time_s: float | None = None
    tokens: int = 0


@dataclass
class _Inbox:
    adds: list[_Request] = field(default_factory=list)
    cancels: list[int] = field(default_factory=list)


class EngineLoop:
    """Runs ``engine.scheduler()`` on a dedicated thread; see the module doc."""

    def __init__(self, engine: StreamingEngine, metrics: ServerMetrics, max_waiting: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.capacity = engine.max_batch_size + max_waiting
        self.failure: str | None = None
        self._scheduler = engine.scheduler(on_event=self._on_event)
        self._requests: dict[int, _Request] = {}  # in flight; touched on the asyncio thread only
        self._next_id = 0
        self._inbox = _Inbox()
        self._wake = threading.Condition()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cache_positions = engine.max_batch_size * engine.max_seq_len

    # -- asyncio side ------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished (running or waiting)."""
        return len(self._requests)

    def submit(self, request: GenerationRequest, arrived: float) -> tuple[int, asyncio.Queue]:
        """Queue a request (already checked against the engine's limits); its tokens arrive on the queue as
        ``TokenEvent`` (the last one carries the result) or one ``Aborted``."""
        if self.failure is not None:
            raise EngineFailed(self.failure)
        if len(self._requests) >= self.capacity:
            raise QueueFull(f"{self.engine.max_batch_size} requests are running and {self.max_waiting} waiting "
                            "(the queue bound, --max-waiting); retry later")
        request_id, self._next_id = self._next_id, self._next_id + 1
        entry = _Request(request_id, request, arrived, asyncio.Queue())
        self._requests[request_id] = entry
        self.metrics.prompt_tokens.inc(len(request.prompt_token_ids))
        with self._wake:
            self._inbox.adds.append(entry)
            self._wake.notify()
        return request_id, entry.queue

    def cancel(self, request_id: int, reason: str = "cancelled") -> None:
        """Stop generating for a request (client gone, stop string found); frees its slot at the next step."""
        if self._requests.pop(request_id, None) is None:
            return
        self.metrics.finished.labels(reason).inc()
        with self._wake:
            self._inbox.cancels.append(request_id)
            self._wake.notify()

    def abort_all(self, reason: str) -> None:
        """End every request in flight without a result (drain deadline passed, engine failed)."""
        for request_id, entry in list(self._requests.items()):
            entry.queue.put_nowait(Aborted(reason))
            self.cancel(request_id, "aborted")

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            entry = self._requests.get(event.request_id)
            if entry is None:  # cancelled meanwhile
                continue
            self.metrics.generation_tokens.inc()
            if entry.last_time_s is None:
                self.metrics.ttft.observe(event.time_s)
            else:
                self.metrics.itl.observe(event.time_s - entry.last_time_s)
            entry.last_time_s = event.time_s
            entry.tokens += 1
            entry.queue.put_nowait(event)
            if event.result is not None:
                del self._requests[event.request_id]
                self.metrics.e2e.observe(event.time_s)
                self.metrics.finished.labels(event.result.finish_reason).inc()

    def _on_event(self, event: TokenEvent) -> None:
        """Engine thread, as each token is produced: hand it to the asyncio loop now (streaming)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, [event])

    def _fail(self, message: str) -> None:
        self.failure = message
        self.abort_all(f"engine failed: {message}")

    # -- engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        scheduler, metrics = self._scheduler, self.metrics
        while True:
            with self._wake:
                while not (self._inbox.adds or self._inbox.cancels or scheduler.has_work or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, _Inbox()
            cancelled = set(inbox.cancels)
            for entry in inbox.adds:
                if entry.id not in cancelled:
                    scheduler.add(entry.request, entry.id, submitted_at=entry.arrived, check=False)
            for request_id in cancelled:
                scheduler.cancel(request_id)
            if scheduler.has_work:
                try:
                    events = scheduler.step()
                except Exception as exc:  # the engine's state is unknown now: fail loudly, stop serving
                    log.exception("engine step failed; failing every request in flight")
                    assert self._loop is not None
                    self._loop.call_soon_threadsafe(self._fail, f"{type(exc).__name__}: {exc}")
                    return
                if events:
                    metrics.batch_size.observe(len({e.request_id for e in events}))
            metrics.running.set(scheduler.num_running)
            metrics.waiting.set(scheduler.num_waiting)
            metrics.kv_slots_used.set(scheduler.num_running)
            metrics.kv_cache_usage.set(_cached_tokens(scheduler) / self._cache_positions)


def _cached_tokens(scheduler: object) -> int:
    cached = getattr(scheduler, "cached_tokens", None)
    return int(cached()) if callable(cached) else 0


def now() -> float:
    """The clock token times are measured on (``time.perf_counter``, as the engine's)."""
    return time.perf_counter()
