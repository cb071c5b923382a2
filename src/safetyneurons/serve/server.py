"""HTTP service for a guard: an OpenAI-style moderation endpoint with micro-batching.

Endpoints (see :func:`create_app`):

- ``POST /v1/moderations`` ``{"input": str | [str], "model": str (optional, ignored)}`` ->
  ``{"id", "model", "results": [{"flagged", "categories": {"unsafe", ...}, "category_scores": {"unsafe", ...}}]}``
  (hazard categories next to ``unsafe`` when the guard has category heads, :mod:`safetyneurons.probes.categories`)
- ``GET /v1/guard``: the guard's metadata (guard.json with the neuron list summarised) and server limits;
- ``GET /healthz``: liveness, ``{"status": "ok"}`` (open without the API key, for load balancers).

Concurrent requests are gathered into one batch: each request puts its inputs on an asyncio queue; one
worker takes the first waiting request, waits at most ``max_wait_ms`` for more (up to ``max_batch_size``
inputs), scores them with one ``guard.score`` call in a worker thread and hands each request its results.

Every error is JSON ``{"error": {"message", "type", "code"}}``: 400 malformed or too deeply nested JSON,
422 wrong shape, empty input or text that is not valid Unicode (naming the input), 413 too many inputs /
too large a body, 401 missing or wrong bearer token (compared in constant time), 408 headers or body too
slow, 429 too many inputs queued by one client, 503 queue full / too many connections / worker down, 504
request deadline passed, 500 an unexpected failure (for that request only: a failing batch is rescored
request by request). One log line per request (method, raw path with control characters escaped, status,
number of inputs, latency); prompt text only with ``log_prompts``. Protocol limits: :mod:`.http_limits`;
batching: :mod:`.batcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from fastapi import FastAPI, Request  # module level: FastAPI resolves the (postponed) annotations from here

from safetyneurons import __version__
from safetyneurons._io import check_text
from safetyneurons.serve.batcher import InputFailed, MicroBatcher
from safetyneurons.errors import UserError
from safetyneurons.serve.limits import ApiError, BodyTimeout, error_body, escape_for_log, parse_body, protocol_class

if TYPE_CHECKING:
    import socket

    import uvicorn
    from starlette.types import ASGIApp

    from safetyneurons.guard.guard import Guard

log = logging.getLogger("safetyneurons.serve.server")


@dataclass
class ServerSettings:
    """Limits, timeouts and batching of the service."""

    max_batch_size: int = 32  # inputs scored together in one guard.score call
    max_wait_ms: float = 5.0  # how long the first waiting request waits for company
    max_inputs: int = 64  # inputs per request (more -> 413)
    max_chars: int = 8192  # characters per input (more -> 413)
    max_queue: int = 4096  # inputs waiting to be scored (more -> 503)
    max_queue_per_client: int | None = None  # inputs one client may have waiting (more -> 429); None: max_queue/8
    request_timeout_s: float = 60.0  # a request's deadline from arrival to answer (then 504)
    header_timeout_s: float = 10.0  # time to send the request headers (then 408 and close)
    body_timeout_s: float = 10.0  # time to send the request body (then 408)
    keep_alive_s: float = 5.0  # idle keep-alive connections are closed after this
    max_connections: int = 512  # open connections (more: 503 at once)
    api_key: str | None = field(default=None, repr=False)
    log_prompts: bool = False

    def check(self) -> "ServerSettings":
        for name in ("max_batch_size", "max_inputs", "max_chars", "max_queue", "max_connections"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name.replace('_', '-')} must be a whole number >= 1 (got {v!r}).")
        if self.max_queue_per_client is None:
            self.max_queue_per_client = max(self.max_inputs, self.max_queue // 8)
        if not isinstance(self.max_queue_per_client, int) or self.max_queue_per_client < self.max_inputs:
            raise UserError(f"max-queue-per-client must be a whole number >= max-inputs ({self.max_inputs}).")
        if not (0 <= float(self.max_wait_ms) <= 10_000):
            raise UserError(f"max-wait-ms must be between 0 and 10000 (got {self.max_wait_ms!r}).")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not 0 < float(getattr(self, name)) <= 3600:
                raise UserError(f"{name.replace('_', '-')} must be between 0 and 3600 seconds "
                                f"(got {getattr(self, name)!r}).")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("The API key is empty; give a non-empty key or leave it out.")
        return self

    @property
    def max_body_bytes(self) -> int:
        # worst case: every character escaped as \\uXXXX (6 bytes) + JSON overhead
        return self.max_inputs * (self.max_chars * 6 + 16) + 4096

    def public(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "max_wait_ms": float(self.max_wait_ms),
                "max_inputs": self.max_inputs, "max_chars": self.max_chars, "max_queue": self.max_queue,
                "max_queue_per_client": self.max_queue_per_client, "request_timeout_s": self.request_timeout_s,
                "header_timeout_s": self.header_timeout_s, "body_timeout_s": self.body_timeout_s,
                "max_connections": self.max_connections, "auth": "bearer" if self.api_key else "none"}


_error_body = error_body  # the one JSON error shape (kept under its old name for importers)


# -------------------------------------------------------------------------------------------- app
class AccessLog:
    """Pure ASGI middleware: one log line per HTTP request (method, path, status, inputs, latency).

    The path is the raw request path with control characters escaped (a ``%0A`` cannot forge a line).
    The endpoint stores the number of inputs (and, with ``log_prompts``, the texts) in the request state.
    """

    def __init__(self, app: ASGIApp, log_prompts: bool = False):
        self.app, self.log_prompts = app, log_prompts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        state["n_inputs"], state["prompts"] = 0, None
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            ms = (time.perf_counter() - start) * 1000.0
            raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
            path = escape_for_log(raw.decode("latin-1"))
            line = f"{escape_for_log(scope['method'])} {path} {status} n_inputs={state.get('n_inputs', 0)} {ms:.1f}ms"
            if self.log_prompts and state.get("prompts") is not None:
                line += f" prompts={json.dumps(state['prompts'], ensure_ascii=True)}"
            log.info(line)


def _parse_request(body: bytes, settings: ServerSettings) -> list[str]:
    obj = parse_body(body)
    if not isinstance(obj, dict):
        raise ApiError(422, "The request body must be a JSON object like {\"input\": \"text\"} or "
                            "{\"input\": [\"text\", ...]}.", code="invalid_body")
    if "input" not in obj:
        raise ApiError(422, "Missing field \"input\" (a string or a list of strings).", code="missing_input")
    if "model" in obj and obj["model"] is not None and not isinstance(obj["model"], str):
        raise ApiError(422, "Field \"model\" must be a string when given.", code="invalid_model")
    inputs = obj["input"]
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list):
        raise ApiError(422, "Field \"input\" must be a string or a list of strings.", code="invalid_input")
    if not inputs:
        raise ApiError(422, "Field \"input\" is an empty list; give at least one text.", code="empty_input")
    if len(inputs) > settings.max_inputs:
        raise ApiError(413, f"Too many inputs: {len(inputs)} > {settings.max_inputs} per request. Split the "
                            f"request.", code="too_many_inputs")
    inputs = [_input_text(x, k) for k, x in enumerate(inputs)]
    for k, text in enumerate(inputs):  # each input is validated before it can join a batch
        if not text.strip():
            raise ApiError(422, f"input[{k}] is empty; give some text to score.", code="empty_input")
        if len(text) > settings.max_chars:
            raise ApiError(413, f"input[{k}] has {len(text)} characters, more than the limit of "
                                f"{settings.max_chars}.", code="input_too_long")
        try:
            check_text(text, f"input[{k}]")
        except UserError as e:
            raise ApiError(422, str(e), code="invalid_text") from None
    return inputs


def _input_text(item, k: int) -> str:
    """A moderation input item: a string or a ``{"type": "text", "text": ...}`` part (images are refused)."""
    if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
        return item["text"]
    if isinstance(item, str):
        return item
    kind = f"a {item.get('type')!r} part" if isinstance(item, dict) else type(item).__name__
    raise ApiError(422, f"input[{k}] is {kind}; give a string or a {{\"type\": \"text\", \"text\": ...}} part "
                        f"(this guard reads text only).", code="invalid_input")


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"Request body too large ({declared} bytes > {limit}).", code="body_too_large")
        except ValueError:
            raise ApiError(400, "Invalid Content-Length header.", code="invalid_header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body too large (> {limit} bytes).", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(request) -> None:
    """Returns when the client has gone away (after the body was read, receive reports only that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its work was dropped."""


async def score_for_request(request: Request, batcher: MicroBatcher, inputs: list[str], timeout_s: float) -> list:
    """Queue ``inputs`` for scoring under the request's client, with the request deadline (504) and dropping
    the work when the client disconnects. Usable by any route that scores prompts."""
    client = request.client.host if request.client else ""
    work = asyncio.ensure_future(batcher.submit(inputs, client))
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work in done:
        try:
            return work.result()
        except InputFailed as e:
            if isinstance(e.cause, UserError):
                raise ApiError(422, f"input[{e.index}]: {e.cause}", code="invalid_input") from None
            log.error("scoring failed for input[%d]: %s: %s", e.index, type(e.cause).__name__,
                      escape_for_log(str(e.cause)))
            raise ApiError(500, f"Internal error while scoring input[{e.index}]; see the server log.",
                           "server_error", "scoring_failed") from None
    work.cancel()  # the batcher skips it if it was not taken yet
    if gone in done:
        raise ClientGone()
    raise ApiError(504, f"The request was not answered within {timeout_s:g} s; retry later.", "server_busy",
                   "deadline_exceeded")


def create_app(guard: Guard, *, max_batch_size: int = 32, max_wait_ms: float = 5.0, max_inputs: int = 64,
               max_chars: int = 8192, max_queue: int = 4096, api_key: str | None = None,
               log_prompts: bool = False, score_fn: Callable[[Sequence[str]], list] | None = None,
               **limits: float | None) -> FastAPI:
    """A FastAPI app serving ``guard`` (a :class:`safetyneurons.guard.guard.Guard`).

    ``api_key``: when set, every endpoint but /healthz needs ``Authorization: Bearer <key>``.
    ``score_fn`` replaces ``guard.score`` (for instrumentation); it gets a list of texts and returns one
    ``GuardResult`` per text. ``limits``: further :class:`ServerSettings` fields (timeouts, caps).
    :func:`safetyneurons.serve.routes.create_service` adds guarded chat completions and LiteLLM's guardrail API.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from safetyneurons.guard.guard import public_metadata

    settings = ServerSettings(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_inputs=max_inputs,
                              max_chars=max_chars, max_queue=max_queue, api_key=api_key,
                              log_prompts=log_prompts, **limits).check()
    batcher = MicroBatcher(score_fn or guard.score, settings.max_batch_size, settings.max_wait_ms,
                           settings.max_queue, settings.max_queue_per_client)
    key_bytes = settings.api_key.encode("utf-8") if settings.api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="safetyneurons guard", version=_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.guard = guard
    app.state.settings = settings
    app.state.batcher = batcher

    def error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
              headers: dict | None = None):
        return JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error(e.status, e.message, e.type, e.code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), "invalid_request_error", None, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error(422, f"Invalid request: {e.errors()}", "invalid_request_error", "invalid_body")

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone):
        return error(499, "The client closed the connection; the request was dropped.", "client_closed",
                     "client_closed")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # the last resort: still the JSON shape
        log.error("unexpected %s on %s", type(e).__name__, escape_for_log(request.url.path))
        return error(500, "Internal server error; see the server log.", "server_error", "internal_error")

    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)
    app.add_middleware(AccessLog, log_prompts=settings.log_prompts)

    def check_auth(request: Request) -> None:
        if key_bytes is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" else b""
        # compare_digest runs in time independent of where the strings differ
        if not hmac.compare_digest(given, key_bytes):
            raise ApiError(401, "Missing or invalid API key: send the header 'Authorization: Bearer <key>'.",
                           "authentication_error", "invalid_api_key")

    app.state.check_auth = check_auth  # for the routes of safetyneurons.serve.routes

    @app.get("/healthz")
    async def healthz():
        health = batcher.health()
        stuck = health["busy_s"] is not None and health["busy_s"] > settings.request_timeout_s
        ok = health["alive"] and not stuck
        body = {"status": "ok" if ok else "unhealthy", "guard": guard.name, "batcher": health}
        return body if ok else JSONResponse(body, status_code=503)

    @app.get("/v1/guard")
    async def guard_info(request: Request):
        check_auth(request)
        return public_metadata({**guard.metadata(), "server": {
            **settings.public(), "batches_scored": batcher.batches, "largest_batch": batcher.largest_batch,
            "batches_rescored": batcher.rescored}})

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        check_auth(request)
        body = await _read_body(request, settings.max_body_bytes)
        inputs = _parse_request(body, settings)
        request.state.n_inputs = len(inputs)
        if settings.log_prompts:
            request.state.prompts = inputs
        results = await score_for_request(request, batcher, inputs, settings.request_timeout_s)
        return {
            "id": f"modr-{uuid.uuid4().hex}",
            "model": guard.name,
            "results": [_moderation_result(r) for r in results],
        }

    return app


def _moderation_result(r) -> dict:
    """One moderation result; hazard categories from the guard's category heads, if any, next to ``unsafe``."""
    categories = getattr(r, "categories", None) or {"unsafe": bool(r.flagged)}
    scores = getattr(r, "category_scores", None) or {"unsafe": float(r.unsafe_probability)}
    return {"flagged": bool(r.flagged), "categories": categories, "category_scores": scores,
            "category_applied_input_types": {k: ["text"] for k in categories}}


def _version() -> str:
    return __version__


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket (so a busy port is a clear error before the model loads)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"Cannot resolve --host {host!r} ({e.strerror}). Give an IP address like 127.0.0.1.") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"Cannot listen on {host}:{port} ({e.strerror}). Pick another --port, or stop the "
                        f"process using it.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: FastAPI, log_level: str = "info") -> uvicorn.Config:
    """uvicorn settings with the app's limits: header deadline and connection cap (custom h11 protocol),
    keep-alive timeout, bounded header size (h11's incomplete-event limit)."""
    import uvicorn

    s: ServerSettings = app.state.settings
    return uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                          http=protocol_class(s.header_timeout_s, s.max_connections),
                          timeout_keep_alive=s.keep_alive_s, h11_max_incomplete_event_size=16 * 1024)


def run_server(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn on an already-bound socket until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, log_level)).run(sockets=[sock])
