"""The OpenAI-compatible HTTP app: `create_app(model, ...) -> FastAPI`, served by uvicorn (phi_fast serve) or
mounted elsewhere as it is (every route's logic lives here, none in the CLI).

    POST /v1/chat/completions   messages (text and image_url parts) in the phi-2_v0 template; stream, n, logprobs
    POST /v1/completions        a raw text prompt (no template)
    GET  /v1/models             the one served model
    GET  /health                200 while the engine loop answers, else 503
    GET  /metrics               Prometheus text (phi_fast.serving.metrics)

How a request flows: the body is read (413 over `max_body_bytes`) and checked (protocol.py: 400 naming the
field), its images fetched (media.py: 400 / 413), the waiting queue checked (503 with Retry-After), then the
requests are built and queued by `Model.submit` in a worker thread (tokenizing and preprocessing stay off the
event loop). The engine thread wakes this request's asyncio.Event whenever its handles have news
(`on_update`); the route drains the handles' events (text deltas with the token count at that moment, so each
chunk carries the logprobs of its own tokens). A client that goes away (noticed by a task waiting on the
ASGI `http.disconnect` message, streaming or not) aborts its requests, which frees their pages.

Errors are OpenAI error objects: 400 bad JSON / field / image / prompt past the context, 401 missing or wrong
API key (constant-time compare; /health and /metrics stay open), 404 unknown model or route, 413, 503; an
unexpected exception is logged and answered 500 without its details. The queue limit is a soft one: it is
checked against the engine loop's counts just before queueing, so simultaneous arrivals can pass it together.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..api import Model
from ..engine import Request as EngineRequest
from ..engine_loop import DONE, EngineLoopClosed, Event, RequestHandle
from .media import MediaError, MediaPolicy, fetch_image
from .metrics import Metrics
from .protocol import (APIError, ChatRequest, GenerationRequest, bad, finish_reason, new_id, now, parse_chat,
                       parse_completion, usage)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 2**20  # a 20 MiB image as a base64 data: URL, with room to spare
DEFAULT_MAX_WAITING = 256
ENGINE_CALL_TIMEOUT_S = 30.0  # a /health or /metrics read waits at most this long for the engine thread
RETRY_AFTER_S = 1
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


def create_app(model: Model, *, api_key: str | None = None, served_model_name: str | None = None,
               max_waiting: int = DEFAULT_MAX_WAITING, media_policy: MediaPolicy | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app serving `model` (which it does not own: whoever made the model closes it after the server).

    api_key: required as "Authorization: Bearer KEY" on /v1 routes (None: open). served_model_name: the model id
    clients send and /v1/models lists (default: the checkpoint folder's name). max_waiting: requests that may
    wait for a batch slot before new ones get 503. media_policy: where image_url parts may be fetched from.
    """
    if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
        raise ValueError(f"max_waiting must be an int >= 0, got {max_waiting!r}")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty str or None")
    server = _Server(model, served_model_name or model.path.name, max_waiting, media_policy or MediaPolicy(),
                     max_body_bytes)
    app = FastAPI(title="phi_fast", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_Gate, api_key=api_key, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        text = (f"no route {request.method} {request.url.path}" if error.status_code == 404
                else f"{request.method} is not allowed on {request.url.path}" if error.status_code == 405
                else str(error.detail))
        return _error_response(APIError(error.status_code, text))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return _error_response(APIError(500, "internal server error (the details are in the server's log)"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_chat(await _json_body(request, server.max_body_bytes))
        server.check_model(req.model)
        images = await asyncio.gather(*(server.fetch(part.url, part.param) for part in req.images))
        run = await server.start(req, [(req.messages, list(images))], request.receive)
        return await run.respond(stream=req.stream, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_completion(await _json_body(request, server.max_body_bytes))
        server.check_model(req.model)
        run = await server.start(req, [(p, []) for p in req.prompts], request.receive)
        return await run.respond(stream=req.stream, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return server.model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            await run_in_threadpool(model.loop.call, lambda engine: None, ENGINE_CALL_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - closed, stopped or stuck: not healthy
            return JSONResponse({"status": "unavailable", "reason": type(error).__name__}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await run_in_threadpool(server.metrics.render), media_type=CONTENT_TYPE_LATEST)

    return app


class _Server:
    """What the routes share: the model, its name, the limits, the metrics."""

    def __init__(self, model: Model, name: str, max_waiting: int, media_policy: MediaPolicy, max_body_bytes: int):
        self.model, self.name = model, name
        self.max_waiting, self.media_policy, self.max_body_bytes = max_waiting, media_policy, max_body_bytes
        self.created = now()
        self.metrics = Metrics(lambda: model.loop.call(lambda engine: engine.stats(), ENGINE_CALL_TIMEOUT_S))

    def model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "phi_fast",
                "max_model_len": self.model.config.text.max_position_embeddings}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"the model {name!r} does not exist (this server serves {self.name!r})", "model",
                           "model_not_found")

    async def fetch(self, url: str, param: str) -> Any:
        try:
            return await fetch_image(url, self.media_policy)
        except MediaError as error:
            raise APIError(error.status, f"{param}: {error}", param) from None

    async def start(self, req: GenerationRequest, prompts: list[tuple[Any, list[Any]]], receive: Receive) -> "_Run":
        """Check the queue, then queue req.n answers for every (prompt, images) pair."""
        arrived = time.monotonic()
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_update(_: RequestHandle) -> None:  # engine thread
            loop.call_soon_threadsafe(wake.set)

        handles = await run_in_threadpool(self._submit, req, prompts, on_update)
        for k in range(0, len(handles), req.n):
            self.metrics.prompt_tokens.inc(len(handles[k].request.keys))
        return _Run(self, req, handles, wake, receive, arrived)

    def _submit(self, req: GenerationRequest, prompts: list[tuple[Any, list[Any]]],
                on_update: Callable[[RequestHandle], None]) -> list[RequestHandle]:
        """Worker thread: the 503 check and Model.submit (tokenizing, image preprocessing)."""
        count = len(prompts) * req.n
        if self.model.loop.closed:
            raise APIError(503, "the engine is shut down", code="engine_closed")
        waiting, running = self.model.loop.load()
        if max(0, waiting + running + count - self.model.engine.max_num_seqs) > self.max_waiting:
            raise APIError(503, f"the server is busy: {waiting} requests wait for a batch slot (limit "
                           f"{self.max_waiting}); retry later", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        handles: list[RequestHandle] = []
        try:
            for prompt, images in prompts:
                handles += self.model.submit(prompt, images, req.params, n=req.n, on_update=on_update)
        except ValueError as error:
            for h in handles:
                h.abort()
            raise bad(str(error), "messages" if isinstance(req, ChatRequest) else "prompt") from None
        except EngineLoopClosed:
            raise APIError(503, "the engine is shut down", code="engine_closed") from None
        return handles


class _Run:
    """One HTTP request's answers in flight: its handles, read from the event loop."""

    def __init__(self, server: _Server, req: GenerationRequest, handles: list[RequestHandle], wake: asyncio.Event,
                 receive: Receive, arrived: float):
        self.server, self.req, self.handles, self.wake, self.receive = server, req, handles, wake, receive
        self.arrived = arrived
        self.id = new_id("chatcmpl" if isinstance(req, ChatRequest) else "cmpl")
        self.created = now()
        self.tokenizer = server.model.tokenizer
        self.sent = [0] * len(handles)  # tokens whose logprobs each choice has reported
        self.last = [arrived] * len(handles)  # when each choice last produced text
        self.seen = [0] * len(handles)  # tokens each choice had at its last text
        self.started = [False] * len(handles)

    async def respond(self, stream: bool, chat: bool) -> Response:
        if stream:
            return _EventStream(self.stream_chat() if chat else self.stream_completion(), self.abort)
        try:
            await _unless_disconnected(self.receive, self.drain())
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            self.abort()  # the client went away, or the route was cancelled; no-op for finished requests
        self._raise_first_error()
        return JSONResponse(self.chat_body() if chat else self.completion_body())

    def abort(self) -> None:
        for h in self.handles:
            h.abort()

    # --- events -------------------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice, event) as the engine publishes them, until every choice is done; metrics on the way."""
        pending = set(range(len(self.handles)))
        while pending:
            await self.wake.wait()
            self.wake.clear()  # before polling: news published after the poll sets it again
            for i in sorted(pending):
                for event in self.handles[i].poll():
                    self._observe(i, event)
                    yield i, event
                    if event.kind == DONE:
                        pending.discard(i)

    def _observe(self, i: int, event: Event) -> None:
        m, t = self.server.metrics, time.monotonic()
        if event.kind == DONE:
            m.generation_tokens.inc(event.num_tokens)
            return
        new = max(1, event.num_tokens - self.seen[i])
        if not self.started[i]:
            m.ttft.observe(t - self.arrived)
            self.started[i] = True
        else:  # tokens that arrive together share the gap since the last text
            for _ in range(new):
                m.itl.observe((t - self.last[i]) / new)
        self.last[i], self.seen[i] = t, event.num_tokens

    async def drain(self) -> None:
        async for _ in self.events():
            pass

    def _raise_first_error(self) -> None:
        for h in self.handles:
            error = h.request.error
            if error is not None:
                raise _engine_error(error)

    # --- bodies -------------------------------------------------------------------------------------------

    def _usage(self) -> dict[str, int]:
        prompt = sum(len(self.handles[k].request.keys) for k in range(0, len(self.handles), self.req.n))
        return usage(prompt, sum(len(h.request.output_ids) for h in self.handles))

    def _new_logprobs(self, i: int, upto: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(token, logprob, top) of choice i's tokens not reported yet, up to `upto` tokens."""
        if not self.req.logprobs:
            return []
        r: EngineRequest = self.handles[i].request
        start, self.sent[i] = self.sent[i], max(self.sent[i], upto)
        return [(r.output_ids[k], *r.logprobs[k]) for k in range(start, upto)]

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        data = self.tokenizer.token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    def _chat_logprobs(self, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        return {"content": [{**self._token(t, lp), "top_logprobs": [self._token(a, alp) for a, alp in top]}
                            for t, lp, top in entries], "refusal": None}

    def _completion_logprobs(self, entries: list[tuple[int, float, list[tuple[int, float]]]],
                             offset: int) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        tokens = [self._token(t, lp)["token"] for t, lp, _ in entries]
        offsets = [offset + sum(len(s) for s in tokens[:k]) for k in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [self._top_dict(top) for _, _, top in entries],
                "text_offset": offsets}

    def _top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """{token text: logprob}, OpenAI's completions format; tokens with the same text keep the likeliest."""
        out: dict[str, float] = {}
        for token, logprob in top:
            out.setdefault(self._token(token, logprob)["token"], logprob)
        return out

    def chat_body(self) -> dict[str, Any]:
        choices = []
        for i, h in enumerate(self.handles):
            r = h.request
            choices.append({"index": i, "message": {"role": "assistant", "content": h.result(0)},
                            "logprobs": self._chat_logprobs(self._new_logprobs(i, len(r.output_ids))),
                            "finish_reason": finish_reason(r.finish_reason)})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.server.name,
                "choices": choices, "usage": self._usage()}

    def completion_body(self) -> dict[str, Any]:
        choices = []
        for i, h in enumerate(self.handles):
            r = h.request
            choices.append({"index": i, "text": h.result(0),
                            "logprobs": self._completion_logprobs(self._new_logprobs(i, len(r.output_ids)), 0),
                            "finish_reason": finish_reason(r.finish_reason)})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.server.name,
                "choices": choices, "usage": self._usage()}

    # --- streams ------------------------------------------------------------------------------------------

    def _chunk(self, obj: str, choice: dict[str, Any] | None) -> bytes:
        body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.server.name,
                                "choices": [] if choice is None else [choice]}
        if self.req.include_usage:
            body["usage"] = None if choice is not None else self._usage()
        return _sse(body)

    async def stream_chat(self) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk"
        for i in range(len(self.handles)):
            yield self._chunk(obj, {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None})
        async for i, event in self.events():
            r = self.handles[i].request
            if event.kind == DONE:
                if r.error is not None:
                    yield _sse(_engine_error(r.error).body())
                    break
                yield self._chunk(obj, {"index": i, "delta": {},
                                        "logprobs": self._chat_logprobs(self._new_logprobs(i, event.num_tokens)),
                                        "finish_reason": finish_reason(r.finish_reason)})
            else:
                yield self._chunk(obj, {"index": i, "delta": {"content": event.text},
                                        "logprobs": self._chat_logprobs(self._new_logprobs(i, event.num_tokens)),
                                        "finish_reason": None})
        else:
            if self.req.include_usage:
                yield self._chunk(obj, None)
        yield b"data: [DONE]\n\n"

    async def stream_completion(self) -> AsyncIterator[bytes]:
        obj, offsets = "text_completion", [0] * len(self.handles)
        async for i, event in self.events():
            r = self.handles[i].request
            if event.kind == DONE and r.error is not None:
                yield _sse(_engine_error(r.error).body())
                break
            logprobs = self._completion_logprobs(self._new_logprobs(i, event.num_tokens), offsets[i])
            offsets[i] += len(event.text)
            yield self._chunk(obj, {"index": i, "text": event.text, "logprobs": logprobs,
                                    "finish_reason": finish_reason(r.finish_reason) if event.kind == DONE else None})
        else:
            if self.req.include_usage:
                yield self._chunk(obj, None)
        yield b"data: [DONE]\n\n"


def _engine_error(error: BaseException) -> APIError:
    """A request's own failure as the client sees it: its mistake (400) or the server's (500, logged)."""
    if isinstance(error, ValueError):  # e.g. CacheFullError: the prompt can never fit the KV cache
        return bad(str(error))
    if isinstance(error, EngineLoopClosed):
        return APIError(503, "the engine is shut down", code="engine_closed")
    log.error("request failed inside the engine: %s: %s", type(error).__name__, error)
    return APIError(500, "the request failed inside the engine (the details are in the server's log)")


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _json_body(request: Request, limit: int) -> Any:
    """The body parsed as JSON: 413 past `limit` bytes (announced or counted), 400 if it is not JSON."""
    too_big = APIError(413, f"the request body is larger than {limit} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    data, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        data.append(chunk)
    try:
        return json.loads(b"".join(data))
    except (ValueError, UnicodeDecodeError) as error:
        raise bad(f"the request body is not valid JSON: {error}") from None


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """await `work`, unless the client disconnects first (ClientGone; `work` is cancelled)."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let it unwind before anyone closes what it uses
    if task.cancelled():
        raise ClientGone()
    return task.result()


class _EventStream(StreamingResponse):
    """A server-sent event stream that ends (and calls `on_close`) as soon as the client disconnects, even while
    it waits for the next token (Starlette's StreamingResponse only notices at its next write)."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def write() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _unless_disconnected(receive, write())
        except (ClientGone, OSError):
            log.info("client disconnected mid-stream; its requests are aborted")
        finally:
            self.on_close()
            await self.chunks.aclose()  # type: ignore[attr-defined]


class _Gate:
    """Pure ASGI middleware (streams pass through untouched): the API key on /v1 routes, requests counted by
    route and status."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected is not None and path.startswith("/v1") and not self._authorized(scope):
                await _error_response(APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                               code="invalid_api_key"))(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            self.metrics.requests.labels(route, str(status)).inc()

    def _authorized(self, scope: Scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected)
