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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kiln.engine.base import GenerationRequest, SamplingParams, StreamingEngine, TokenEvent
from kiln.errors import GenerationLimitError
from kiln.serve import schemas as S
from kiln.serve.loop import Aborted, EngineFailed, EngineLoop, QueueFull, now
from kiln.serve.metrics import ServerMetrics
from kiln.serve.text import TextCodec, TextStream

log = logging.getLogger("kiln.serve")

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
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


class ServerState:
    """The engine loop, tokenizer, metrics and drain flag the routes share."""

    def __init__(self, engine: StreamingEngine, codec: TextCodec, settings: ServeSettings) -> None:
        self.engine, self.codec, self.settings = engine, codec, settings
        self.metrics = ServerMetrics()
        self.loop = EngineLoop(engine, self.metrics, settings.max_waiting)
        self.draining = False
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

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *,
                 param: str | None = None, headers: dict[str, str] | None = None, reject: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}
        self.reject = reject

    def response(self) -> JSONResponse:
        return JSONResponse(S.error_body(self.message, self.kind, self.param), status_code=self.status,
                            headers=self.headers)


def create_app(engine: StreamingEngine, codec: TextCodec, settings: ServeSettings) -> GuardedApp:
    """The ASGI app; the engine thread starts and stops with the app's lifespan."""
    state = ServerState(engine, codec, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            state.loop.abort_all("server stopped")
            state.loop.stop()

    app = FastAPI(title="kiln serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kiln = state

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        if exc.reject:
            state.metrics.rejected.labels(exc.reject).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        state.metrics.rejected.labels("invalid").inc()
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return ApiError(400, f"{where or 'body'}: {first.get('msg')}", param=where or None).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.loop.failure is not None:
            return JSONResponse({"status": "failed", "error": state.loop.failure}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining", "in_flight": state.loop.in_flight}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": state.created, "owned_by": "kiln",
            "root": settings.source, "max_model_len": engine.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: S.CompletionRequest, request: Request) -> Response:
        arrived = now()
        _check_common(state, body)
        prompts = body.prompts()
        if body.stream and len(prompts) != 1:
            raise ApiError(400, "stream: true takes one prompt; send a batch of prompts without streaming",
                           param="prompt", reject="invalid")
        encoded = [codec.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompts]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        requests = [_engine_request(state, ids, max_tokens, body, "prompt" if len(encoded) == 1 else f"prompt {i}")
                    for i, ids in enumerate(encoded)]
        if settings.log_requests:
            log.info("completion request: %s", json.dumps(prompts)[:2000])
        if body.stream:
            return _stream(state, body, requests[0], arrived, kind="completion")
        return await _complete(state, request, body, requests, arrived, kind="completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Response:
        arrived = now()
        _check_common(state, body)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages", reject="invalid") from None
        try:
            ids = codec.encode_chat(messages)
        except GenerationLimitError as exc:
            raise ApiError(400, str(exc), param="messages", reject="invalid") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as vLLM: whatever room the context leaves
            max_tokens = max(engine.max_seq_len - len(ids), 1)
        chat_request = _engine_request(state, ids, max_tokens, body, "messages")
        if settings.log_requests:
            log.info("chat request: %s", json.dumps(messages)[:2000])
        if body.stream:
            return _stream(state, body, chat_request, arrived, kind="chat")
        return await _complete(state, request, body, [chat_request], arrived, kind="chat")

    return _guard(app, state)


# -- request handling ---------------------------------------------------------------------------------------


def _check_common(state: ServerState, body: S._Sampling) -> None:
    if state.loop.failure is not None:
        raise ApiError(503, f"the engine failed and this server no longer generates: {state.loop.failure}; "
                       "restart it", "server_error", headers={"Retry-After": str(RETRY_AFTER_S)}, reject="failed")
    if body.model is not None and body.model != state.settings.model_name:
        raise ApiError(404, f"model {body.model!r} is not served here; this server serves "
                       f"{state.settings.model_name!r} (GET /v1/models)", "not_found_error", param="model",
                       reject="invalid")
    if (why := body.unsupported()) is not None:
        raise ApiError(400, why, reject="invalid")


def _engine_request(state: ServerState, prompt_ids: list[int], max_tokens: int, body: S._Sampling,
                    where: str) -> GenerationRequest:
    stop_ids = tuple(body.stop_token_ids or ())
    if not body.ignore_eos:
        stop_ids = tuple(dict.fromkeys((*state.codec.eos_token_ids, *stop_ids)))
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    sampling = SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, seed=body.seed,
                              stop_token_ids=stop_ids)
    request = GenerationRequest(prompt_ids, sampling)
    try:
        state.engine.check_request(request, where)
    except GenerationLimitError as exc:
        raise ApiError(400, str(exc), param="max_tokens" if "max_seq_len" in str(exc) else None,
                       reject="invalid") from None
    return request


def _submit(state: ServerState, request: GenerationRequest, arrived: float) -> tuple[int, asyncio.Queue]:
    try:
        return state.loop.submit(request, arrived)
    except QueueFull as exc:
        raise ApiError(429, f"server busy: {exc}", "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)},
                       reject="queue_full") from None
    except EngineFailed as exc:
        raise ApiError(503, f"the engine failed: {exc}", "server_error", reject="failed") from None


class _AbortedError(Exception):
    pass


async def _next_event(queue: asyncio.Queue) -> TokenEvent:
    item = await queue.get()
    if isinstance(item, Aborted):
        raise _AbortedError(item.reason)
    return item


async def _generate(state: ServerState, request_id: int, queue: asyncio.Queue, stream: TextStream) -> tuple[str, int]:
    """Read one submitted request to its end; returns (finish_reason, completion tokens); cancels it if the
    caller is cancelled."""
    try:
        while True:
            event = await _next_event(queue)
            stream.push(event.token_id)
            if stream.stopped:
                state.loop.cancel(request_id, "stop")
                return "stop", len(stream.token_ids)
            if event.result is not None:
                return event.result.finish_reason, len(stream.token_ids)
    finally:
        state.loop.cancel(request_id)  # a no-op once it finished


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(state: ServerState, http: Request, body: S._Sampling, requests: list[GenerationRequest],
                    arrived: float, kind: str) -> Response:
    streams = [state.codec.stream(body.stop_strings(), r.sampling.stop_token_ids, incremental=False) for r in requests]
    if len(requests) > 1 and state.loop.in_flight + len(requests) > state.loop.capacity:
        raise ApiError(429, f"server busy: {len(requests)} prompts do not fit the waiting queue now; retry later",
                       "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)}, reject="queue_full")
    submitted = [_submit(state, r, arrived) for r in requests]
    work = asyncio.gather(*(_generate(state, request_id, queue, s)
                            for (request_id, queue), s in zip(submitted, streams, strict=True)))
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
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    completion_tokens = sum(n for _, n in outcomes)
    texts = [s.final_text for s in streams]
    if state.settings.log_requests:
        log.info("completion: %s", json.dumps(texts)[:2000])
    if kind == "chat":
        choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                    "finish_reason": outcomes[0][0], "logprobs": None}]
        return JSONResponse({"id": S.new_id("chatcmpl"), "object": "chat.completion", "created": S.now(),
                             "model": state.settings.model_name, "choices": choices,
                             "usage": S.usage(prompt_tokens, completion_tokens)})
    choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
               for i, (text, (reason, _)) in enumerate(zip(texts, outcomes, strict=True))]
    return JSONResponse({"id": S.new_id("cmpl"), "object": "text_completion", "created": S.now(),
                         "model": state.settings.model_name, "choices": choices,
                         "usage": S.usage(prompt_tokens, completion_tokens)})


def _stream(state: ServerState, body: S._Sampling, request: GenerationRequest, arrived: float, kind: str) -> Response:
    """Server-sent events, one chunk per generated token; the request is submitted before the 200 goes out
    (so a full queue is a real 429) and cancelled when the client goes away."""
    request_id, queue = _submit(state, request, arrived)
    stream = state.codec.stream(body.stop_strings(), request.sampling.stop_token_ids)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    prompt_tokens = len(request.prompt_token_ids)
    created, name = S.now(), state.settings.model_name
    chunk_id = S.new_id("chatcmpl" if kind == "chat" else "cmpl")
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, reason: str | None, *, role: bool = False, usage: dict | None = None,
              choices: bool = True) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        data = {"id": chunk_id, "object": obj, "created": created, "model": name,
                "choices": [choice] if choices else [], "usage": usage}
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        finished = False
        try:
            if kind == "chat":
                yield chunk(None, None, role=True)
            while True:
                try:
                    event = await _next_event(queue)
                except _AbortedError as exc:
                    finished = True
                    yield f"data: {json.dumps(S.error_body(f'request aborted: {exc}', 'server_error'))}\n\n"
                    break
                piece = stream.push(event.token_id)
                reason = "stop" if stream.stopped else (event.result.finish_reason if event.result else None)
                if reason is not None:
                    finished = True
                    if stream.stopped:
                        state.loop.cancel(request_id, "stop")
                    piece += stream.finish()
                    usage = S.usage(prompt_tokens, len(stream.token_ids))
                    yield chunk(piece, reason, usage=usage)
                    if include_usage:
                        yield chunk(None, None, usage=usage, choices=False)
                    if state.settings.log_requests:
                        log.info("completion: %s", json.dumps(stream.final_text)[:2000])
                    break
                yield chunk(piece, None)
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (Starlette cancels us on http.disconnect)
                state.loop.cancel(request_id)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- the guard: auth, body size, drain, per-endpoint status counts -----------------------------------------------

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class GuardedApp:
    """The ASGI app ``kiln serve`` runs: the FastAPI routes behind the guard; ``state`` is what they share."""

    def __init__(self, asgi: ASGIApp, state: ServerState, routes: FastAPI) -> None:
        self._asgi, self.state, self.routes = asgi, state, routes

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        await self._asgi(scope, receive, send)


def _guard(app: FastAPI, state: ServerState) -> GuardedApp:
    """Wrap the app: count every response, demand the API key, bound the body, refuse new work while draining."""
    settings = state.settings
    key = settings.api_key.encode() if settings.api_key else None

    async def reply(send: Callable[[dict], Awaitable[None]], status: int, message: str, kind: str,
                    headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(S.error_body(message, kind)).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})

    async def guarded(scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status_seen: list[int] = []

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
            await send(message)

        try:
            await _guarded(scope, receive, counting_send, path)
        finally:
            state.metrics.requests.labels(endpoint, str(status_seen[0] if status_seen else 499)).inc()

    async def _guarded(scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]],
                       path: str) -> None:
        if key is not None and path != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)):
                state.metrics.rejected.labels("unauthorized").inc()
                await reply(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                            "authentication_error", {"WWW-Authenticate": "Bearer"})
                return
        if scope.get("method") == "POST":
            if state.draining:
                state.metrics.rejected.labels("draining").inc()
                await reply(send, 503, "server is draining (shutting down): retry on another replica",
                            "server_error", {"Retry-After": str(RETRY_AFTER_S)})
                return
            body = await _read_body(scope, receive, settings.max_body_bytes)
            if body is None:
                state.metrics.rejected.labels("too_large").inc()
                await reply(send, 413, f"request body over the server's limit of {settings.max_body_bytes} bytes "
                            "(--max-body-bytes)", "invalid_request_error")
                return
            receive = _replay(body, receive)
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

