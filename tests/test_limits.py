"""The service's protocol limits (issue 22): huge JSON integers, Content-Type, Host (DNS rebinding), non-ASCII
API keys and requests that stall mid-headers. A fake guard stands in for the model (these are about HTTP,
not scores), behind a real uvicorn server on loopback or FastAPI's TestClient."""

from __future__ import annotations

import json
import socket
import time
import types

import httpx
import pytest
from click.testing import CliRunner

from safetyneurons.errors import UserError
from safetyneurons.serve.limits import (allowed_hosts_for, api_key_bytes, bearer_token, content_type_problem,
                                        host_name)
from safetyneurons.serve.server import create_app
from builders import Served


def fake_guard():
    result = types.SimpleNamespace(flagged=False, unsafe_probability=0.25)
    return types.SimpleNamespace(name="fake-guard", threshold=0.5, layers_run=1, lm=types.SimpleNamespace(
        info={"num_layers": 2}), score=lambda texts, **kw: [result] * len(texts), metadata=lambda: {})


def app_for(**kw):
    g = fake_guard()
    return create_app(g, score_fn=g.score, **kw)


def assert_json_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"} and err["code"] == code, err
    assert "\n" not in err["message"]
    return err


@pytest.fixture(scope="module")
def served():
    with Served(app_for(header_timeout_s=1.0, max_connections=128)) as s:
        yield s


def post(url, body: bytes, content_type: str | None = "application/json", **headers):
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(url + "/v1/moderations", content=body, headers=headers, timeout=30)


# ------------------------------------------------------------------------------------- 1. huge integers
@pytest.mark.parametrize("body", [b'{"input": "hi", "n": ' + b"7" * 5000 + b"}",
                                  b'{"input": [' + b"1" * 5000 + b"]}",
                                  b'[' + b"9" * 100_000 + b"]"])
def test_a_huge_integer_in_the_body_is_a_json_400_not_a_500(served, body):
    err = assert_json_error(post(served.url, body), 400, "invalid_json")
    assert "digits" in err["message"]
    assert post(served.url, b'{"input": "still fine"}').status_code == 200


# ------------------------------------------------------------------------------------- 3. content type
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                          "application/jsonx"])
def test_a_body_that_is_not_declared_json_gets_415(served, content_type):
    err = assert_json_error(post(served.url, b'{"input": "hi"}', content_type), 415, "unsupported_media_type")
    assert "application/json" in err["message"]


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=UTF-8",
                                          'application/json;charset="utf-8"'])
def test_json_with_or_without_a_utf8_charset_is_accepted(served, content_type):
    assert post(served.url, b'{"input": "hi"}', content_type).status_code == 200


def test_content_type_is_required_on_every_json_route():
    """The check sits in front of all routes: the LiteLLM guardrail route refuses form posts too."""
    from fastapi.testclient import TestClient

    from safetyneurons.serve.routes import GUARDRAIL_PATH, create_service

    g = fake_guard()
    with TestClient(create_service(g, score_fn=g.score)) as client:
        body = {"texts": ["hi"], "input_type": "request"}
        r = client.post(GUARDRAIL_PATH, content=json.dumps(body).encode(), headers={"Content-Type": "text/plain"})
        assert_json_error(r, 415, "unsupported_media_type")
        assert client.post(GUARDRAIL_PATH, json=body).status_code == 200
        assert client.get("/healthz").status_code == 200  # GET needs no Content-Type


def test_content_type_rule():
    assert content_type_problem("application/json") is None
    assert content_type_problem("application/json; charset=utf8") is None
    assert content_type_problem(None)[0] == content_type_problem("text/json")[0] == 415


# --------------------------------------------------------------------------------- 4. Host (rebinding)
def raw_request(sock_addr, head: bytes) -> tuple[int, bytes]:
    with socket.create_connection(sock_addr, timeout=10) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


@pytest.fixture(scope="module")
def loopback_served():
    """A server as `safetyneurons serve --host 127.0.0.1` (no API key) configures it."""
    with Served(app_for(allowed_hosts=allowed_hosts_for("127.0.0.1"))) as s:
        yield s


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "LOCALHOST", "localhost."])
def test_loopback_server_answers_loopback_host_names(loopback_served, host):
    port = loopback_served.sock.getsockname()[1]
    for value in (host, f"{host}:{port}"):
        status, _ = raw_request(loopback_served.sock.getsockname(),
                                f"GET /healthz HTTP/1.1\r\nHost: {value}\r\nConnection: close\r\n\r\n".encode())
        assert status == 200, value


@pytest.mark.parametrize("path,method", [("/healthz", "GET"), ("/v1/moderations", "POST")])
def test_loopback_server_refuses_a_rebound_host_name(loopback_served, path, method):
    """A page on attacker.example whose DNS now points at 127.0.0.1: the browser sends its own Host."""
    port = loopback_served.sock.getsockname()[1]
    head = (f"{method} {path} HTTP/1.1\r\nHost: attacker.example:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 15\r\nConnection: close\r\n\r\n{{\"input\": \"hi\"}}").encode()
    status, body = raw_request(loopback_served.sock.getsockname(), head)
    err = json.loads(body)["error"]
    assert status == 421 and err["code"] == "invalid_host"
    assert "attacker.example" in err["message"] and "--allowed-host" in err["message"]


def test_a_request_without_host_is_refused_when_hosts_are_checked(loopback_served):
    status, body = raw_request(loopback_served.sock.getsockname(), b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]["code"] == "missing_host"


def test_allowed_hosts_defaults():
    assert allowed_hosts_for("127.0.0.1") == ("localhost", "127.0.0.1", "[::1]")
    assert "[::1]" in allowed_hosts_for("::1") and "127.0.0.2" in allowed_hosts_for("127.0.0.2")
    assert allowed_hosts_for("0.0.0.0") is None  # reachable from outside anyway: the operator decides
    assert allowed_hosts_for("0.0.0.0", ["guard.internal"]) == ("localhost", "127.0.0.1", "[::1]", "guard.internal")
    assert "proxy.local" in allowed_hosts_for("127.0.0.1", ["Proxy.Local:8080"])
    assert allowed_hosts_for("127.0.0.1", ["*"]) is None
    assert host_name("[::1]:8000") == "[::1]" and host_name("Example.COM.:80") == "example.com"


def test_python_api_checks_no_host_by_default():
    """create_app without allowed_hosts answers any Host (TestClient sends "testserver")."""
    from fastapi.testclient import TestClient

    with TestClient(app_for()) as client:
        assert client.get("/healthz").status_code == 200
    with TestClient(app_for(allowed_hosts=["localhost"])) as client:
        assert_json_error(client.get("/healthz"), 421, "invalid_host")
        assert client.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200


def serve_cli(monkeypatch, *args, env=None):
    """`safetyneurons serve ARGS` in process with the guard load and the server loop stubbed: the app it
    would serve (None when it stopped before) and the CLI result."""
    import safetyneurons.cli.guard as cli_guard
    from safetyneurons.guard.guard import Guard

    apps = []
    monkeypatch.setattr(Guard, "load", classmethod(lambda cls, *a, **k: fake_guard()))
    monkeypatch.setattr(cli_guard, "run_server", lambda app, sock, *a, **k: apps.append(app))
    result = CliRunner().invoke(cli_guard.serve, ["--guard", "unused", "--port", "0", *args], env=env)
    return (apps[0] if apps else None), result


def test_serve_cli_checks_hosts_on_loopback_unless_told(monkeypatch):
    from fastapi.testclient import TestClient

    app, result = serve_cli(monkeypatch)
    assert result.exit_code == 0, result.output
    assert app.state.settings.allowed_hosts == ("localhost", "127.0.0.1", "[::1]")
    with TestClient(app, base_url="http://localhost:8000") as client:
        assert client.get("/healthz").status_code == 200
        assert_json_error(client.get("/healthz", headers={"Host": "rebound.example"}), 421, "invalid_host")
    app, _ = serve_cli(monkeypatch, "--allowed-host", "guard.example", "--allowed-host", "other.example")
    assert {"guard.example", "other.example", "localhost"} <= set(app.state.settings.allowed_hosts)
    app, _ = serve_cli(monkeypatch, "--allowed-host", "*")
    assert app.state.settings.allowed_hosts is None
    app, _ = serve_cli(monkeypatch, "--host", "0.0.0.0", "--api-key", "k")
    assert app.state.settings.allowed_hosts is None


# ------------------------------------------------------------------------------------- 5. API key bytes
KEYS = ["clé-sécrète-à", "ключ", "鍵🔑", "plain-ascii"]  # "à" is UTF-8 c3 a0: a0 is Latin-1 NBSP


@pytest.mark.parametrize("key", KEYS)
def test_any_utf8_api_key_matches(key):
    with Served(app_for(api_key=key)) as s:
        url = s.url + "/v1/moderations"
        ok = httpx.post(url, json={"input": "hi"}, headers={"Authorization": b"Bearer " + key.encode()})
        assert ok.status_code == 200, ok.text
        for wrong in (b"Bearer " + key.encode()[:-1], b"Bearer " + key.encode() + b"x", key.encode(), b""):
            r = httpx.post(url, json={"input": "hi"}, headers={"Authorization": wrong})
            assert_json_error(r, 401, "invalid_api_key")


def test_bearer_token_is_the_bytes_sent():
    key = "clé-à"
    header = ("Bearer " + key).encode("utf-8").decode("latin-1")  # how the server hands it over
    assert bearer_token(header) == key.encode("utf-8") == api_key_bytes(key)
    assert bearer_token("Basic abc") == b"" and bearer_token(" Bearer x") == b""


@pytest.mark.parametrize("key", ["bad \udcff key", " padded", "padded\t", "two\nlines", "nul\x00"])
def test_an_api_key_no_client_can_send_is_refused_at_startup(key, monkeypatch):
    with pytest.raises(UserError, match="API key"):
        api_key_bytes(key)
    with pytest.raises(UserError, match="API key"):
        app_for(api_key=key)
    if "\udcff" not in key and "\x00" not in key:  # argv cannot hold those
        app, result = serve_cli(monkeypatch, "--api-key", key)
        assert app is None and result.exit_code != 0 and "API key" in str(result.exception or result.output)


# ------------------------------------------------------------------------------ 6. stalled headers
def _stalled(addr, pattern: str) -> socket.socket:
    s = socket.create_connection(addr)
    partial = b"POST /v1/moderations HTTP/1.1\r\nHost: localhost\r\nContent-Len"
    if pattern == "fresh":
        s.sendall(partial)
    elif pattern == "after-a-response":  # a finished keep-alive request, then a stalled one
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.sendall(partial)
    elif pattern == "pipelined":
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" + partial)
    elif pattern == "request-line-only":
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
    return s


def test_forty_requests_stalled_mid_headers_are_all_closed(served):
    """header_timeout_s = 1: every connection stalled inside its headers is closed within a few seconds,
    however it got there. A regression fails here (rather than hanging) on the recv timeout."""
    patterns = ["fresh", "after-a-response", "pipelined", "request-line-only"]
    socks = [(p, _stalled(served.sock.getsockname(), p)) for p in patterns for _ in range(10)]
    t0 = time.monotonic()
    open_after = []
    for pattern, s in socks:
        s.settimeout(max(0.1, 6 - (time.monotonic() - t0)))
        try:
            while s.recv(65536):
                pass
        except socket.timeout:
            open_after.append(pattern)
        except ConnectionResetError:
            pass
        finally:
            s.close()
    assert not open_after, f"{len(open_after)} of {len(socks)} still open after 6 s: {open_after}"
    assert post(served.url, b'{"input": "still serving"}').status_code == 200
