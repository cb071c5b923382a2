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
- **JSON depth and size.** :func:`parse_body` refuses bodies nested deeper than
  :data:`safetyneurons.checks.MAX_JSON_DEPTH` or holding an integer past Python's int-string conversion
  limit (4300 digits) with 400.
- **Content type.** :class:`RequestChecks` answers a POST/PUT/PATCH whose ``Content-Type`` is not
  ``application/json`` (optionally ``; charset=utf-8``) with 415.
- **Host header** (DNS rebinding). With ``allowed_hosts`` (:func:`allowed_hosts_for`: by default, when the
  server listens on a loopback address, ``localhost``, ``127.0.0.1`` and ``[::1]``, any port),
  :class:`RequestChecks` answers a request for any other host name with 421, so a web page whose name was
  re-pointed at 127.0.0.1 cannot use a local service that has no API key.
- **API key.** :func:`api_key_bytes` and :func:`bearer_token` compare the key as the UTF-8 bytes the client
  sends (any UTF-8 key works), in constant time.
- **Log safety.** :func:`escape_for_log` escapes control characters, so a ``%0A`` in a URL cannot forge
  log lines.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Iterable

from safetyneurons.checks import MAX_JSON_DEPTH
from safetyneurons.errors import UserError

if TYPE_CHECKING:
    from starlette.types import ASGIApp
    from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the Host names a loopback-only server answers by default
JSON_METHODS = ("POST", "PUT", "PATCH")  # their bodies must be application/json


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
    from safetyneurons._io import json_problem, too_many_digits

    too_deep = ApiError(400, f"The request body is nested deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}). Send {{\"input\": \"text\"}}.",
                       code="invalid_json") from None
    except RecursionError:
        raise too_deep from None
    except ValueError:  # Python's int-string conversion limit, inside json.loads
        raise ApiError(400, f"The request body is refused: {too_many_digits()}.", code="invalid_json") from None
    if json_problem(obj, MAX_JSON_DEPTH, check_strings=False):
        raise too_deep
    return obj


# ------------------------------------------------------------------------------ API key, Host, Content-Type
def api_key_bytes(key: str) -> bytes:
    """The API key as the bytes a client sends in its header (UTF-8); UserError for a key no client can send:
    not UTF-8 text (undecodable bytes from argv or the environment), control characters, or whitespace at
    either end (header values are trimmed)."""
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("The API key is not valid UTF-8 text; give a key of UTF-8 characters.") from None
    if not raw.strip():
        raise UserError("The API key is empty; give a non-empty key or leave it out.")
    if raw != raw.strip() or any(b < 0x20 or b == 0x7F for b in raw):
        raise UserError("The API key has whitespace at an end or a control character, which an HTTP header "
                        "cannot carry; give a key without them.")
    return raw


def bearer_token(authorization: str) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header as the bytes the client sent (b"" if none).

    Servers hand header values over decoded as Latin-1, so encoding back as Latin-1 recovers the exact bytes:
    a UTF-8 key then compares equal (encoding as UTF-8 would double-encode every non-ASCII character)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return b""
    try:
        raw = token.encode("latin-1")
    except UnicodeEncodeError:  # not from a server: a str built in Python
        raw = token.encode("utf-8", "surrogateescape")
    return raw.strip()  # ASCII whitespace only (str.strip would also cut a UTF-8 byte such as \xa0)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) can only be reached from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The host part of a ``Host`` header or a host name, normalised: lower case, no port, no trailing dot,
    IPv6 literals in brackets (``[::1]:8000`` -> ``[::1]``, ``::1`` -> ``[::1]``)."""
    value = value.strip().lower()
    if value.startswith("["):
        name = value.partition("]")[0] + "]"
    elif value.count(":") > 1:
        name = f"[{value}]"
    else:
        name = value.partition(":")[0]
    return name.rstrip(".")


def allowed_hosts_for(bind_host: str, given: Iterable[str] = ()) -> tuple[str, ...] | None:
    """The Host names a server listening on ``bind_host`` answers (None: any).

    ``given`` (the operator's ``--allowed-host``): those names, plus the loopback names; ``*`` turns the check
    off. Nothing given: a loopback ``bind_host`` answers only the loopback names (and its own address), any
    other address any name (it is reachable from outside anyway; use an API key there)."""
    given = [g.strip() for g in given if g and g.strip()]
    if "*" in given:
        return None
    if not given and not is_loopback(bind_host):
        return None
    names = [*LOOPBACK_HOSTS, *given] + ([bind_host] if is_loopback(bind_host) else [])
    return tuple(dict.fromkeys(host_name(n) for n in names))


class RequestChecks:
    """ASGI middleware: the Host header must name one of ``allowed_hosts`` (None: any; else 421, or 400 when
    missing) and a POST/PUT/PATCH body must be ``application/json`` (else 415). Answers in the JSON shape."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None = None):
        self.app = app
        if isinstance(allowed_hosts, str):
            allowed_hosts = [allowed_hosts]
        self.allowed = None if allowed_hosts is None else frozenset(host_name(h) for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = self.host_problem(headers.get(b"host"))
        if problem is None and scope["method"] in JSON_METHODS:
            problem = content_type_problem(headers.get(b"content-type"))
        if problem is None:
            return await self.app(scope, receive, send)
        status, message, code = problem
        body = json.dumps(error_body(message, "invalid_request_error", code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    def host_problem(self, host: str | None) -> tuple[int, str, str] | None:
        if self.allowed is None:
            return None
        if not host:
            return 400, "The request has no Host header; send one naming this server.", "missing_host"
        if host_name(host) in self.allowed:
            return None
        shown = escape_for_log(host)[:100]
        return 421, (f"Host {shown!r} is not served here (this server answers {', '.join(sorted(self.allowed))}); "
                     f"to accept it, start the server with --allowed-host {escape_for_log(host_name(host))[:100]}."), \
            "invalid_host"


def content_type_problem(content_type: str | None) -> tuple[int, str, str] | None:
    """Why a request body's Content-Type is refused (415), or None for ``application/json`` in UTF-8."""
    media, _, params = (content_type or "").partition(";")
    media = media.strip().lower()
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params.split(";"))
                    if k.strip().lower() == "charset"), "utf-8")
    if media == "application/json" and charset in ("utf-8", "utf8"):
        return None
    got = escape_for_log(content_type)[:100] if content_type else "none"
    return 415, (f"Unsupported Content-Type ({got}); send the body as JSON with the header "
                 f"'Content-Type: application/json'."), "unsupported_media_type"


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
