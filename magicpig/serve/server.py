"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) on the engine.

    app = build_app(Engine("smollm2-135m-instruct"), "smollm2-135m-instruct")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``POST /v1/completions`` (text or token ids, no chat template), ``POST
/v1/chat/completions`` (messages through the model's chat template), both streamed as
server-sent events when ``stream`` is true; ``GET /v1/models``, ``GET /health``, ``GET
/metrics``, ``POST /reset_prefix_cache``. Every error is OpenAI's error JSON with its status: 400 invalid or unsupported
fields and too-long prompts, 401 API key, 404 unknown model or route, 405 wrong method (with
``Allow``), 408 a body that does not arrive in time, 413 body too large, 500 a request whose
work failed in the engine, 503 full or shutting down (with ``Retry-After``). A client that goes
away aborts its request, which frees its memory.

No client can stall the others: prompts are tokenised off the engine thread and refused by
length before tokenising where the bound is certain, stop strings are bounded and searched in
time independent of their number, the API key is checked before a body is read, and slow
senders time out (``timeouts.py``). On SIGTERM the server stops admitting, lets running
requests finish for ``shutdown_timeout`` seconds, then ends the rest with an error JSON or an
SSE error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from magicpig.config import check_float, check_int
from magicpig.core.sampling_params import SamplingParams
from magicpig.serve.async_engine import (
    AsyncEngine, EngineDeadError, QueueFullError, RequestFailedError, RequestStream, ShuttingDownError,
)
from magicpig.engine.engine import Engine
from magicpig.serve.metrics import CONTENT_TYPE, ServerMetrics
from magicpig.serve.protocol import (
    AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, CompletionChoice,
    CompletionRequest, CompletionResponse, ErrorInfo, ErrorResponse, ModelCard, ModelList, PromptTokensDetails,
    UsageInfo,
    _Sampling, finish_reason, new_id,
)
from magicpig.engine.engine import RequestOutput
from magicpig.serve.timeouts import DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, BodyReadTimeout, http_protocol

# The body is parsed on the event loop, and json.loads holds the GIL: ~30 ms per MB of many
# small strings here, during which every other client waits. So the default limit follows the
# context limit instead of being one large number: 64 bytes per position covers a prompt's
# JSON (about 5 bytes a token as text, 7 as token ids, up to ~30 with every character escaped),
# and no body under 1 MiB is refused.
BODY_BYTES_PER_POSITION = 64
MIN_MAX_BODY_BYTES = 1 << 20
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
RETRY_AFTER_S = 1  # what a 503 tells a client to wait before trying again
_DISCONNECT_POLL_S = 0.25
_OPEN_PATHS = ("/health", "/metrics")  # no API key: probes and scrapers, as in vLLM


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = dict(headers or {})
        if status == 503:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code if self.code is not None else self.status)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _engine_error(err: Exception) -> APIError:
    """The API error for what a running request can end with."""
    if isinstance(err, ShuttingDownError):
        return APIError(503, str(err), "server_error", code="server_shutting_down")
    if isinstance(err, RequestFailedError):
        return APIError(500, str(err), "server_error", code="request_failed")
    return APIError(500, str(err), "server_error")


class ServerState:
    def __init__(self, engine: Engine, served_model: str, max_waiting: int, shutdown_timeout: float):
        self.metrics = ServerMetrics(lambda: self.engine.snapshot)
        self.engine = AsyncEngine(engine, max_waiting, on_finish=self.metrics.request_finished)
        self.served_model = served_model
        self.shutdown_timeout = shutdown_timeout


def build_app(engine: Engine, served_model: str, api_key: Optional[str] = None, max_waiting: int = 256,
              max_body_bytes: Optional[int] = None, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
              body_timeout: float = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    """The FastAPI app serving ``engine`` under the name ``served_model``. The engine thread
    starts with the app's lifespan and stops (aborting what runs) when the app shuts down;
    served by :class:`GracefulServer`, a shutdown first drains for ``shutdown_timeout`` s.
    ``max_body_bytes`` None: :func:`default_max_body_bytes` of the engine's context limit."""
    check_int("max_waiting", max_waiting, 0)
    state = ServerState(engine, served_model, max_waiting, check_float("shutdown_timeout", shutdown_timeout, 0, 86400))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        try:
            yield
        finally:
            state.engine.stop()

    app = FastAPI(title="magicpig", version=_version(), lifespan=lifespan)
    app.state.magicpig = state
    _add_error_handlers(app)
    # Outermost last: the key is checked before any body byte is read, then the size and the
    # time the body may take.
    limit = default_max_body_bytes(engine.max_model_len) if max_body_bytes is None else \
        check_int("max_body_bytes", max_body_bytes, 1)
    app.add_middleware(BodySizeLimit, max_bytes=limit)
    app.add_middleware(BodyReadTimeout, timeout=body_timeout)
    app.add_middleware(APIKeyCheck, api_key=api_key)
    _add_routes(app, state)
    app.openapi = lambda: _openapi(app, served_model)
    return app


def default_max_body_bytes(max_model_len: int) -> int:
    """The largest body a server with this context limit takes by default (see
    ``BODY_BYTES_PER_POSITION``): 1 MiB at SmolLM2's 8k, 8 MiB at 128k."""
    return max(MIN_MAX_BODY_BYTES, BODY_BYTES_PER_POSITION * max_model_len)


def _openapi(app: FastAPI, served_model: str) -> dict:
    """FastAPI's schema, with the one valid ``model`` name written into the request bodies (any
    other name is a 404 at run time, so clients and fuzzers learn the name from the schema)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            prop = schema["components"]["schemas"][name]["properties"]["model"]
            prop["enum"], prop["examples"] = [served_model], [served_model]
        app.openapi_schema = schema
    return app.openapi_schema


def _version() -> str:
    import magicpig

    return magicpig.__version__


# --------------------------------------------------------------------------- errors
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return APIError(400, _validation_message(err.errors()), param=_first_param(err.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), type_, headers=err.headers).response()  # 405: Allow


def _validation_message(errors: Any) -> str:
    parts = []
    for e in errors:
        if e.get("type") == "json_invalid":
            return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}"
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request body"


def _first_param(errors: Any) -> Optional[str]:
    for e in errors:
        if e.get("type") == "json_invalid":
            return None
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if loc:
            return ".".join(loc)
    return None


class BodySizeLimit:
    """413 for a request body over ``max_bytes``, by its Content-Length or, when chunked, as it
    arrives (the body is read up to the limit and handed on)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        err = APIError(413, f"request body is larger than the limit of {self.max_bytes} bytes")
        await err.response()(scope, receive, send)


class APIKeyCheck:
    """401 for a request without the API key, on every path but /health and /metrics (the docs
    and the schema included), before its body is read: a client without the key cannot make
    the server parse anything."""

    def __init__(self, app: Any, api_key: Optional[str]):
        self.app, self.key = app, api_key.encode() if api_key is not None else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.key is None or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        token = header[7:] if header[:7].lower() == b"bearer " else b""
        if not token or not secrets.compare_digest(token, self.key):
            err = APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")
            return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- routes
_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in [
    (400, "invalid or unsupported field, prompt too long"), (401, "missing or wrong API key"),
    (404, "unknown model"), (408, "the body did not arrive in time"), (413, "body too large"),
    (500, "the request failed in the engine"), (503, "full or shutting down (see Retry-After)")]}
# With ``stream: true`` the 200 is server-sent events (the JSON body otherwise); the schema is
# one event's: its data is a chunk's JSON, an error's JSON, or [DONE].
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
_RESPONSES = {200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
                    "description": "the completion: JSON, or server-sent events when streamed"}, **_ERRORS}


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", responses={503: {"model": ErrorResponse, "description": "the engine stopped"}})
    async def health() -> Response:
        if not state.engine.alive:
            raise APIError(503, f"engine stopped: {state.engine.error!r}", "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/reset_prefix_cache", responses={401: _ERRORS[401]})
    async def reset_prefix_cache() -> Response:
        """Evict every cached prefix no running request uses (vLLM's route of the same name):
        their device blocks and CPU-store bytes are free again."""
        return JSONResponse({"evicted": await state.engine.reset_prefix_cache()})

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]})
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.served_model, max_model_len=state.engine.engine.max_model_len)])

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _serve(state, request, body, body.prompt, chat=False, max_tokens=body.max_tokens)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await _serve(state, request, body, body.chat_messages(), chat=True, max_tokens=body.token_limit())


async def _serve(state: ServerState, request: Request, body: _Sampling, prompt: Any, chat: bool,
                 max_tokens: Optional[int]) -> Response:
    """Check the body, add the request, answer as one JSON or as an event stream."""
    started = time.perf_counter()
    if body.model != state.served_model:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {state.served_model!r}",
                       code="model_not_found", param="model")
    bad = body.unsupported()
    if bad:
        raise APIError(400, "unsupported by this server: " + ", ".join(text for _, text in bad), param=bad[0][0])
    if body.stream_options is not None and not body.stream:  # checked before the engine gets the request
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
    request_id = new_id("chatcmpl" if chat else "cmpl")
    # Off the event loop: 64 stop strings of 1,024 characters take ~0.1 s to build into an automaton.
    params = await asyncio.to_thread(_sampling_params, body, max_tokens)
    stream = await _start(state, request_id, prompt, chat, params, max_tokens)
    tracker = _Tracker(state.metrics, started)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _event_stream(stream, tracker, body.model, request_id, chat, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    return await _collect(stream, tracker, request, body.model, request_id, chat)


def _sampling_params(body: _Sampling, max_tokens: Optional[int]) -> SamplingParams:
    try:
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                              seed=body.seed, max_new_tokens=max_tokens or 1, stop=body.stop)
    except (TypeError, ValueError) as err:
        raise APIError(400, str(err)) from err


async def _start(state: ServerState, request_id: str, prompt: Any, chat: bool, params: SamplingParams,
                 max_tokens: Optional[int]) -> RequestStream:
    try:
        stream = await state.engine.add(request_id, prompt, chat, params, max_tokens)
    except QueueFullError as err:
        raise APIError(503, str(err), "server_overloaded", code="queue_full") from err
    except ShuttingDownError as err:
        raise _engine_error(err) from err
    except (ValueError, TypeError) as err:  # the prompt is too long, or not a prompt
        param = ("messages" if chat else "prompt") if "prompt" in str(err) else None
        raise APIError(400, str(err), param=param) from err
    except EngineDeadError as err:
        raise APIError(500, str(err), "server_error") from err
    state.metrics.prompt_tokens.inc(stream.prompt_tokens)
    return stream


class _Tracker:
    """Feeds one request's outputs into the latency histograms and token counters."""

    def __init__(self, metrics: ServerMetrics, started: float):
        self.metrics, self.started = metrics, started
        self.last: Optional[float] = None
        self.tokens = 0
        self.cached_tokens = 0

    def seen(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        self.cached_tokens = out.num_cached_tokens
        if out.new_token_ids:
            if self.last is None:
                self.metrics.ttft.observe(now - self.started)
            else:
                self.metrics.itl.observe(now - self.last)
            self.last = now
            self.tokens += len(out.new_token_ids)
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
        if out.finished:
            self.metrics.e2e.observe(now - self.started)


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (polled: ASGI tells only when asked)."""
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)


def _usage(stream: RequestStream, tracker: _Tracker) -> UsageInfo:
    return UsageInfo(prompt_tokens=stream.prompt_tokens, completion_tokens=tracker.tokens,
                     total_tokens=stream.prompt_tokens + tracker.tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=tracker.cached_tokens))


async def _collect(stream: RequestStream, tracker: _Tracker, request: Request, model: str, request_id: str,
                   chat: bool) -> Response:
    """Wait for the whole output, watching for a client that goes away (then abort)."""
    text, reason = [], None
    watcher = asyncio.ensure_future(_client_gone(request))
    pending = asyncio.ensure_future(stream.get())
    try:
        while True:
            done, _ = await asyncio.wait({pending, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                return Response(status_code=499)  # nobody reads it; the abort below frees the memory
            out = pending.result()
            tracker.seen(out)
            text.append(out.new_text)
            if out.finished:
                reason = finish_reason(out.finish_reason)
                break
            pending = asyncio.ensure_future(stream.get())
    except (EngineDeadError, RequestFailedError, ShuttingDownError) as err:
        raise _engine_error(err) from err
    finally:
        for task in (pending, watcher):
            task.cancel()
        stream.abort()
    usage = _usage(stream, tracker)
    if chat:
        choice = ChatChoice(message=AssistantMessage(content="".join(text)), finish_reason=reason)
        return JSONResponse(ChatCompletionResponse(id=request_id, model=model, choices=[choice], usage=usage).model_dump())
    choice = CompletionChoice(text="".join(text), finish_reason=reason)
    return JSONResponse(CompletionResponse(id=request_id, model=model, choices=[choice], usage=usage).model_dump())


async def _event_stream(stream: RequestStream, tracker: _Tracker, model: str, request_id: str, chat: bool,
                        include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per output with text (chat: a first chunk with the role),
    a last chunk with the finish reason, the usage chunk when asked, then [DONE]. Cancelled
    when the client goes away; the abort in ``finally`` frees the request's memory."""
    created = int(time.time())
    chunk = _chat_chunk if chat else _completion_chunk
    try:
        if chat:
            yield _sse(chunk(request_id, model, created, {"role": "assistant", "content": ""}, None))
        async for out in stream:
            tracker.seen(out)
            reason = finish_reason(out.finish_reason) if out.finished else None
            if out.new_text or reason:
                delta: Any = ({"content": out.new_text} if out.new_text else {}) if chat else out.new_text
                yield _sse(chunk(request_id, model, created, delta, reason))
        if include_usage:
            usage = _usage(stream, tracker).model_dump()
            yield _sse({"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created, "model": model, "choices": [], "usage": usage})
    except (EngineDeadError, RequestFailedError, ShuttingDownError) as err:
        # The status line went out with the first chunk: the error travels as an event.
        yield _sse(_engine_error(err).body())
    finally:
        stream.abort()
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _completion_chunk(rid: str, model: str, created: int, text: str, reason: Optional[str]) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}


def _chat_chunk(rid: str, model: str, created: int, delta: dict, reason: Optional[str]) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


# ---------------------------------------------------------------------- running it
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one); binding here, before uvicorn starts, means
    no other process can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn's server whose shutdown (SIGTERM, Ctrl-C, ``should_exit``) first drains the
    engine: stop accepting, let running requests finish for the app's ``shutdown_timeout``,
    end the rest with an error each client sees, then uvicorn's own shutdown. A request's headers
    must be complete within ``header_timeout`` seconds of its first byte (or of the connection
    opening)."""

    def __init__(self, app: FastAPI, header_timeout: float = DEFAULT_HEADER_TIMEOUT, log_level: str = "info"):
        self.state: ServerState = app.state.magicpig
        # After the drain every response is written or ended: a few seconds to flush them.
        super().__init__(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                                        http=http_protocol(header_timeout)))

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        for server in self.servers:  # stop accepting before the grace period starts
            server.close()
        for sock in sockets or []:
            sock.close()
        await self.state.engine.drain(self.state.shutdown_timeout)
        await super().shutdown(sockets)


class BackgroundServer:
    """uvicorn serving ``app`` from a thread (tests, notebooks): ``with BackgroundServer(app)
    as server: server.url``. Leaving the block shuts it down (draining) and stops the engine."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT):
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = GracefulServer(app, header_timeout, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def serve(engine: Engine, served_model: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: Optional[str] = None, max_waiting: int = 256,
          max_body_bytes: Optional[int] = None, log_level: str = "info",
          shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
    """Serve until SIGTERM or Ctrl-C, then shut down gracefully (see :class:`GracefulServer`)."""
    app = build_app(engine, served_model, api_key, max_waiting, max_body_bytes, shutdown_timeout)
    sock = bind_socket(host, port)
    print(f"magicpig serve: {served_model} on http://{host}:{sock.getsockname()[1]}/v1 (Ctrl-C stops)", flush=True)
    GracefulServer(app, log_level=log_level).run(sockets=[sock])
