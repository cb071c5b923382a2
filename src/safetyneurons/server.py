"""HTTP service for a guard: an OpenAI-style moderation endpoint with micro-batching.

Endpoints (see :func:`create_app`):

- ``POST /v1/moderations`` ``{"input": str | [str], "model": str (optional, ignored)}`` ->
  ``{"id", "model", "results": [{"flagged", "categories": {"unsafe", ...}, "category_scores": {"unsafe", ...}}]}``
  (hazard categories next to ``unsafe`` when the guard has category heads, :mod:`safetyneurons.categories`)
- ``GET /v1/guard``: the guard's metadata (guard.json with the neuron list summarised) and server limits;
- ``GET /healthz``: liveness, ``{"status": "ok"}`` (open without the API key, for load balancers).

Concurrent requests are gathered into one batch: each request puts its inputs on an asyncio queue; one
worker takes the first waiting request, waits at most ``max_wait_ms`` for more (up to ``max_batch_size``
inputs), scores them with one ``guard.score`` call in a worker thread and hands each request its results.

Errors are JSON ``{"error": {"message", "type", "code"}}``: 400 malformed JSON, 422 wrong shape or empty
input, 413 too many inputs / too long an input / too large a body, 401 missing or wrong bearer token
(compared in constant time), 503 queue full. One log line per request (method, path, status, number of
inputs, latency); prompt text only with ``log_prompts``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

from fastapi import Request  # module level: FastAPI resolves the (postponed) annotations from here

from . import __version__
from .errors import UserError

log = logging.getLogger("safetyneurons.server")


@dataclass
class ServerSettings:
    """Limits and batching of the service."""

    max_batch_size: int = 32  # inputs scored together in one guard.score call
    max_wait_ms: float = 5.0  # how long the first waiting request waits for company
    max_inputs: int = 64  # inputs per request (more -> 413)
    max_chars: int = 8192  # characters per input (more -> 413)
    max_queue: int = 4096  # inputs waiting to be scored (more -> 503)
    api_key: str | None = field(default=None, repr=False)
    log_prompts: bool = False

    def check(self) -> "ServerSettings":
        for name in ("max_batch_size", "max_inputs", "max_chars", "max_queue"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name.replace('_', '-')} must be a whole number >= 1 (got {v!r}).")
        if not (0 <= float(self.max_wait_ms) <= 10_000):
            raise UserError(f"max-wait-ms must be between 0 and 10000 (got {self.max_wait_ms!r}).")
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
                "auth": "bearer" if self.api_key else "none"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _error_body(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


# --------------------------------------------------------------------------------------- batching
class MicroBatcher:
    """Gather inputs of concurrent requests into batches scored by ``score_fn`` in one worker thread."""

    def __init__(self, score_fn: Callable[[list[str]], list], max_batch_size: int, max_wait_ms: float,
                 max_queue: int):
        self.score_fn = score_fn
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.queued = 0  # inputs waiting (not yet taken by the worker)
        self.batches = 0  # batches scored so far (for metadata and tests)
        self.largest_batch = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard-score")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="guard-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def call(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the scoring thread, so it never overlaps a scoring batch (the model is shared)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def submit(self, texts: list[str]) -> list:
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        if self.queued + len(texts) > self.max_queue:
            raise ApiError(503, f"The server is busy ({self.queued} inputs queued); retry shortly.",
                           "server_busy", "queue_full")
        fut = asyncio.get_running_loop().create_future()
        self.queued += len(texts)
        self._queue.put_nowait((texts, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending = None  # a request that did not fit in the previous batch
        while True:
            first = pending if pending is not None else await self._queue.get()
            pending = None
            items = [first]
            n = len(first[0])
            deadline = loop.time() + self.max_wait
            while n < self.max_batch_size:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                if n + len(item[0]) > self.max_batch_size:
                    pending = item  # starts the next batch
                    break
                items.append(item)
                n += len(item[0])
            self.queued -= n
            items = [it for it in items if not it[1].done()]  # callers that went away
            texts = [t for it in items for t in it[0]]
            if not texts:
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(texts))
            try:
                results = await loop.run_in_executor(self._pool, self.score_fn, texts)
            except asyncio.CancelledError:
                for _, fut in items:
                    if not fut.done():
                        fut.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            k = 0
            for batch_texts, fut in items:
                if not fut.done():
                    fut.set_result(results[k:k + len(batch_texts)])
                k += len(batch_texts)


# -------------------------------------------------------------------------------------------- app
class AccessLog:
    """Pure ASGI middleware: one log line per HTTP request (method, path, status, inputs, latency).

    The endpoint stores the number of inputs (and, with ``log_prompts``, the texts) in the request state.
    """

    def __init__(self, app, log_prompts: bool = False):
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
            line = f"{scope['method']} {scope['path']} {status} n_inputs={state.get('n_inputs', 0)} {ms:.1f}ms"
            if self.log_prompts and state.get("prompts") is not None:
                line += f" prompts={json.dumps(state['prompts'], ensure_ascii=False)}"
            log.info(line)


def _parse_request(body: bytes, settings: ServerSettings) -> list[str]:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}). Send {{\"input\": \"text\"}}.",
                       code="invalid_json") from None
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
    for k, text in enumerate(inputs):
        if not text.strip():
            raise ApiError(422, f"input[{k}] is empty; give some text to score.", code="empty_input")
        if len(text) > settings.max_chars:
            raise ApiError(413, f"input[{k}] has {len(text)} characters, more than the limit of "
                                f"{settings.max_chars}.", code="input_too_long")
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


def create_app(guard, *, max_batch_size: int = 32, max_wait_ms: float = 5.0, max_inputs: int = 64,
               max_chars: int = 8192, max_queue: int = 4096, api_key: str | None = None,
               log_prompts: bool = False, score_fn: Callable[[Sequence[str]], list] | None = None):
    """A FastAPI app serving ``guard`` (a :class:`safetyneurons.guard.Guard`).

    ``api_key``: when set, every endpoint but /healthz needs ``Authorization: Bearer <key>``.
    ``score_fn`` replaces ``guard.score`` (for instrumentation); it gets a list of texts and returns one
    ``GuardResult`` per text.
    :func:`safetyneurons.routes.create_service` adds guarded chat completions and LiteLLM's guardrail API.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = ServerSettings(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_inputs=max_inputs,
                              max_chars=max_chars, max_queue=max_queue, api_key=api_key,
                              log_prompts=log_prompts).check()
    batcher = MicroBatcher(score_fn or guard.score, settings.max_batch_size, settings.max_wait_ms,
                           settings.max_queue)
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
        return JSONResponse(_error_body(message, type_, code), status_code=status, headers=headers)

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

    app.add_middleware(AccessLog, log_prompts=settings.log_prompts)

    def check_auth(request: Request) -> None:
        if key_bytes is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode("utf-8") if scheme.lower() == "bearer" else b""
        # compare_digest runs in time independent of where the strings differ
        if not hmac.compare_digest(given, key_bytes):
            raise ApiError(401, "Missing or invalid API key: send the header 'Authorization: Bearer <key>'.",
                           "authentication_error", "invalid_api_key")

    app.state.check_auth = check_auth  # for the routes of safetyneurons.routes

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "guard": guard.name}

    @app.get("/v1/guard")
    async def guard_info(request: Request):
        check_auth(request)
        return {**guard.metadata(), "server": {**settings.public(), "batches_scored": batcher.batches,
                                               "largest_batch": batcher.largest_batch}}

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        check_auth(request)
        body = await _read_body(request, settings.max_body_bytes)
        inputs = _parse_request(body, settings)
        request.state.n_inputs = len(inputs)
        if settings.log_prompts:
            request.state.prompts = inputs
        try:
            results = await batcher.submit(inputs)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001
            if isinstance(e, UserError):
                raise ApiError(422, str(e), code="invalid_input") from None
            log.exception("scoring failed")
            raise ApiError(500, "Internal error while scoring; see the server log.", "server_error") from None
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


def bind_socket(host: str, port: int):
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


def run_server(app, sock, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn on an already-bound socket until interrupted."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
