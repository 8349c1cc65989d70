"""The engine process of ``kiln serve``: loads the engine, warms it up, then runs its scheduler.

Started by :class:`kiln.serve.loop.EngineProcess` as ``python -m kiln.serve.worker --fd N ENGINE_DIR`` with
one end of a Unix socket pair (frames of :mod:`kiln.serve.wire`). The engine runs in a process of its own so
that the HTTP process's per-token work (parsing, detokenizing, one SSE write per token per client) never
holds the interpreter lock the decode loop needs; this process does nothing per token but pack it.

Three threads: the main one owns the scheduler (takes new requests and cancellations between steps, checks
each against the engine's limits and answers at once, then steps; an idle engine told that more requests
have reached the server than it handed on waits for them, up to ``batch_wait_s``, so that a burst is one
prefill, not a first small one that the rest queue behind); a reader turns incoming frames into
that inbox; a sender writes what the steps produced, coalescing every token made since its last write into
one frame, so a step costs one write however many requests it served. After start-up SIGINT and SIGTERM
are ignored: the HTTP process drains, then says stop (or closes the socket: this process then exits).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.serve.wire import FINISH, FrameReader, Steps, json_frame, steps_frame

log = logging.getLogger("kiln.serve")
_FINISH_CODE = {name: code for code, name in enumerate(FINISH)}


def warm_up(engine: Any) -> None:
    """One short generation (and on CUDA one at the full batch, then one prefill of ``max_num_tokens``) so
    the first request is not the slow one: on CUDA a prefill that large takes the compiled fused steps
    (``FUSE_MIN_ELEMENTS``), which would otherwise compile, or load from Inductor's cache, under the first
    burst (likely the one-time ~0.45 s stall of bench/results/serve_gpu_h200_batch_wait.md)."""
    from kiln.engine.base import GenerationRequest, SamplingParams

    sizes = [1] if engine.device.type == "cpu" else sorted({1, engine.max_batch_size})
    for size in sizes:
        engine.generate(
            [GenerationRequest([0] * min(4, engine.max_input_len), SamplingParams(max_new_tokens=2))] * size
        )
    if engine.device.type == "cuda":
        length = min(engine.max_input_len, engine.max_seq_len - 1)
        burst = max(1, min(engine.max_batch_size, engine.max_num_tokens // length))
        engine.generate([GenerationRequest([0] * length, SamplingParams(max_new_tokens=1))] * burst)


def load(engine_dir: Path) -> Any:
    """The engine of ``engine_dir``, single-rank, warmed up."""
    from kiln.engine.base import get_backend
    from kiln.engine.manifest import read
    from kiln.errors import BackendUnavailableError

    engine = get_backend(read(engine_dir).backend).load(engine_dir)
    if engine.pp.enabled or engine.tp.world_size > 1:
        raise BackendUnavailableError(
            "kiln serve runs single-rank engines; this one has several ranks "
            "(serve it with one process per rank is not supported yet)"
        )
    warm_up(engine)
    return engine


@dataclass
class _Inbox:
    adds: list[dict[str, Any]] = field(default_factory=list)
    cancels: list[int] = field(default_factory=list)
    stopping: bool = False
    batch_wait_s: float = 0.0  # the HTTP process's --batch-wait-ms (its "settings" frame)

    def more_coming(self, room: int) -> bool:
        """Whether the newest add said requests are still on their way in the HTTP process and ``room``
        slots could take them."""
        return bool(self.adds) and self.adds[-1].get("arriving", 0) > 0 and len(self.adds) < room


def _gather(inbox: _Inbox, wake: threading.Condition, room: int) -> None:
    """Wait (``wake`` held) while more requests are coming, at most ``inbox.batch_wait_s``."""
    deadline = time.perf_counter() + inbox.batch_wait_s
    while inbox.more_coming(room) and not inbox.stopping:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        wake.wait(left)


class _Sender:
    """Writes what the engine thread queued, in order; tokens queued together go out as one ``T`` frame.

    The engine thread only appends (a deque append needs no lock) and wakes the sender once per step, or at
    once for a request's first token (its TTFT) and for admissions."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # bytes (a frame), a token tuple (request id, token, time, finish) or gauges
        self.queue: deque[Any] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kiln-engine-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        with self._ready:
            self._ready.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        gauges, queue = (0, 0, 0), self.queue
        while True:
            with self._ready:
                while not queue and not self._closed:
                    self._ready.wait()
                closing = self._closed
            out: list[bytes] = []
            ids: list[int] = []
            tokens: list[int] = []
            times: list[float] = []
            finish = bytearray()
            sizes: list[int] = []
            while queue:
                item = queue.popleft()
                if isinstance(item, bytes):
                    if ids or sizes:  # keep the order: tokens queued before this frame go first
                        out.append(steps_frame(Steps(*gauges, ids, tokens, times, bytes(finish), sizes)))
                        ids, tokens, times, finish, sizes = [], [], [], bytearray(), []
                    out.append(item)
                elif isinstance(item, tuple):  # a token
                    ids.append(item[0])
                    tokens.append(item[1])
                    times.append(item[2])
                    finish.append(item[3])
                else:  # [running, waiting, cached tokens, requests served] after a step
                    gauges = tuple(item[:3])
                    sizes.append(item[3])
            if ids or sizes:
                out.append(steps_frame(Steps(*gauges, ids, tokens, times, bytes(finish), sizes)))
            try:
                if out:
                    self.sock.sendall(b"".join(out))
            except OSError:  # the HTTP process is gone; the reader sees it too and stops the loop
                return
            if closing and not queue:
                return


def serve(engine: Any, sock: socket.socket) -> int:
    """Run the scheduler until told to stop (or the socket closes); 1 if the engine failed."""
    sender = _Sender(sock)
    inbox = _Inbox()
    wake = threading.Condition()

    def read() -> None:
        reader = FrameReader()
        while True:
            try:
                data = sock.recv(1 << 20)
            except OSError:
                data = b""
            frames = reader.feed(data) if data else [{"stop": True}]
            received = time.perf_counter()
            with wake:
                for frame in frames:
                    if "add" in frame:
                        frame["add"]["received"] = received
                        inbox.adds.append(frame["add"])
                    elif "cancel" in frame:
                        inbox.cancels.append(frame["cancel"])
                    elif "stop" in frame:
                        inbox.stopping = True
                    elif "settings" in frame:
                        inbox.batch_wait_s = float(frame["settings"].get("batch_wait_s", 0.0))
                wake.notify()
            if not data:
                return

    threading.Thread(target=read, name="kiln-engine-reader", daemon=True).start()

    queue, started = sender.queue, set()
    # requests added and not prefilled yet: (sent by the HTTP process, read here); what the step that
    # prefills them admitted goes back as one "prefilled" frame (wire, queue and prefill seconds of each)
    unprefilled: dict[int, tuple[float, float]] = {}
    prefilled: list[list[float]] = []
    step_started = 0.0

    # the engine thread, as each token is made (a prefill's before its decode)
    def on_event(event: Any) -> None:
        result, request_id = event.result, event.request_id
        if (times := unprefilled.pop(request_id, None)) is not None:
            sent, received = times
            prefilled.append([received - sent, step_started - received, time.perf_counter() - step_started])
        queue.append(
            (request_id, event.token_id, event.time_s, _FINISH_CODE[result.finish_reason] if result else 0)
        )
        if result is not None:
            started.discard(request_id)
        elif request_id not in started:  # a first token: out now, not after the decode step that follows
            started.add(request_id)
            sender.wake()

    from kiln.engine.base import GenerationRequest, SamplingParams
    from kiln.errors import GenerationLimitError

    scheduler = engine.scheduler(on_event=on_event)
    status = 0
    while True:
        with wake:
            while not (inbox.adds or inbox.cancels or inbox.stopping or scheduler.has_work):
                wake.wait()
            if inbox.stopping:
                break
            if inbox.batch_wait_s > 0 and not scheduler.has_work:
                # nothing runs, so waiting delays no one's tokens: only these first arrivals' TTFT, bounded
                _gather(inbox, wake, scheduler.concurrency)
            adds, cancels = inbox.adds, set(inbox.cancels)
            inbox.adds, inbox.cancels = [], []
        answers = []
        for add in adds:
            if add["id"] in cancels:
                continue
            sampling = add["sampling"]
            request = GenerationRequest(
                add["prompt"],
                SamplingParams(**{**sampling, "stop_token_ids": tuple(sampling.get("stop_token_ids") or ())}),
            )
            try:
                engine.check_request(request, add.get("where") or "request")
            except GenerationLimitError as exc:
                answers.append([add["id"], str(exc)])
                continue
            scheduler.add(request, add["id"], submitted_at=add["arrived"], check=False)
            unprefilled[add["id"]] = (add.get("sent", add["received"]), add["received"])
            answers.append([add["id"], None])
        if answers:
            queue.append(json_frame({"admitted": answers}))
            sender.wake()
        for request_id in cancels:
            scheduler.cancel(request_id)
            started.discard(request_id)
            unprefilled.pop(request_id, None)
        served = 0
        if scheduler.has_work:
            step_started = time.perf_counter()
            try:
                served = len({e.request_id for e in scheduler.step()})
            except Exception as exc:  # the engine's state is unknown now: say so and stop serving
                traceback.print_exc()
                queue.append(json_frame({"failed": f"{type(exc).__name__}: {exc}"}))
                status = 1
                break
        if prefilled:
            queue.append(json_frame({"prefilled": prefilled}))
            prefilled = []
        queue.append([scheduler.num_running, scheduler.num_waiting, scheduler.cached_tokens(), served])
        sender.wake()
    sender.close()
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.serve.worker", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fd", type=int, required=True, help="this end of the socket pair to the HTTP process"
    )
    parser.add_argument("engine_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    sock = socket.socket(fileno=args.fd)
    try:
        engine = load(args.engine_dir)
    except Exception as exc:
        from kiln.errors import KilnError

        if not isinstance(exc, KilnError):
            traceback.print_exc()
        sock.sendall(json_frame({"error": str(exc), "type": type(exc).__name__}))
        return 1
    for name in ("SIGINT", "SIGTERM"):  # the HTTP process drains on these and tells this one when to stop
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    sock.sendall(
        json_frame(
            {
                "ready": {
                    "max_batch_size": engine.max_batch_size,
                    "max_input_len": engine.max_input_len,
                    "max_seq_len": engine.max_seq_len,
                    "device": str(engine.device),
                }
            }
        )
    )
    try:
        return serve(engine, sock)
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
