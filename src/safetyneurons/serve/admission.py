"""Admission control shared by every route: who a client is, request bodies, deadlines and disconnects, and
the caps on live chat generations and the KV-cache memory they hold.

- **Client key** (:func:`client_key`): the one key of the fair share, for moderation, guardrail and chat work
  alike (the worker's queue, :mod:`safetyneurons.serve.batcher`, and the generation caps below). It is the
  peer address and, when the server checks an API key, the identity of the key the request carried (a sha256
  prefix, never the key): tenants with their own keys behind one proxy address get their own shares. A bearer
  token the server does not check is ignored, so a client cannot mint shares by sending made-up tokens.
- **Request body** (:func:`read_body`): counted while it streams in (413 past the limit). A client that goes
  away before its body arrived ends the request quietly (:class:`ClientGone`: 499 in the access log, no
  traceback in the server log).
- **Deadline and disconnect** (:class:`RequestWatch`): every wait for the worker is raced against the request
  deadline (504 ``deadline_exceeded``) and the client's disconnect (:class:`ClientGone`); the work that lost the
  race is cancelled, so what is still queued leaves the queue and never runs.
- **Generations** (:class:`Generations`): at most ``max_generations`` chat generations live at once (503
  ``too_many_generations``) and ``max_generations_per_client`` per client (429 ``client_generations``). Each
  generation reserves its prompt tokens plus its ``max_tokens`` of KV cache against ``max_kv_tokens`` (503
  ``kv_cache_full`` while other generations hold it; 413 ``context_too_large`` when one request alone asks for
  more than the whole budget) until it ends, however it ends (finished, failed, past its deadline or dropped by
  its client).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import TYPE_CHECKING, Any, Awaitable

from safetyneurons.serve.limits import ApiError, bearer_token, parse_body

if TYPE_CHECKING:
    from starlette.requests import Request


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its work was dropped."""


def client_key(request: Request) -> str:
    """The fair-share key of a request: its peer address, plus the identity of its API key when the server
    checks one (see the module docstring)."""
    peer = request.client.host if request.client else ""
    settings = getattr(request.app.state, "settings", None)
    if settings is None or not getattr(settings, "api_key", None):
        return peer
    token = bearer_token(request.headers.get("authorization", ""))
    if not token:
        return peer
    return f"key:{hashlib.sha256(token).hexdigest()[:12]}@{peer}"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 ``body_too_large``, checked on the declared length and
    while the body streams in); :class:`ClientGone` when the client disconnects before it is complete."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, "Invalid Content-Length header.", code="invalid_header") from None
        if too_big:
            raise ApiError(413, f"Request body too large ({declared} bytes > {limit}).", code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"Request body too large (> {limit} bytes).", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


async def read_json_object(request: Request, example: str) -> dict:
    """The API-key check, then the body as a JSON object (400 broken JSON, 422 not an object like ``example``)."""
    request.app.state.check_auth(request)
    obj = parse_body(await read_body(request, request.app.state.settings.max_body_bytes))
    if not isinstance(obj, dict):
        raise ApiError(422, f"The request body must be a JSON object like {example}.", code="invalid_body")
    return obj


async def until_disconnect(request: Request) -> None:
    """Returns when the client has gone away (after the body was read, receive reports only that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class RequestWatch:
    """A request's deadline (``timeout_s`` from now) and its client's disconnect, for every wait on the worker.

    ``await watch.run(aw)`` returns ``aw``'s result, or cancels it and raises 504 (deadline) or
    :class:`ClientGone` (disconnect). Use it as a context manager (or call :meth:`close`) to stop watching."""

    def __init__(self, request: Request, timeout_s: float, *, watch_disconnect: bool = True):
        loop = asyncio.get_running_loop()
        self.timeout_s = float(timeout_s)
        self.deadline = loop.time() + self.timeout_s
        self._loop = loop
        self._gone = asyncio.ensure_future(until_disconnect(request)) if watch_disconnect else None

    def __enter__(self) -> "RequestWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._gone is not None:
            self._gone.cancel()

    def stop_watching_disconnect(self) -> None:
        """Keep the deadline only (a streaming response watches the disconnect itself)."""
        self.close()
        self._gone = None

    @property
    def left_s(self) -> float:
        return max(0.0, self.deadline - self._loop.time())

    @property
    def gone(self) -> bool:
        return self._gone is not None and self._gone.done() and not self._gone.cancelled()

    def expired(self) -> ApiError:
        return ApiError(504, f"The request was not answered within {self.timeout_s:g} s; retry later.",
                        "server_busy", "deadline_exceeded")

    async def run(self, aw: Awaitable[Any]) -> Any:
        work = asyncio.ensure_future(aw)
        waiting = {work} if self._gone is None else {work, self._gone}
        try:
            done, _ = await asyncio.wait(waiting, timeout=self.left_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        if work in done:
            return work.result()
        work.cancel()  # queued work leaves the queue; running work's result is dropped
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        if self.gone:
            raise ClientGone()
        raise self.expired()


class Generations:
    """Live chat generations and the KV-cache tokens they reserve (see the module docstring)."""

    def __init__(self, max_generations: int, max_per_client: int, max_kv_tokens: int):
        self.max_generations, self.max_per_client = int(max_generations), int(max_per_client)
        self.max_kv_tokens = int(max_kv_tokens)
        self.live = 0
        self.kv_tokens = 0
        self._per_client: dict[str, int] = {}

    def admit(self, client: str) -> "Generation":
        if self.live >= self.max_generations:
            raise ApiError(503, f"The server is generating {self.live} replies, its limit; retry shortly.",
                           "server_busy", "too_many_generations")
        mine = self._per_client.get(client, 0)
        if mine >= self.max_per_client:
            raise ApiError(429, f"This client already has {mine} replies being generated (limit "
                                f"{self.max_per_client}); wait for them.", "rate_limit_error", "client_generations")
        self.live += 1
        self._per_client[client] = mine + 1
        return Generation(self, client)

    def public(self) -> dict:
        return {"live": self.live, "kv_tokens": self.kv_tokens, "max_generations": self.max_generations,
                "max_generations_per_client": self.max_per_client, "max_kv_tokens": self.max_kv_tokens}


class Generation:
    """One admitted generation: :meth:`reserve` its KV-cache tokens, :meth:`release` everything (idempotent)."""

    def __init__(self, pool: Generations, client: str):
        self.pool, self.client, self.tokens, self.open = pool, client, 0, True

    def reserve(self, tokens: int) -> None:
        pool = self.pool
        if tokens > pool.max_kv_tokens:
            raise ApiError(413, f"This request needs {tokens} tokens of context (prompt + max_tokens), more than the "
                                f"server's KV-cache budget of {pool.max_kv_tokens}; shorten it or ask for fewer "
                                f"tokens.", code="context_too_large")
        if pool.kv_tokens + tokens > pool.max_kv_tokens:
            raise ApiError(503, f"The KV-cache budget is in use ({pool.kv_tokens} of {pool.max_kv_tokens} tokens "
                                f"held by live generations); retry shortly.", "server_busy", "kv_cache_full")
        pool.kv_tokens += tokens
        self.tokens += tokens

    def release(self) -> None:
        if not self.open:
            return
        self.open = False
        pool = self.pool
        pool.kv_tokens -= self.tokens
        pool.live -= 1
        left = pool._per_client.get(self.client, 1) - 1
        if left > 0:
            pool._per_client[self.client] = left
        else:
            pool._per_client.pop(self.client, None)
