"""The loaded torch engine: in-flight batching over a preallocated KV cache, per-request sampling.

Scheduling (``Scheduler``, which ``generate`` and ``kiln serve`` both run): requests queue; whenever cache
slots are free and fewer than ``concurrency`` requests run, the next ones (up to ``max_num_tokens`` prompt
tokens together) are prefilled in one packed forward pass into the lowest free slots and join the running
batch; every step then decodes one token for all running requests at once; a request leaves as soon as it
hits ``max_new_tokens`` or a stop id (or is cancelled), freeing its slot for the queue. Requests may be
added and cancelled between steps. On CUDA each decode step replays a CUDA graph captured per (batch
bucket, attended-length bucket); with ``program.compile == "inductor"`` the captured step is the
Inductor-compiled one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.engine.base import GenerationRequest, GenerationResult, SamplingParams, TokenEvent
from kiln.engine.manifest import EngineManifest, TorchProgram
from kiln.engine.torch.model import DecoderModel, KVCache
from kiln.engine.torch.parallel import PipelineParallel, TensorParallel
from kiln.engine.torch.sampling import Stream, new_generator, sample
from kiln.errors import GenerationLimitError

TokenCallback = Callable[[int, int], None]
"""``on_token(request_index, token_id)``: called as each token is produced (streaming)."""


def buckets(limit: int, start: int) -> list[int]:
    """Powers of two from ``start`` up to ``limit`` (always ending at ``limit``)."""
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


_GREEDY = SamplingParams()


@dataclass
class _Step:
    """A launched decode step: the slots it decoded, who held them, and its tokens (read on demand)."""

    active: list[int]
    owners: list[_Running | None]
    out: torch.Tensor
    done: torch.cuda.Event | None

    def tokens(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        values = self.out.tolist()  # one conversion: indexing a tensor per slot costs microseconds each
        return [values[i] for i in self.active]


@dataclass
class _Running:
    index: Hashable
    request: GenerationRequest
    generator: Stream | None
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    @property
    def position(self) -> int:
        """Cache position of the last generated token (the one the next decode step feeds)."""
        return len(self.request.prompt_token_ids) + len(self.tokens) - 1

    def finish_reason(self) -> str | None:
        if self.tokens and self.tokens[-1] in self.request.sampling.stop_token_ids:
            return "stop"
        if len(self.tokens) >= self.request.sampling.max_new_tokens:
            return "length"
        return None


class TorchEngine:
    """A loaded engine dir; see ``TorchBackend.load``."""

    def __init__(
        self,
        engine_dir: Path,
        manifest: EngineManifest,
        model: DecoderModel,
        cache: KVCache,
        tp: TensorParallel,
        pp: PipelineParallel,
        program: TorchProgram,
    ) -> None:
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.model, self.cache, self.tp, self.pp = model, cache, tp, pp
        limits = manifest.limits
        self.max_batch_size, self.max_input_len, self.max_seq_len = (
            limits.max_batch_size,
            limits.max_input_len,
            limits.max_seq_len,
        )
        self.device = model.device
        # prompt tokens prefilled together in one pass (bounds the packed attention mask, T x T)
        self.max_num_tokens = max(limits.max_num_tokens, self.max_input_len)
        # Point-to-point sends between stages are neither captured in CUDA graphs nor compiled here: a
        # pipeline-parallel engine runs its decode step eagerly (no multi-GPU machine to measure them on).
        self.cuda_graphs = program.cuda_graphs and self.device.type == "cuda" and not self.pp.enabled
        self._batch_buckets = buckets(self.max_batch_size, 1)
        self._length_buckets = buckets(self.max_seq_len, min(128, self.max_seq_len))
        self._decode_fn = model.decode
        if program.compile == "inductor" and not self.pp.enabled:
            # Each (batch, length, greedy) bucket may need its own graph: the attended length is an int the
            # attention kernel specializes on, and the integer kernels pick a design per batch size. Past
            # dynamo's default of 8 the remaining buckets would silently run eager (measured: the 8B int8_sq
            # engine at concurrency 64, bench/results/engine_gpu_recipes_h200.md).
            graphs = 2 * len(self._batch_buckets) * len(self._length_buckets) + 8
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, graphs)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * graphs)
            self._decode_fn = torch.compile(
                model.decode, dynamic=program.dynamic, options=program.inductor_options
            )
        # Static decode inputs (row 0: token ids, row 1: positions) that captured CUDA graphs read from.
        self._inputs = torch.zeros(2, self.max_batch_size, dtype=torch.long, device=self.device)
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # two pinned buffers: a queued greedy step copies its tokens into one while the other is read
        pin = self.device.type == "cuda"
        self._host_tokens = [
            torch.zeros(self.max_batch_size, dtype=torch.long, pin_memory=pin) for _ in range(2)
        ]
        self._host_turn = 0
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    # -- Engine protocol -------------------------------------------------------------------------
    def generate(
        self,
        requests: list[GenerationRequest],
        *,
        concurrency: int | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[GenerationResult]:
        """Run requests to completion, at most ``concurrency`` (default: max_batch_size) at a time."""
        self._check(requests, concurrency)
        start = time.perf_counter()
        callback = None if on_token is None else (lambda event: on_token(event.request_id, event.token_id))
        scheduler = self.scheduler(concurrency, on_event=callback)
        for index, request in enumerate(requests):
            scheduler.add(request, index, submitted_at=start, check=False)
        results: list[GenerationResult | None] = [None] * len(requests)
        while scheduler.has_work:
            for event in scheduler.step():
                if event.result is not None:
                    results[event.request_id] = event.result
        return results  # type: ignore[return-value]

    def scheduler(
        self, concurrency: int | None = None, *, on_event: Callable[[TokenEvent], None] | None = None
    ) -> Scheduler:
        """An incremental scheduler over this engine's KV cache (what ``generate`` and ``kiln serve`` run);
        ``on_event`` is called as each token is produced, within the step (streaming).

        One scheduler at a time per engine: they share the cache slots."""
        self._check([], concurrency)
        return Scheduler(self, concurrency or self.max_batch_size, on_event)

    def check_request(self, request: GenerationRequest, where: str = "request") -> None:
        """Raise GenerationLimitError (naming the limit) if ``request`` does not fit this engine's build
        limits."""
        n, p = len(request.prompt_token_ids), request.sampling
        if n == 0:
            raise GenerationLimitError(f"{where}: empty prompt")
        if n > self.max_input_len:
            raise GenerationLimitError(
                f"{where}: prompt of {n} tokens exceeds max_input_len {self.max_input_len}; "
                "shorten the prompt or build the engine with a larger limits.max_input_len"
            )
        if p.max_new_tokens < 1:
            raise GenerationLimitError(f"{where}: max_new_tokens must be >= 1, got {p.max_new_tokens}")
        if n + p.max_new_tokens > self.max_seq_len:
            raise GenerationLimitError(
                f"{where}: prompt ({n}) + max_new_tokens ({p.max_new_tokens}) = {n + p.max_new_tokens} "
                f"exceeds max_seq_len {self.max_seq_len}; lower max_new_tokens to {self.max_seq_len - n} or "
                "rebuild"
            )
        _check_sampling(where, p)
        self._check_vocab(request.prompt_token_ids, where)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Context logits ``[n, vocab]`` (float32) for perplexity; ``n`` may go up to max_seq_len."""
        if not token_ids:
            raise GenerationLimitError("logits: token_ids is empty")
        if len(token_ids) > self.max_seq_len:
            raise GenerationLimitError(
                f"logits: {len(token_ids)} tokens exceed this engine's max_seq_len "
                f"{self.max_seq_len}; score the text in windows of at most that many tokens"
            )
        self._check_vocab(token_ids, "logits")
        with torch.inference_mode():
            tokens = torch.tensor(token_ids, dtype=torch.long, device=self.device)
            logits = self.model.prefill(tokens, self.cache, None, last_only=False)
            if not self.pp.enabled:
                return logits.float().cpu()
            if logits is None:
                logits = torch.empty(
                    len(token_ids), self.model.spec.vocab_size, dtype=self.model.dtype, device=self.device
                )
            return self.pp.broadcast(logits.contiguous()).float().cpu()

    def memory_bytes(self) -> int:
        """Peak CUDA memory allocated by this process, or the engine's weights + KV cache on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self.model.weight_bytes() + self.cache.nbytes()

    def close(self) -> None:
        self._graphs.clear()
        self.cache.k.clear()
        self.cache.v.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- internals -------------------------------------------------------------------------------
    def _admit(
        self,
        requests: Mapping[Hashable, GenerationRequest],
        pending: deque,
        slots: list[_Running | None],
        concurrency: int,
        emit: Callable[[int, _Running, int], None],
    ) -> None:
        """Move queued requests into free slots (at most ``max_num_tokens`` prompt tokens) and prefill them
        in one packed pass; each emits its first token."""
        joining: list[tuple[int, _Running]] = []
        budget = self.max_num_tokens
        while pending and sum(s is not None for s in slots) < concurrency:
            request = requests[pending[0]]
            if joining and len(request.prompt_token_ids) > budget:
                break
            budget -= len(request.prompt_token_ids)
            slot = slots.index(None)
            slots[slot] = _Running(pending.popleft(), request, new_generator(request.sampling, self.device))
            joining.append((slot, slots[slot]))
        if not joining:
            return
        prompt = torch.tensor(
            [t for _, r in joining for t in r.request.prompt_token_ids], dtype=torch.long, device=self.device
        )
        logits = self.model.prefill(
            prompt,
            self.cache,
            [slot for slot, _ in joining],
            last_only=True,
            lengths=[len(r.request.prompt_token_ids) for _, r in joining],
        )
        for (slot, running), token in zip(
            joining, self._sample(logits, [r for _, r in joining]), strict=True
        ):
            emit(slot, running, token)

    def _batch(self, active: list[int]) -> int:
        return next(b for b in self._batch_buckets if b > active[-1])

    def _length(self, slots: list[_Running | None], active: list[int], lookahead: int) -> int:
        return next(n for n in self._length_buckets if n > max(slots[i].position for i in active) + lookahead)

    def _on_device(self) -> bool:
        """Whether steps feed themselves on the device (sampled tokens -> next inputs), queued ahead."""
        # parallel ranks agree on sampled tokens through a broadcast: they keep the host-side path
        return not self.pp.distributed

    def _stage(self, slots: list[_Running | None], active: list[int]) -> None:
        """Upload each running request's last token and position; free slots below the batch bucket
        decode a dummy token at position 0 of their own (free) cache row, which the next prefill
        overwrites."""
        batch = self._batch(active)
        staged = [[0] * batch, [0] * batch]
        for i in active:
            staged[0][i], staged[1][i] = slots[i].tokens[-1], slots[i].position
        self._inputs[:, :batch].copy_(torch.tensor(staged, dtype=torch.long), non_blocking=True)

    def _launch(self, slots: list[_Running | None], active: list[int], lookahead: int) -> _Step:
        """Queue one decode step over the device-side inputs, its tokens written back as the next step's
        inputs (greedy: inside the step's graph; sampled: by the batched sampler after it); read later."""
        batch = self._batch(active)
        length = self._length(slots, active, lookahead)
        if all(slots[i].request.sampling.temperature == 0 for i in active):
            out = self._decode(batch, length, greedy=True)
        else:
            logits = self._decode(batch, length)
            running = set(active)  # a list's `in` would make this quadratic in the batch on every step
            rows = [slots[i] if i in running else None for i in range(batch)]  # free slots: greedy dummies
            out = sample(
                logits,
                [r.request.sampling if r else _GREEDY for r in rows],
                [r.generator if r else None for r in rows],
            )
            self._inputs[0, :batch].copy_(out)
            self._inputs[1, :batch].add_(1)
        if self.device.type != "cuda":
            return _Step(active, list(slots), out, None)
        host = self._host_tokens[self._host_turn][:batch]
        self._host_turn ^= 1
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Step(active, list(slots), host, done)

    def _sample(self, logits: torch.Tensor | None, running: list[_Running]) -> list[int]:
        """Tokens for ``running`` from their logits rows; ranks without logits (earlier pipeline stages)
        receive them from the sampler."""
        if logits is None:
            tokens = torch.empty(len(running), dtype=torch.long, device=self.device)
        else:
            tokens = sample(logits, [r.request.sampling for r in running], [r.generator for r in running])
        return self.pp.broadcast(tokens.contiguous()).tolist()

    def _decode(self, batch: int, length: int, greedy: bool = False) -> torch.Tensor:
        """Logits ``[batch, vocab]`` for the staged inputs, or with ``greedy`` the argmax tokens ``[batch]``,
        written back as the next step's inputs (positions advanced) without leaving the device."""
        inputs = self._inputs

        def step() -> torch.Tensor:
            logits = self._decode_fn(inputs[0, :batch], inputs[1, :batch], self.cache, length)
            if not greedy:
                return logits
            tokens = torch.argmax(logits, dim=-1)
            inputs[0, :batch].copy_(tokens)
            inputs[1, :batch].add_(1)
            return tokens

        if not self.cuda_graphs:
            return step()
        key = (batch, length, greedy)
        if key not in self._graphs:
            # Warm-up runs on a side stream, as capture requires; the inputs (and the cache rows a greedy
            # step writes) are restored afterwards so capturing changes nothing.
            saved = inputs.clone()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    inputs.copy_(saved)
                    step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            inputs.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = step()
            inputs.copy_(saved)
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _check_vocab(self, token_ids: list[int], what: str) -> None:
        vocab = self.model.spec.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise GenerationLimitError(f"{what}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def _check(self, requests: list[GenerationRequest], concurrency: int | None) -> None:
        if concurrency is not None and not 1 <= concurrency <= self.max_batch_size:
            raise GenerationLimitError(
                f"concurrency {concurrency} is outside 1..max_batch_size "
                f"({self.max_batch_size}) this engine was built for; rebuild with a larger "
                "limits.max_batch_size or lower the concurrency"
            )
        for i, request in enumerate(requests):
            self.check_request(request, f"request {i}")


def _check_sampling(where: str, p: SamplingParams) -> None:
    if p.temperature < 0:
        raise GenerationLimitError(f"{where}: temperature must be >= 0 (0 = greedy), got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise GenerationLimitError(f"{where}: top_p must be in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise GenerationLimitError(f"{where}: top_k must be >= 0 (0 = off), got {p.top_k}")


class Scheduler:
    """In-flight batching over one engine's KV cache, one step at a time: ``add`` / ``step`` / ``cancel``.

    ``step()`` is one iteration of the batching loop: it admits waiting requests into free slots (one
    packed prefill; each emits its first token) unless a greedy step is still in flight, then decodes one
    token for every running request, and returns the tokens produced, in order; the token that ends a
    request carries its ``GenerationResult``. ``on_event`` sees each token as it is produced (a prefill's
    first tokens before the decode runs). ``generate`` is a loop over ``step()``, and sampling is per
    request, so a request added mid-run gets the tokens it would get alone. Not thread-safe: one thread
    owns a scheduler (``kiln serve`` runs it on a dedicated engine thread).
    """

    def __init__(
        self, engine: TorchEngine, concurrency: int, on_event: Callable[[TokenEvent], None] | None = None
    ) -> None:
        self.engine = engine
        self.concurrency = concurrency
        self.on_event = on_event
        self._requests: dict[Hashable, GenerationRequest] = {}
        self._submitted: dict[Hashable, float] = {}
        self._pending: deque = deque()
        self._slots: list[_Running | None] = [None] * engine.max_batch_size
        self._ahead: _Step | None = None  # a greedy decode step launched whose tokens are not read yet
        self._events: list[TokenEvent] = []
        self._next_id = 0

    # -- state ------------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self._pending) or any(s is not None for s in self._slots) or self._ahead is not None

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._pending)

    def cached_tokens(self) -> int:
        """KV cache positions the running requests hold (prompt + generated tokens)."""
        return sum(s.position + 1 for s in self._slots if s is not None)

    # -- requests ---------------------------------------------------------------------------------
    def add(
        self,
        request: GenerationRequest,
        request_id: Hashable | None = None,
        *,
        submitted_at: float | None = None,
        check: bool = True,
    ) -> Hashable:
        """Queue ``request`` (checked against the engine's limits unless ``check=False``); returns its id.

        Token times are measured from ``submitted_at`` (``time.perf_counter()``; default: now)."""
        if request_id is None:  # the next integer no queued or running request uses
            while self._next_id in self._requests:
                self._next_id += 1
            request_id, self._next_id = self._next_id, self._next_id + 1
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already queued or running")
        if check:
            self.engine.check_request(request, f"request {request_id}")
        self._requests[request_id] = request
        self._submitted[request_id] = time.perf_counter() if submitted_at is None else submitted_at
        self._pending.append(request_id)
        return request_id

    def cancel(self, request_id: Hashable) -> bool:
        """Drop a waiting or running request (its slot is free for the next step); False if unknown or
        done."""
        if request_id not in self._requests:
            return False
        if request_id in self._pending:
            self._pending.remove(request_id)
        for slot, running in enumerate(self._slots):
            if running is not None and running.index == request_id:
                self._slots[slot] = None  # a launched step's token for it is dropped: the owner changed
        self._forget(request_id)
        return True

    # -- stepping ---------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Admit and prefill, or decode one token for every running request; the tokens produced, in order."""
        engine, slots = self.engine, self._slots
        self._events = []
        with torch.inference_mode():
            ahead = self._ahead
            if ahead is None:
                engine._admit(self._requests, self._pending, slots, self.concurrency, self._emit)
            active = [i for i, s in enumerate(slots) if s is not None]
            if ahead is None and not active:
                return self._take_events()
            if ahead is None and not engine._on_device():
                engine._stage(slots, active)
                logits = engine._decode(engine._batch(active), engine._length(slots, active, 0))
                if logits is not None:  # None on a pipeline stage before the last
                    contiguous = active == list(range(len(active)))
                    logits = (
                        logits[: len(active)]
                        if contiguous
                        else logits[torch.tensor(active, device=engine.device)]
                    )
                for slot, token in zip(
                    active, engine._sample(logits, [slots[i] for i in active]), strict=True
                ):
                    self._emit(slot, slots[slot], token)
                return self._take_events()
            if ahead is None:
                engine._stage(slots, active)
                ahead = engine._launch(slots, active, lookahead=0)
            # Steps feed themselves on the device (argmax or sampled -> next input), so the following step
            # is queued before this one is read and the GPU never waits for Python. It is queued only
            # when no request can end by length with ``ahead`` and nobody waits to join; a request that
            # ends on a stop token (or is cancelled) meanwhile gets one extra token computed, never emitted.
            following = None
            if (
                ahead.active == active
                and not (self._pending and len(active) < self.concurrency)
                and all(len(slots[i].tokens) + 1 < slots[i].request.sampling.max_new_tokens for i in active)
            ):
                following = engine._launch(slots, active, lookahead=1)
            for slot, token in zip(ahead.active, ahead.tokens(), strict=True):
                if slots[slot] is ahead.owners[slot]:
                    self._emit(slot, slots[slot], token)
            self._ahead = following
        return self._take_events()

    def _emit(self, slot: int, running: _Running, token: int) -> None:
        running.tokens.append(token)
        running.times.append(time.perf_counter() - self._submitted[running.index])
        reason = running.finish_reason()
        result = None
        if reason is not None:
            result = GenerationResult(running.tokens, reason, running.times[0], running.times)
            self._slots[slot] = None
            self._forget(running.index)
        event = TokenEvent(running.index, token, running.times[-1], result)
        self._events.append(event)
        if (
            self.on_event is not None
        ):  # e.g. a prefill's first tokens reach their clients before the decode runs
            self.on_event(event)

    def _forget(self, request_id: Hashable) -> None:
        self._requests.pop(request_id, None)
        self._submitted.pop(request_id, None)

    def _take_events(self) -> list[TokenEvent]:
        events, self._events = self._events, []
        return events
