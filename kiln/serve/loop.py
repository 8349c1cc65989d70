"""The HTTP process's handle on the engine process (:mod:`kiln.serve.worker`), and each request's token
stream.

``EngineProcess.start`` spawns the engine process and waits until its engine is loaded and warm. Handlers on
the asyncio loop ``submit`` requests; the engine process checks each against the engine's limits, answers
(admitted, or the limit it breaks), joins it to the running batch (in-flight batching up to the engine's
``max_batch_size``) and streams its tokens back, every step's tokens in one frame; those are handed to each
request's ``TokenStream`` in one pass over the frame. Admission is bounded: at most ``max_batch_size +
max_waiting`` requests are in flight, past that ``submit`` raises ``QueueFull`` (the server answers 429).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kiln.engine.base import GenerationRequest
from kiln.errors import BackendUnavailableError, GenerationLimitError
from kiln.serve.metrics import ServerMetrics
from kiln.serve.wire import FINISH, FrameReader, Steps, json_frame

log = logging.getLogger("kiln.serve")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its bound."""


class EngineFailed(Exception):
    """The engine raised during a step (or its process died); requests in flight fail, the server is
    unhealthy."""


class RequestAborted(Exception):
    """A request ended without a result before it was admitted (engine failure, drain deadline, cancelled)."""


@dataclasses.dataclass(frozen=True)
class Aborted:
    """The last item of a request that ends without a result (engine failure, drain deadline)."""

    reason: str


class TokenStream:
    """One request's tokens as the engine sends them: ``(token_id, finish_reason or None)`` pairs, then
    nothing (or an ``Aborted``). ``take`` returns every item that arrived since the last call, waiting for
    one."""

    __slots__ = ("id", "arrived", "prompt_tokens", "last_time_s", "_items", "_waiter", "_admitted")

    def __init__(
        self, request_id: int, arrived: float, prompt_tokens: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.id, self.arrived, self.prompt_tokens = request_id, arrived, prompt_tokens
        self.last_time_s: float | None = None
        self._items: list[Any] = []
        self._waiter: asyncio.Future | None = None
        self._admitted: asyncio.Future = loop.create_future()

    def push(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Any]:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        items, self._items = self._items, []
        return items

    async def admitted(self) -> None:
        """Return once the engine took the request; raise ``GenerationLimitError`` (naming the limit) if it
        refused it, ``RequestAborted`` if the request ended first."""
        await self._admitted

    @property
    def is_admitted(self) -> bool:
        admitted = self._admitted
        return admitted.done() and not admitted.cancelled() and admitted.exception() is None

    def _answer(self, error: Exception | None) -> None:
        if not self._admitted.done():
            if error is None:
                self._admitted.set_result(None)
            else:
                self._admitted.set_exception(error)
                self._admitted.exception()  # retrieved: nobody may be awaiting it any more


class EngineProcess:
    """The engine process and the requests in flight on it (see the module doc)."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket, limits: dict[str, Any]) -> None:
        self.proc, self._sock = proc, sock
        self.max_batch_size = int(limits["max_batch_size"])
        self.max_input_len = int(limits["max_input_len"])
        self.max_seq_len = int(limits["max_seq_len"])
        self.device = str(limits.get("device", ""))
        self.metrics: ServerMetrics | None = None
        self.capacity = self.max_batch_size
        self.max_waiting = 0
        self.failure: str | None = None
        self._requests: dict[int, TokenStream] = {}  # in flight; touched on the asyncio thread only
        self._next_id = 0
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._outbox: list[bytes | dict[str, Any]] = []
        # generation requests that reached the server and are not handed on yet (arrival time -> count):
        # each add tells the engine how many more are coming, so an idle engine can wait for a burst
        self._arriving: dict[float, int] = {}
        self._arriving_total = 0

    @classmethod
    def start(cls, engine_dir: Path, *, worker: list[str] | None = None) -> EngineProcess:
        """Spawn the engine process for ``engine_dir`` and wait (as long as loading takes) until it is ready.

        ``worker``: the command of the engine process, ``--fd N ENGINE_DIR`` appended (default:
        ``python -m kiln.serve.worker``; a stand-in speaking :mod:`kiln.serve.wire` measures the HTTP side
        alone)."""
        import kiln
        from kiln import errors

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        kiln_root = str(Path(kiln.__file__).resolve().parents[1])  # the child imports this same kiln
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [kiln_root, os.environ.get("PYTHONPATH")])),
        }
        command = worker or [sys.executable, "-m", "kiln.serve.worker"]
        proc = subprocess.Popen(
            [*command, "--fd", str(theirs.fileno()), str(engine_dir)], pass_fds=[theirs.fileno()], env=env
        )
        theirs.close()
        reader = FrameReader()
        try:
            while True:
                data = ours.recv(1 << 16)
                if not data:
                    raise BackendUnavailableError(
                        f"the engine process for {engine_dir} exited with code "
                        f"{proc.wait()} while loading (its log is above)"
                    )
                for frame in reader.feed(data):
                    if isinstance(frame, dict) and "ready" in frame:
                        return cls(proc, ours, frame["ready"])
                    if isinstance(frame, dict) and "error" in frame:
                        proc.wait()
                        error = getattr(errors, str(frame.get("type")), None)
                        if not (isinstance(error, type) and issubclass(error, errors.KilnError)):
                            error = BackendUnavailableError
                        raise error(frame["error"])
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            ours.close()
            raise

    # -- asyncio side ------------------------------------------------------------------------------
    async def attach(self, metrics: ServerMetrics, max_waiting: int, batch_wait_s: float = 0.0) -> None:
        """Start reading the engine's frames on the running loop; ``batch_wait_s``: how long an idle engine
        may wait for requests still on their way here (``--batch-wait-ms``)."""
        self.metrics, self.max_waiting = metrics, max_waiting
        self.capacity = self.max_batch_size + max_waiting
        self._loop = asyncio.get_running_loop()
        self._transport, _ = await self._loop.create_unix_connection(lambda: _Wire(self), sock=self._sock)
        self._send(json_frame({"settings": {"batch_wait_s": batch_wait_s}}))

    def expect(self, arrived: float) -> None:
        """A generation request arrived at ``arrived``: until it is submitted (or ``forget``), the engine is
        told it is coming."""
        self._arriving[arrived] = self._arriving.get(arrived, 0) + 1
        self._arriving_total += 1

    def forget(self, arrived: float) -> None:
        """The request that arrived at ``arrived`` is submitted or answered: no longer coming."""
        self._arriving_total -= self._arriving.pop(arrived, 0)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished (running or waiting)."""
        return len(self._requests)

    def submit(self, request: GenerationRequest, arrived: float, where: str = "request") -> TokenStream:
        """Send a request to the engine; await its ``admitted()`` (which raises GenerationLimitError, naming
        the limit, for a request over the engine's limits), then read its tokens with ``take()``."""
        if self.failure is not None:
            raise EngineFailed(self.failure)
        if len(self._requests) >= self.capacity:
            raise QueueFull(
                f"{self.max_batch_size} requests are running and {self.max_waiting} waiting "
                "(the queue bound, --max-waiting); retry later"
            )
        assert self._loop is not None and self._transport is not None
        request_id, self._next_id = self._next_id, self._next_id + 1
        self.forget(arrived)
        stream = TokenStream(request_id, arrived, len(request.prompt_token_ids), self._loop)
        self._requests[request_id] = stream
        # framed when written (``_flush``), so that it carries the time it left this process
        self._send(
            {
                "id": request_id,
                "prompt": list(request.prompt_token_ids),
                "sampling": vars(request.sampling),
                "arrived": arrived,
                "where": where,
            }
        )
        return stream

    def cancel(self, request_id: int, reason: str = "cancelled") -> None:
        """Stop generating for a request (client gone, stop string found); frees its slot at the next step."""
        stream = self._requests.pop(request_id, None)
        if stream is None:
            return
        self.metrics.finished.labels(reason).inc()
        stream._answer(RequestAborted(reason))
        self._send(json_frame({"cancel": request_id}))

    def _send(self, frame: bytes | dict[str, Any]) -> None:
        """Queue a frame (or a request to add) for the engine process; what one loop iteration queued goes
        out as one write."""
        if not self._outbox:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._outbox.append(frame)

    def _flush(self) -> None:
        frames = self._frames()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(frames))

    def _frames(self) -> list[bytes]:
        """The outbox as frames, emptied; each request added is stamped with the time it leaves."""
        items, self._outbox = self._outbox, []
        sent, frames = now(), []
        submit_time = self.metrics.submit_time if self.metrics is not None else None
        for item in items:
            if isinstance(item, dict):
                item["sent"] = sent
                item["arriving"] = self._arriving_total
                if submit_time is not None:
                    submit_time.observe(sent - item["arrived"])
                item = json_frame({"add": item})
            frames.append(item)
        return frames

    def abort_all(self, reason: str) -> None:
        """End every request in flight without a result (drain deadline passed, engine failed)."""
        for request_id, stream in list(self._requests.items()):
            stream._answer(RequestAborted(reason))
            stream.push(Aborted(reason))
            self.cancel(request_id, "aborted")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Tell the engine process to stop and wait for it (bounded; killed after ``timeout_s``)."""
        if self._stopping:
            return
        self._stopping = True
        try:
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(b"".join([*self._frames(), json_frame({"stop": True})]))
            else:
                self._sock.sendall(json_frame({"stop": True}))
            self._sock.shutdown(
                socket.SHUT_WR
            )  # end of input means stop too, should a write be still buffered
        except OSError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop within %g s: killing it", timeout_s)
            self.proc.kill()
            self.proc.wait()
        if self._transport is not None:
            self._transport.close()
        self._sock.close()

    # -- frames from the engine process ------------------------------------------------------------
    def _steps(self, steps: Steps) -> None:
        metrics, requests = self.metrics, self._requests
        ttft, itl, e2e = metrics.ttft, metrics.itl, metrics.e2e
        delivered = 0
        for request_id, token_id, time_s, finish in zip(
            steps.request_ids, steps.token_ids, steps.times_s, steps.finish, strict=True
        ):
            stream = requests.get(request_id)
            if stream is None:  # cancelled meanwhile
                continue
            delivered += 1
            if stream.last_time_s is None:
                ttft.observe(time_s)
            else:
                itl.observe(time_s - stream.last_time_s)
            stream.last_time_s = time_s
            if finish:
                reason = FINISH[finish]
                del requests[request_id]
                e2e.observe(time_s)
                metrics.finished.labels(reason).inc()
                stream.push((token_id, reason))
            else:
                stream.push((token_id, None))
        if delivered:
            metrics.generation_tokens.inc(delivered)
        for size in steps.batch_sizes:
            if size:
                metrics.batch_size.observe(size)
        metrics.running.set(steps.running)
        metrics.waiting.set(steps.waiting)
        metrics.kv_slots_used.set(steps.running)
        metrics.kv_cache_usage.set(steps.cached_tokens / (self.max_batch_size * self.max_seq_len))

    def _control(self, frame: dict[str, Any]) -> None:
        for request_id, error in frame.get("admitted") or ():
            stream = self._requests.get(request_id)
            if stream is None:
                continue
            if error is None:
                self.metrics.prompt_tokens.inc(stream.prompt_tokens)
                stream._answer(None)
            else:
                del self._requests[request_id]
                stream._answer(GenerationLimitError(error))
        if "prefilled" in frame:  # one prefill: [wire, queue, prefill] seconds of each request it admitted
            metrics = self.metrics
            metrics.prefill_batch_size.observe(len(frame["prefilled"]))
            for wire, queued, prefill in frame["prefilled"]:
                metrics.wire_time.observe(wire)
                metrics.queue_time.observe(queued)
                metrics.prefill_time.observe(prefill)
        if "failed" in frame:
            self._fail(str(frame["failed"]))

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            log.error("engine failed: %s; failing every request in flight", message)
            self.abort_all(f"engine failed: {message}")


class _Wire(asyncio.Protocol):
    def __init__(self, engine: EngineProcess) -> None:
        self.engine = engine
        self.reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        for frame in self.reader.feed(data):
            if isinstance(frame, Steps):
                self.engine._steps(frame)
            else:
                self.engine._control(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.engine._stopping:
            code = self.engine.proc.poll()
            self.engine._fail(
                "the engine process exited" + (f" with code {code}" if code is not None else "")
            )


def now() -> float:
    """The clock token times are measured on (``time.perf_counter``, as the engine's; system-wide on
    Linux)."""
    return time.perf_counter()
