"""The OpenAI-compatible HTTP API of ``kiln serve`` (FastAPI on uvicorn) over one engine.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (both with ``stream: true``: server-sent events,
one chunk per generated token), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus).
Every response carries ``usage``; a streamed one on its last token's chunk (and, with
``stream_options.include_usage``, on the usage-only chunk OpenAI defines). Refusals say what to change:
400 for a request over the engine's limits (the limit is in the message; prompts are never truncated) or a
field kiln cannot honour, 401 without the API key, 404 for another model name, 413 for a body over the size
limit, 429 with ``Retry-After`` when every slot is busy and the waiting queue is full, 503 with
``Retry-After`` while draining or after an engine failure.

A client that disconnects cancels its request at once (its KV cache slot is free for the next step).
Prompts and completions are logged only with ``log_requests``; the API key never is.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from kiln.engine.base import GenerationRequest, SamplingParams
from kiln.errors import GenerationLimitError
from kiln.serve import schemas as S
from kiln.serve.loop import Aborted, EngineFailed, EngineProcess, QueueFull, RequestAborted, TokenStream, now
from kiln.serve.metrics import ServerMetrics
from kiln.serve.text import TextCodec, TextStream

log = logging.getLogger("kiln.serve")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ENDPOINTS = (*GENERATION_PATHS, "/v1/models", "/health", "/metrics")
RAW_SEND = "kiln.send"
"""Scope key of the server's own ``send`` (what streamed body messages are written with)."""
ARRIVED = "kiln.arrived"
"""Scope key of when the request reached the app (its headers read): what TTFT and submit time start at."""
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeSettings:
    """What one server serves and how it guards itself."""

    model_name: str
    source: str
    """What is served (the engine dir or NAME@ALIAS), shown in /v1/models."""
    api_key: str | None = None
    max_waiting: int = 64
    """Requests admitted beyond max_batch_size to wait for a slot; past it the server answers 429."""
    max_body_bytes: int = 1 << 20
    log_requests: bool = False
    drain_timeout_s: float = 30.0
    batch_wait_s: float = 0.005
    """How long an idle engine may wait for requests that reached the server but are not handed on yet, so
    that a burst is prefilled together (0: never)."""


class ServerState:
    """The engine process, tokenizer, metrics and drain flag the routes share."""

    def __init__(self, engine: EngineProcess, codec: TextCodec, settings: ServeSettings) -> None:
        self.engine, self.codec, self.settings = engine, codec, settings
        self.metrics = ServerMetrics()
        self.loop = engine
        self.draining = False
        self.tokenizer_thread = TokenizerThread()
        self.created = S.now()
        for name in ("max_batch_size", "max_input_len", "max_seq_len"):
            self.metrics.limit.labels(name).set(getattr(engine, name))
        self.metrics.limit.labels("max_waiting").set(settings.max_waiting)

    def start_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.metrics.draining.set(1)
            log.info("draining: %d request(s) in flight finish, new ones get 503", self.loop.in_flight)


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        reject: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}
        self.reject = reject

    def response(self) -> JSONResponse:
        return JSONResponse(
            S.error_body(self.message, self.kind, self.param), status_code=self.status, headers=self.headers
        )


def create_app(engine: EngineProcess, codec: TextCodec, settings: ServeSettings) -> GuardedApp:
    """The ASGI app over a started engine process, which stops with the app's lifespan."""
    state = ServerState(engine, codec, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await state.loop.attach(state.metrics, settings.max_waiting, settings.batch_wait_s)
        try:
            yield
        finally:
            state.loop.abort_all("server stopped")
            state.loop.stop()
            state.tokenizer_thread.close()

    app = FastAPI(title="kiln serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kiln = state

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        if exc.reject:
            state.metrics.rejected.labels(exc.reject).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid_body(state, exc.errors())

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.loop.failure is not None:
            return JSONResponse({"status": "failed", "error": state.loop.failure}, status_code=503)
        if state.draining:
            return JSONResponse(
                {"status": "draining", "in_flight": state.loop.in_flight},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "kiln",
                    "root": settings.source,
                    "max_model_len": engine.max_seq_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: S.CompletionRequest, request: Request) -> Response:
        arrived = request.scope.get(ARRIVED) or now()
        _check_common(state, body)
        prompts = body.prompts()
        if body.stream and len(prompts) != 1:
            raise ApiError(
                400,
                "stream: true takes one prompt; send a batch of prompts without streaming",
                param="prompt",
                reject="invalid",
            )
        encoded = [
            await _tokenized(state, codec.encode_prompt, p, len(p)) if isinstance(p, str) else list(p)
            for p in prompts
        ]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        requests = [
            _engine_request(state, ids, max_tokens, body, "prompt" if len(encoded) == 1 else f"prompt {i}")
            for i, ids in enumerate(encoded)
        ]
        if settings.log_requests:
            log.info("completion request: %s", json.dumps(prompts)[:2000])
        if body.stream:
            return await _stream(state, body, requests[0], arrived, kind="completion")
        return await _complete(state, request, body, requests, arrived, kind="completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Response:
        arrived = request.scope.get(ARRIVED) or now()
        _check_common(state, body)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages", reject="invalid") from None
        try:
            ids = await _tokenized(
                state, codec.encode_chat, messages, sum(len(m["content"]) for m in messages)
            )
        except GenerationLimitError as exc:
            raise ApiError(400, str(exc), param="messages", reject="invalid") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as vLLM: whatever room the context leaves
            max_tokens = max(engine.max_seq_len - len(ids), 1)
        chat_request = _engine_request(state, ids, max_tokens, body, "messages")
        if settings.log_requests:
            log.info("chat request: %s", json.dumps(messages)[:2000])
        if body.stream:
            return await _stream(state, body, chat_request, arrived, kind="chat")
        return await _complete(state, request, body, [chat_request], arrived, kind="chat")

    # the generation routes, called by the guard straight from the body it read: FastAPI's middleware,
    # dependency solving and JSON parse cost several times pydantic's own validation, per request, on the
    # event loop every request of a burst waits on (measured: ~160 us of ~250 us a request holds the loop)
    generation = {
        "/v1/completions": (S.CompletionRequest, completions),
        "/v1/chat/completions": (S.ChatCompletionRequest, chat_completions),
    }
    return _guard(app, state, generation)


def _invalid_body(state: ServerState, errors: list[Any]) -> JSONResponse:
    """The 400 for a body that does not validate, naming the first field at fault."""
    state.metrics.rejected.labels("invalid").inc()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return ApiError(400, f"{where or 'body'}: {first.get('msg')}", param=where or None).response()


Route = tuple[type[BaseModel], Callable[[Any, Request], Awaitable[Response]]]


async def _call_route(
    state: ServerState,
    route: Route,
    body: bytes,
    scope: dict,
    receive: Callable[[], Awaitable[dict]],
    send: Callable[[dict], Awaitable[None]],
) -> None:
    """Validate ``body`` (JSON parsed by pydantic) and answer with the route, errors as FastAPI's handlers
    would."""
    model, handler = route
    try:
        response = await handler(model.model_validate_json(body), Request(scope, receive))
    except ValidationError as exc:
        response = _invalid_body(state, exc.errors())
    except ApiError as exc:
        if exc.reject:
            state.metrics.rejected.labels(exc.reject).inc()
        response = exc.response()
    await response(scope, receive, send)


# -- request handling ---------------------------------------------------------------------------------------


THREAD_CHARS = 256
"""Text this long is tokenized on the server's tokenizer thread, where the Rust tokenizer lets go of the
interpreter lock, so the event loop serves the other requests meanwhile (a 600-character prompt held it
~400 us); shorter text costs less than the hop to the thread (~50 us)."""


async def _tokenized(
    state: ServerState, encode: Callable[[Any], list[int]], text: Any, chars: int
) -> list[int]:
    return encode(text) if chars < THREAD_CHARS else await state.tokenizer_thread.encode(encode, text)


class TokenizerThread:
    """Tokenizes long text off the event loop, on one thread, in batches: what is queued while it works is
    the next batch, and a batch's results reach the loop in one callback, so their requests' submit frames
    go out in one write and one prefill can take them (one at a time, a burst would reach the engine in as
    many waves as the thread has results).

    An encode here and one on the loop share the Rust tokenizer read-only: transformers changes its
    truncation / padding settings only for a call that asks for others, and kiln's never do."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-tokenize")
        self._lock = threading.Lock()
        self._queue: list[tuple[Callable[[Any], list[int]], Any, asyncio.Future]] = []
        self._running = False

    async def encode(self, encode: Callable[[Any], list[int]], text: Any) -> list[int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._queue.append((encode, text, future))
            start, self._running = not self._running, True
        if start:
            self._pool.submit(self._run, loop)
        return await future

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._running = False
                    return
            done = []
            for encode, text, future in batch:
                try:
                    done.append((future, encode(text), None))
                except Exception as exc:  # the request's own error (e.g. no chat template), raised there
                    done.append((future, None, exc))
            loop.call_soon_threadsafe(_settle, done)


def _settle(done: list[tuple[asyncio.Future, Any, Exception | None]]) -> None:
    for future, result, error in done:
        if future.cancelled():  # the client left meanwhile
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _check_common(state: ServerState, body: S._Sampling) -> None:
    if state.loop.failure is not None:
        raise ApiError(
            503,
            f"the engine failed and this server no longer generates: {state.loop.failure}; restart it",
            "server_error",
            headers={"Retry-After": str(RETRY_AFTER_S)},
            reject="failed",
        )
    if body.model is not None and body.model != state.settings.model_name:
        raise ApiError(
            404,
            f"model {body.model!r} is not served here; this server serves "
            f"{state.settings.model_name!r} (GET /v1/models)",
            "not_found_error",
            param="model",
            reject="invalid",
        )
    if (why := body.unsupported()) is not None:
        raise ApiError(400, why, reject="invalid")


@dataclass(frozen=True)
class _Prompt:
    request: GenerationRequest
    where: str
    """How the engine's refusal names it ("prompt", "prompt 2", "messages")."""


def _engine_request(
    state: ServerState, prompt_ids: list[int], max_tokens: int, body: S._Sampling, where: str
) -> _Prompt:
    stop_ids = tuple(body.stop_token_ids or ())
    if not body.ignore_eos:
        stop_ids = tuple(dict.fromkeys((*state.codec.eos_token_ids, *stop_ids)))
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    sampling = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=top_k,
        seed=body.seed,
        stop_token_ids=stop_ids,
    )
    return _Prompt(GenerationRequest(prompt_ids, sampling), where)


async def _submit(state: ServerState, prompts: list[_Prompt], arrived: float) -> list[TokenStream]:
    """Send the prompts to the engine and wait until it admitted them all (the engine checks its own limits:
    a refusal is a 400 naming the limit, and the other prompts of the request are cancelled)."""
    if len(prompts) > 1 and state.loop.in_flight + len(prompts) > state.loop.capacity:
        raise ApiError(
            429,
            f"server busy: {len(prompts)} prompts do not fit the waiting queue now; retry later",
            "rate_limit_error",
            headers={"Retry-After": str(RETRY_AFTER_S)},
            reject="queue_full",
        )
    streams: list[TokenStream] = []
    try:
        for prompt in prompts:
            streams.append(state.loop.submit(prompt.request, arrived, prompt.where))
        for stream in streams:
            await stream.admitted()
    except QueueFull as exc:
        raise ApiError(
            429,
            f"server busy: {exc}",
            "rate_limit_error",
            headers={"Retry-After": str(RETRY_AFTER_S)},
            reject="queue_full",
        ) from None
    except EngineFailed as exc:
        raise ApiError(503, f"the engine failed: {exc}", "server_error", reject="failed") from None
    except GenerationLimitError as exc:
        raise ApiError(
            400, str(exc), param="max_tokens" if "max_seq_len" in str(exc) else None, reject="invalid"
        ) from None
    except RequestAborted as exc:
        raise ApiError(503, f"request aborted: {exc}", "server_error") from None
    finally:
        if not all(stream.is_admitted for stream in streams):
            for stream in streams:  # one refused or the client left: none of them runs
                state.loop.cancel(stream.id)
    return streams


class _AbortedError(Exception):
    pass


async def _generate(state: ServerState, stream: TokenStream, text: TextStream) -> tuple[str, int]:
    """Read one admitted request to its end; returns (finish_reason, completion tokens); cancels it if the
    caller is cancelled."""
    try:
        while True:
            for item in await stream.take():
                if isinstance(item, Aborted):
                    raise _AbortedError(item.reason)
                token_id, reason = item
                text.push(token_id)
                if text.stopped:
                    state.loop.cancel(stream.id, "stop")
                    return "stop", len(text.token_ids)
                if reason is not None:
                    return reason, len(text.token_ids)
    finally:
        state.loop.cancel(stream.id)  # a no-op once it finished


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(
    state: ServerState, http: Request, body: S._Sampling, prompts: list[_Prompt], arrived: float, kind: str
) -> Response:
    texts = [
        state.codec.stream(body.stop_strings(), p.request.sampling.stop_token_ids, incremental=False)
        for p in prompts
    ]
    streams = await _submit(state, prompts, arrived)
    work = asyncio.gather(
        *(_generate(state, stream, text) for stream, text in zip(streams, texts, strict=True))
    )
    gone = asyncio.ensure_future(_until_disconnect(http))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:  # the client left: stop generating for it
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return Response(status_code=499)
        outcomes = work.result()
    except _AbortedError as exc:
        raise ApiError(503, f"request aborted: {exc}", "server_error") from None
    finally:
        gone.cancel()
    prompt_tokens = sum(len(p.request.prompt_token_ids) for p in prompts)
    completion_tokens = sum(n for _, n in outcomes)
    final = [t.final_text for t in texts]
    if state.settings.log_requests:
        log.info("completion: %s", json.dumps(final)[:2000])
    if kind == "chat":
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": final[0]},
                "finish_reason": outcomes[0][0],
                "logprobs": None,
            }
        ]
        return JSONResponse(
            {
                "id": S.new_id("chatcmpl"),
                "object": "chat.completion",
                "created": S.now(),
                "model": state.settings.model_name,
                "choices": choices,
                "usage": S.usage(prompt_tokens, completion_tokens),
            }
        )
    choices = [
        {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
        for i, (text, (reason, _)) in enumerate(zip(final, outcomes, strict=True))
    ]
    return JSONResponse(
        {
            "id": S.new_id("cmpl"),
            "object": "text_completion",
            "created": S.now(),
            "model": state.settings.model_name,
            "choices": choices,
            "usage": S.usage(prompt_tokens, completion_tokens),
        }
    )


async def _stream(
    state: ServerState, body: S._Sampling, prompt: _Prompt, arrived: float, kind: str
) -> Response:
    """Server-sent events, one per generated token; the request is admitted before the 200 goes out (so a full
    queue is a real 429 and a request over the limits a 400) and cancelled when the client goes away. Tokens
    that arrived together (one engine step's, or several when this client fell behind) go out in one write."""
    (stream,) = await _submit(state, [prompt], arrived)
    text = state.codec.stream(body.stop_strings(), prompt.request.sampling.stop_token_ids)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    prompt_tokens = len(prompt.request.prompt_token_ids)
    created, name = S.now(), state.settings.model_name
    chunk_id = S.new_id("chatcmpl" if kind == "chat" else "cmpl")
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    dumps, quote = (
        json.dumps,
        encode_basestring_ascii,
    )  # quote: what json.dumps does to a str, minus its overhead

    def chunk(
        piece: str | None,
        reason: str | None,
        *,
        role: bool = False,
        usage: dict | None = None,
        choices: bool = True,
    ) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": piece}
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": piece, "finish_reason": reason, "logprobs": None}
        data = {
            "id": chunk_id,
            "object": obj,
            "created": created,
            "model": name,
            "choices": [choice] if choices else [],
            "usage": usage,
        }
        return f"data: {dumps(data)}\n\n"

    # every chunk but the last differs only in its text: the JSON around it is rendered once (the per-token
    # path)
    before, after = chunk("\0", None).split(quote("\0"))

    async def produce(write: Callable[[bytes], Awaitable[None]]) -> None:
        finished = False
        try:
            if kind == "chat":
                await write(chunk(None, None, role=True).encode())
            while not finished:
                out = []
                for item in await stream.take():
                    if isinstance(item, Aborted):
                        finished = True
                        out.append(
                            "data: "
                            f"{dumps(S.error_body(f'request aborted: {item.reason}', 'server_error'))}\n\n"
                        )
                        break
                    token_id, reason = item
                    piece = text.push(token_id)
                    if text.stopped:
                        reason = "stop"
                    if reason is None:
                        out.append(before + quote(piece) + after)
                        continue
                    finished = True
                    if text.stopped:
                        state.loop.cancel(stream.id, "stop")
                    piece += text.finish()
                    usage = S.usage(prompt_tokens, len(text.token_ids))
                    out.append(chunk(piece, reason, usage=usage))
                    if include_usage:
                        out.append(chunk(None, None, usage=usage, choices=False))
                    if state.settings.log_requests:
                        log.info("completion: %s", dumps(text.final_text)[:2000])
                    break
                if finished:
                    out.append("data: [DONE]\n\n")
                await write("".join(out).encode())
        finally:
            if not finished:  # the client went away (or the server stopped)
                state.loop.cancel(stream.id)

    return _EventStream(produce)


class _EventStream(Response):
    """A ``text/event-stream`` response written by ``produce(write)``; the client going away cancels it.

    Cheaper per event than StreamingResponse: ``produce`` runs as a task of its own, so waking it for a
    token resumes two frames rather than the whole ASGI middleware stack, and its writes go straight to the
    server's ``send`` (the guard puts it in the scope; the middleware between only watches the start
    message, which takes the usual way). One ``write`` is one body message, however many events it carries."""

    media_type = "text/event-stream"

    def __init__(self, produce: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]) -> None:
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._produce = produce

    async def __call__(
        self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
    ) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body_send = scope.get(RAW_SEND, send)

        async def write(data: bytes) -> None:
            await body_send({"type": "http.response.body", "body": data, "more_body": True})

        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        producer, watcher = asyncio.ensure_future(self._produce(write)), asyncio.ensure_future(gone())
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not producer.done():  # the client left (or the server is stopping): stop generating
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
        if not producer.cancelled():
            producer.result()  # its error, if any, is the response's
            await body_send({"type": "http.response.body", "body": b"", "more_body": False})


# -- the guard: auth, body size, drain, per-endpoint status counts -------------------------------------------

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class GuardedApp:
    """The ASGI app ``kiln serve`` runs: the FastAPI routes behind the guard; ``state`` is what they share."""

    def __init__(self, asgi: ASGIApp, state: ServerState, routes: FastAPI) -> None:
        self._asgi, self.state, self.routes = asgi, state, routes

    async def __call__(
        self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
    ) -> None:
        await self._asgi(scope, receive, send)


def _guard(app: FastAPI, state: ServerState, generation: dict[str, Route]) -> GuardedApp:
    """Wrap the app: count every response, demand the API key, bound the body, refuse new work while
    draining; hand a generation request's body to its route directly (``generation``)."""
    settings = state.settings
    key = settings.api_key.encode() if settings.api_key else None

    async def reply(
        send: Callable[[dict], Awaitable[None]],
        status: int,
        message: str,
        kind: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        payload = json.dumps(S.error_body(message, kind)).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})

    async def guarded(
        scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
    ) -> None:
        arrived = now()
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        scope[ARRIVED] = arrived
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status_seen: list[int] = []

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
            await send(message)

        scope[RAW_SEND] = send
        generation = path in GENERATION_PATHS and scope.get("method") == "POST"
        if generation:
            state.loop.expect(arrived)
        try:
            await _guarded(scope, receive, counting_send, path)
        finally:
            if generation:
                state.loop.forget(arrived)  # refused before it was submitted: not coming after all
            state.metrics.requests.labels(endpoint, str(status_seen[0] if status_seen else 499)).inc()

    async def _guarded(
        scope: dict,
        receive: Callable[[], Awaitable[dict]],
        send: Callable[[dict], Awaitable[None]],
        path: str,
    ) -> None:
        if key is not None and path != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)):
                state.metrics.rejected.labels("unauthorized").inc()
                await reply(
                    send,
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    "authentication_error",
                    {"WWW-Authenticate": "Bearer"},
                )
                return
        if scope.get("method") == "POST":
            if state.draining:
                state.metrics.rejected.labels("draining").inc()
                await reply(
                    send,
                    503,
                    "server is draining (shutting down): retry on another replica",
                    "server_error",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
                return
            body = await _read_body(scope, receive, settings.max_body_bytes)
            if body is None:
                state.metrics.rejected.labels("too_large").inc()
                await reply(
                    send,
                    413,
                    f"request body over the server's limit of {settings.max_body_bytes} bytes "
                    "(--max-body-bytes)",
                    "invalid_request_error",
                )
                return
            receive = _replay(body, receive)
            if (route := generation.get(path)) is not None:
                await _call_route(state, route, body, scope, receive, send)
                return
        await app(scope, receive, send)

    return GuardedApp(guarded, state, app)


async def _read_body(scope: dict, receive: Callable[[], Awaitable[dict]], limit: int) -> bytes | None:
    """The whole request body, or None as soon as it is known to exceed ``limit`` bytes."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    """A receive that yields the body already read, then the connection's own messages (disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
