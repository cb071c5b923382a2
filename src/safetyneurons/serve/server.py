"""HTTP service for a guard: the OpenAI moderation endpoint, fair micro-batching and admission control.

Endpoints (see :func:`create_app`; :func:`safetyneurons.serve.routes.create_service` adds LiteLLM's guardrail
API and guarded chat completions):

- ``POST /v1/moderations`` (:mod:`safetyneurons.serve.moderation`): ``{"input": str | [str] | [parts]}`` ->
  ``{"id", "model", "results": [{"flagged", "categories", "category_scores", "category_applied_input_types"}],
  "safetyneurons": {"guard", "operating_point", "threshold"}}``: every OpenAI category (those the guard's category
  heads measure, by :data:`safetyneurons.probes.categories.OPENAI_CATEGORIES`), then ``unsafe``, the guard's verdict
- ``GET /v1/guard``: the guard's metadata (guard.json with the neuron list summarised) and server limits;
- ``GET /healthz``: liveness, ``{"status": "ok"}`` (open without the API key, for load balancers). It is
  answered by the event loop, never by the worker, so it answers while the worker is busy; it reports 503 when
  the worker is down or one turn has run longer than the request timeout (turns are bounded, so that means stuck).

All model work runs on one worker thread in bounded turns, in an order that is fair in tokens across clients
(:mod:`safetyneurons.serve.batcher`): long inputs and a chat's guard reading are read in slices of at most
``slice_tokens`` tokens (:mod:`safetyneurons.serve.scoring`) and a chat prefill runs in chunks of as many tokens'
worth (:mod:`safetyneurons.serve.chat_routes`), so one client's input delays the others by about one turn.
Clients are keyed by :func:`safetyneurons.serve.admission.client_key` (peer address, plus the API key's identity
when the server checks one); each may queue at most 1/8 of the queue (inputs and tokens; 429).

Every error is JSON ``{"error": {"message", "type", "code"}}``: 400 malformed or too deeply nested JSON,
422 wrong shape, empty input or text that is not valid Unicode (naming the input), 413 too many inputs / an
input over the per-input ceiling ``max_chars`` / a request over ``max_request_chars`` or ``max_request_tokens``
/ too large a body, 401 missing or wrong bearer token (compared in constant time), 408 headers or body too
slow, 429 too much work queued by one client, 499 (access log only) the client went away, 503 queue full / too
many connections / worker down, 504 request deadline passed, 500 an unexpected failure (for that request only:
a failing batch is rescored request by request). One log line per request (method, raw path with control
characters escaped, status, number of inputs, latency); prompt text only with ``log_prompts``. Protocol
limits: :mod:`safetyneurons.serve.limits`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from fastapi import FastAPI, Request  # module level: FastAPI resolves the (postponed) annotations from here

from safetyneurons import __version__
from safetyneurons.errors import UserError
from safetyneurons.serve.admission import ClientGone, Generations
from safetyneurons.serve.batcher import MicroBatcher
from safetyneurons.serve.limits import (ApiError, BodyTimeout, RequestChecks, api_key_bytes, bearer_token, error_body,
                                        escape_for_log, is_loopback, protocol_class)
from safetyneurons.serve.moderation import add_moderation_route
from safetyneurons.serve.scoring import Scorer

if TYPE_CHECKING:
    import socket

    import uvicorn
    from starlette.types import ASGIApp

    from safetyneurons.guard.guard import Guard

__all__ = ["AccessLog", "ServerSettings", "bind_socket", "create_app", "is_loopback", "run_server", "uvicorn_config"]
log = logging.getLogger("safetyneurons.serve.server")
_POSITIVE = ("max_batch_size", "max_inputs", "max_chars", "max_queue", "max_connections", "max_batch_tokens",
             "max_queue_tokens", "max_request_tokens", "max_generations", "max_kv_tokens", "max_prompt_tokens",
             "decode_tokens_per_turn", "slice_tokens")


@dataclass
class ServerSettings:
    """Limits, timeouts, batching and admission control of the service."""

    max_batch_size: int = 32  # inputs scored together in one guard.score call
    max_wait_ms: float = 5.0  # how long the first waiting request waits for company
    max_inputs: int = 64  # inputs per request (more -> 413)
    max_chars: int = 100_000  # per-input ceiling: longer inputs are read in windows up to it (more -> 413)
    max_request_chars: int | None = None  # characters per request, all inputs (None: see check(); more -> 413)
    max_queue: int = 4096  # inputs waiting to be scored (more -> 503)
    max_queue_per_client: int | None = None  # inputs one client may have waiting (more -> 429); None: max_queue/8
    max_batch_tokens: int = 8192  # tokens one worker turn reads at most (a micro-batch of short inputs)
    slice_tokens: int = 512  # one slice of a long input or a chat's guard reading, one prefill chunk (<= the above)
    max_queue_tokens: int = 1 << 20  # tokens of work waiting (more -> 503)
    max_client_tokens: int | None = None  # tokens one client may have waiting (more -> 429); None: 1/8 of the queue
    max_request_tokens: int = 262_144  # tokens one request's inputs take to read, windows included (more -> 413)
    max_generations: int = 8  # chat generations live at once (more -> 503)
    max_generations_per_client: int | None = None  # per client (more -> 429); None: max(1, max_generations // 4)
    max_kv_tokens: int = 32_768  # prompt + max_tokens reserved by live generations (more -> 503; alone -> 413)
    max_prompt_tokens: int = 4096  # tokens of one chat prompt (more -> 413)
    decode_tokens_per_turn: int = 8  # decoding steps one chat turn runs at most
    allow_caller_loosen: bool = False  # may a caller raise the threshold (LiteLLM's params)? else 422
    request_timeout_s: float = 60.0  # a request's deadline from arrival to answer (then 504)
    header_timeout_s: float = 10.0  # time to send the request headers (then 408 and close)
    body_timeout_s: float = 10.0  # time to send the request body (then 408)
    keep_alive_s: float = 5.0  # idle keep-alive connections are closed after this
    max_connections: int = 512  # open connections (more: 503 at once)
    api_key: str | None = field(default=None, repr=False)
    log_prompts: bool = False
    allowed_hosts: tuple[str, ...] | None = None  # Host names answered (else 421); None: any (limits.RequestChecks)

    def check(self) -> "ServerSettings":
        for name in _POSITIVE:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name.replace('_', '-')} must be a whole number >= 1 (got {v!r}).")
        if self.max_queue_per_client is None:
            self.max_queue_per_client = max(self.max_inputs, self.max_queue // 8)
        if not isinstance(self.max_queue_per_client, int) or self.max_queue_per_client < self.max_inputs:
            raise UserError(f"max-queue-per-client must be a whole number >= max-inputs ({self.max_inputs}).")
        if self.max_request_chars is None:
            self.max_request_chars = max(self.max_chars, min(self.max_inputs * self.max_chars, 400_000))
        if self.max_client_tokens is None:
            self.max_client_tokens = max(1, self.max_queue_tokens // 8)
        if self.max_generations_per_client is None:
            self.max_generations_per_client = max(1, self.max_generations // 4)
        for name in ("max_request_chars", "max_client_tokens", "max_generations_per_client"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name.replace('_', '-')} must be a whole number >= 1 (got {v!r}).")
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
        # worst case: a character escaped as two \\uXXXX (12 bytes), the texts twice (LiteLLM sends texts and
        # messages), plus JSON overhead per input
        return 24 * self.max_request_chars + 256 * self.max_inputs + 16_384

    def public(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "max_wait_ms": float(self.max_wait_ms),
                "max_inputs": self.max_inputs, "max_chars": self.max_chars,
                "max_request_chars": self.max_request_chars, "max_queue": self.max_queue,
                "max_queue_per_client": self.max_queue_per_client, "max_batch_tokens": self.max_batch_tokens,
                "slice_tokens": self.slice_tokens,
                "max_queue_tokens": self.max_queue_tokens, "max_client_tokens": self.max_client_tokens,
                "max_request_tokens": self.max_request_tokens, "max_generations": self.max_generations,
                "max_generations_per_client": self.max_generations_per_client, "max_kv_tokens": self.max_kv_tokens,
                "max_prompt_tokens": self.max_prompt_tokens, "allow_caller_loosen": self.allow_caller_loosen,
                "request_timeout_s": self.request_timeout_s, "header_timeout_s": self.header_timeout_s,
                "body_timeout_s": self.body_timeout_s, "max_connections": self.max_connections,
                "auth": "bearer" if self.api_key else "none"}


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


def create_app(guard: Guard, *, max_batch_size: int = 32, max_wait_ms: float = 5.0, max_inputs: int = 64,
               max_chars: int = 100_000, max_queue: int = 4096, api_key: str | None = None,
               log_prompts: bool = False, score_fn: Callable[[Sequence[str]], list] | None = None,
               allow_caller_loosen: bool = False, **limits: float | None) -> FastAPI:
    """A FastAPI app serving ``guard`` (a :class:`safetyneurons.guard.guard.Guard`).

    ``api_key``: when set, every endpoint but /healthz needs ``Authorization: Bearer <key>``.
    ``score_fn`` replaces ``guard.score`` (for instrumentation); it gets a list of inputs and returns one
    ``GuardResult`` per input (inputs are then always scored whole through it). ``allow_caller_loosen``: let
    callers raise the threshold above the served one (off: they may only make the guard stricter, else 422).
    ``limits``: further :class:`ServerSettings` fields (timeouts, caps).
    :func:`safetyneurons.serve.routes.create_service` adds guarded chat completions and LiteLLM's guardrail API.
    """
    settings = ServerSettings(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_inputs=max_inputs,
                              max_chars=max_chars, max_queue=max_queue, api_key=api_key, log_prompts=log_prompts,
                              allow_caller_loosen=bool(allow_caller_loosen), **limits).check()
    batcher = MicroBatcher(score_fn or guard.score, settings.max_batch_size, settings.max_wait_ms,
                           settings.max_queue, settings.max_queue_per_client,
                           max_batch_tokens=settings.max_batch_tokens, max_queue_tokens=settings.max_queue_tokens,
                           max_client_tokens=settings.max_client_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="safetyneurons guard", version=_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.guard, app.state.settings, app.state.batcher = guard, settings, batcher
    app.state.scorer = Scorer(guard, batcher, max_batch_size=settings.max_batch_size,
                              max_batch_tokens=settings.max_batch_tokens,
                              max_request_tokens=settings.max_request_tokens, slice_tokens=settings.slice_tokens,
                              custom_score_fn=score_fn is not None)
    app.state.generations = Generations(settings.max_generations, settings.max_generations_per_client,
                                        settings.max_kv_tokens)
    app.state.check_auth = make_auth(settings)  # for every route that needs the key
    add_error_handlers(app)
    app.add_middleware(RequestChecks, allowed_hosts=settings.allowed_hosts)  # Host (421), Content-Type (415)
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)
    app.add_middleware(AccessLog, log_prompts=settings.log_prompts)
    add_info_routes(app)
    add_moderation_route(app)
    return app


def make_auth(settings: ServerSettings) -> Callable[[Request], None]:
    """The API-key check of every route but /healthz (401 ``invalid_api_key``; no-op without a key)."""
    key_bytes = api_key_bytes(settings.api_key) if settings.api_key else None

    def check_auth(request: Request) -> None:
        if key_bytes is None:
            return
        header = request.headers.get("authorization", "")
        given = bearer_token(header)  # the bytes the client sent, so a UTF-8 key matches
        # compare_digest runs in time independent of where the strings differ
        if not hmac.compare_digest(given, key_bytes):
            raise ApiError(401, "Missing or invalid API key: send the header 'Authorization: Bearer <key>'.",
                           "authentication_error", "invalid_api_key")

    return check_auth


def json_error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
               headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error in the one JSON shape; a client that went away is a quiet 499 (no traceback)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return json_error(e.status, e.message, e.type, e.code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return json_error(e.status_code, str(e.detail), "invalid_request_error", None, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return json_error(422, f"Invalid request: {e.errors()}", "invalid_request_error", "invalid_body")

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone):
        return json_error(499, "The client closed the connection; the request was dropped.", "client_closed",
                          "client_closed")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # the last resort: still the JSON shape
        log.error("unexpected %s on %s", type(e).__name__, escape_for_log(request.url.path))
        return json_error(500, "Internal server error; see the server log.", "server_error", "internal_error")


def add_info_routes(app: FastAPI) -> None:
    """``GET /healthz`` (open, answered by the event loop) and ``GET /v1/guard`` (metadata, no local paths)."""
    from safetyneurons.guard.guard import public_metadata

    state = app.state
    guard, settings, batcher = state.guard, state.settings, state.batcher

    @app.get("/healthz")
    async def healthz():
        health = batcher.health()
        stuck = health["busy_s"] is not None and health["busy_s"] > settings.request_timeout_s
        ok = health["alive"] and not stuck
        body = {"status": "ok" if ok else "unhealthy", "guard": guard.name, "batcher": health,
                "generations": state.generations.public()}
        return body if ok else json_response(body, 503)

    @app.get("/v1/guard")
    async def guard_info(request: Request):
        state.check_auth(request)
        return public_metadata({**guard.metadata(), "server": {
            **settings.public(), "batches_scored": batcher.batches, "largest_batch": batcher.largest_batch,
            "batches_rescored": batcher.rescored}})


def json_response(body: dict, status: int):
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status)


def _version() -> str:
    return __version__


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
