"""Protocol hygiene for the HTTP service, shared by every route: one JSON error shape, read timeouts, a
connection cap, JSON depth limits and log-safe text.

- **One error shape.** Every 4xx/5xx body is ``{"error": {"message", "type", "code"}}``
  (:func:`error_body`), including the ones produced below the app (connection cap, header timeout).
- **Header read timeout.** uvicorn closes idle keep-alive connections but waits forever for a request whose
  headers never finish (slow loris). :func:`protocol_class` adds a deadline: a connection that has not
  started a request within ``header_timeout_s`` of opening (or of its last response) gets a 408 (when it
  sent part of a request) and is closed.
- **Malformed HTTP** (a broken request line or header, headers over 16 KiB) gets 400 in the same JSON shape
  instead of uvicorn's plain text.
- **Connection cap.** Past ``max_connections`` open connections, a new one is answered 503 at once and
  closed, before any request is read.
- **Body read timeout.** :class:`BodyTimeout` (ASGI middleware) gives the whole request body
  ``body_timeout_s`` to arrive; then the request gets 408.
- **JSON depth.** :func:`parse_body` refuses bodies nested deeper than ``MAX_JSON_DEPTH`` with 400.
- **Log safety.** :func:`escape_for_log` escapes control characters, so a ``%0A`` in a URL cannot forge
  log lines.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import ASGIApp
    from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_JSON_DEPTH = 32  # a moderation body is an object holding a list of strings: depth 2


class ApiError(Exception):
    """An HTTP error answered with the shared JSON shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


def _raw_response(status: int, reason: str, message: str, type_: str, code: str) -> bytes:
    body = json.dumps(error_body(message, type_, code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode()
    return head + body


def escape_for_log(text: str) -> str:
    """``text`` with control and non-printable characters escaped (``\\n`` -> ``\\\\n``, ``\\x1b`` -> ``\\\\x1b``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def parse_body(body: bytes) -> Any:
    """Parse a request body as JSON; 400 (``invalid_json``) when it is not UTF-8 JSON or is nested too deeply.
    Strings are not checked here: the route names the input that holds a bad one."""
    from safetyneurons._io import json_problem

    too_deep = ApiError(400, f"The request body is nested deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}). Send {{\"input\": \"text\"}}.",
                       code="invalid_json") from None
    except RecursionError:
        raise too_deep from None
    if json_problem(obj, MAX_JSON_DEPTH, check_strings=False):
        raise too_deep
    return obj


class BodyTimeout:
    """ASGI middleware: the request body must arrive within ``timeout_s`` of the request's start (else 408).

    After the body is complete, ``receive`` is left alone (it then reports client disconnects)."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app, self.timeout_s = app, float(timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise ApiError(408, f"The request body did not arrive within {self.timeout_s:g} s.",
                               code="body_timeout") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


def protocol_class(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """A uvicorn h11 protocol with a header read deadline and a connection cap (see the module doc)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._got_bytes = False
            if len(self.connections) > max_connections:
                transport.write(_raw_response(503, "Service Unavailable", f"Too many open connections (limit "
                                f"{max_connections}); retry shortly.", "server_busy", "too_many_connections"))
                transport.close()
                return
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            self._got_bytes = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._got_bytes = False
            self._arm_header_timer()

        def send_400_response(self, msg: str) -> None:  # malformed HTTP: the JSON shape too, not plain text
            self.transport.write(_raw_response(400, "Bad Request", f"{msg} Send a well-formed HTTP/1.1 request.",
                                               "invalid_request_error", "invalid_http"))
            self.transport.close()

        def _arm_header_timer(self) -> None:
            cycle = self.cycle
            self.loop.call_later(header_timeout_s, self._header_deadline, cycle)

        def _header_deadline(self, cycle) -> None:
            if self.transport.is_closing() or self.cycle is not cycle:
                return  # a request started meanwhile (its body has its own deadline)
            if self._got_bytes:
                self.transport.write(_raw_response(408, "Request Timeout", f"The request headers did not arrive "
                                     f"within {header_timeout_s:g} s.", "invalid_request_error", "header_timeout"))
            self.transport.close()

    return GuardedH11Protocol
