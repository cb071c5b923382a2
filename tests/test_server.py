"""HTTP service: a real uvicorn server on a free loopback port, called over HTTP with httpx."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from safetyneurons.errors import UserError
from safetyneurons.serve.server import create_app, is_loopback
from builders import QUERIES, Served, free_port, run_cli, wait_until_up

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# the `guard` fixture (the tiny guard of builders.build_guard, loaded) is in tests/conftest.py
@pytest.fixture(scope="module")
def served(guard):
    calls = []

    def score(texts):  # instrumented guard.score: records each batch it gets
        calls.append(len(texts))
        return guard.score(texts)

    app = create_app(guard, api_key=KEY, max_inputs=4, max_chars=200, max_batch_size=8, max_wait_ms=100,
                     score_fn=score)
    with Served(app) as s:
        s.calls = calls
        yield s


def post(served, body, headers=AUTH, **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(served.url + "/v1/moderations", content=content,
                      headers={"Content-Type": "application/json", **headers}, timeout=30, **kw)


def expected(guard, texts):
    return [r.unsafe_probability for r in guard.score(texts)]


# ----------------------------------------------------------------------------------------- happy path
def test_moderation_of_one_input_has_the_openai_shape(served, guard):
    r = post(served, {"input": QUERIES[0], "model": "anything"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("modr-") and body["model"] == guard.name
    [res] = body["results"]
    assert set(res) == {"flagged", "categories", "category_scores", "category_applied_input_types"}
    assert res["category_applied_input_types"] == {**{k: [] for k in res["categories"]}, "unsafe": ["text"]}  # no heads
    p = expected(guard, [QUERIES[0]])[0]
    assert res["category_scores"]["unsafe"] == pytest.approx(p, abs=1e-6)
    assert res["flagged"] is res["categories"]["unsafe"] is (res["category_scores"]["unsafe"] >= guard.threshold)


def test_a_batch_comes_back_in_order(served, guard):
    r = post(served, {"input": QUERIES})
    assert r.status_code == 200, r.text
    got = [x["category_scores"]["unsafe"] for x in r.json()["results"]]
    np.testing.assert_allclose(got, expected(guard, QUERIES), rtol=1e-5, atol=1e-6)


def test_concurrent_requests_are_micro_batched_and_answered_correctly(served, guard):
    texts = [f"{q} ({k})" for k, q in enumerate(QUERIES * 2)]  # 8 distinct single-input requests
    want = {t: p for t, p in zip(texts, expected(guard, texts))}
    served.calls.clear()
    barrier = threading.Barrier(len(texts))

    def one(t):
        barrier.wait()
        return t, post(served, {"input": t})

    with concurrent.futures.ThreadPoolExecutor(len(texts)) as ex:
        answers = list(ex.map(one, texts))
    for t, r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["category_scores"]["unsafe"] == pytest.approx(want[t], abs=1e-5)
    assert sum(served.calls) == len(texts)
    assert max(served.calls) > 1 and len(served.calls) < len(texts)  # gathered into fewer, larger batches
    assert max(served.calls) <= 8  # never more than max_batch_size


def test_health_and_guard_metadata(served, guard):
    r = httpx.get(served.url + "/healthz")  # open without a key, for load balancers
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["guard"] == guard.name
    assert r.json()["batcher"]["alive"] is True
    r = httpx.get(served.url + "/v1/guard", headers=AUTH)
    assert r.status_code == 200
    md = r.json()
    assert md["id"] == guard.id and md["hook_point"] == "mlp_neurons" and md["threshold_in_use"] == guard.threshold
    assert md["neuron_set"]["count"] == len(guard.neuron_set) and md["layers_run"] == 2
    assert md["server"]["max_inputs"] == 4 and md["server"]["auth"] == "bearer"
    assert KEY not in r.text


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("body,status,code", [
    (b'{"input": "unterminated', 400, "invalid_json"),
    (b"\xff\xfe not utf8", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b'["a list"]', 422, "invalid_body"),
    (b'{"text": "no input field"}', 422, "missing_input"),
    (b'{"input": 42}', 422, "invalid_input"),
    (b'{"input": ["ok", 42]}', 422, "invalid_input"),
    (b'{"input": []}', 422, "empty_input"),
    (b'{"input": "   "}', 422, "empty_input"),
    (b'{"input": "ok", "model": 3}', 422, "invalid_model"),
])
def test_malformed_requests_get_a_json_error_never_500(served, body, status, code):
    r = post(served, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]


def test_oversized_inputs_are_refused_with_413(served):
    r = post(served, {"input": "x" * 201})
    assert r.status_code == 413 and r.json()["error"]["code"] == "input_too_long"
    r = post(served, {"input": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_inputs"
    r = post(served, b'{"input": "' + b"y" * 2_000_000 + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    def chunks():  # no Content-Length: the body is counted while it streams in
        yield b'{"input": "'
        for _ in range(100):
            yield b"z" * 10_000
        yield b'"}'

    r = httpx.post(served.url + "/v1/moderations", content=chunks(), timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert post(served, {"input": "x" * 200}).status_code == 200  # at the limit is fine


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}])
def test_missing_or_wrong_api_key_gets_401(served, headers):
    r = post(served, {"input": "hi"}, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(served.url + "/v1/guard", headers=headers).status_code == 401
    assert post(served, b"{not json", headers=headers).status_code == 401  # the key is checked first


def test_unknown_route_and_method_are_json_errors(served):
    r = httpx.get(served.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(served.url + "/v1/moderations", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


def test_one_log_line_per_request_without_prompt_text(served, caplog):
    secret = "a very private prompt about cats"
    def lines():  # this test's requests (a server of an earlier test may still log its last line)
        return [r.getMessage() for r in caplog.records if r.name == "safetyneurons.serve.server"
                and r.getMessage().startswith("POST /v1/moderations")]

    with caplog.at_level(logging.INFO, logger="safetyneurons.serve.server"):
        assert post(served, {"input": [secret, "hello"]}).status_code == 200
        assert post(served, {"input": "x"}, headers={}).status_code == 401
        deadline = time.monotonic() + 5
        while len(lines()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = lines()
    assert len(lines) == 2
    assert lines[0].startswith("POST /v1/moderations 200 n_inputs=2 ") and lines[0].endswith("ms")
    assert lines[1].startswith("POST /v1/moderations 401 n_inputs=0 ")
    assert all(secret not in line for line in lines)


def test_log_prompts_opt_in_and_no_key_mode(guard, caplog):
    with Served(create_app(guard, log_prompts=True)) as s, caplog.at_level(logging.INFO, "safetyneurons.serve.server"):
        r = httpx.post(s.url + "/v1/moderations", json={"input": "tell me about cats"})
        assert r.status_code == 200  # no api_key: open
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.01)
    assert any("tell me about cats" in r.getMessage() for r in caplog.records)


def test_scoring_failure_is_a_json_500_and_the_server_keeps_serving(guard):
    state = {"fail": True}

    def flaky(texts):
        if state["fail"]:
            raise RuntimeError("boom")
        return guard.score(texts)

    with Served(create_app(guard, score_fn=flaky)) as s:
        r = httpx.post(s.url + "/v1/moderations", json={"input": "hi"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "boom" not in r.text
        state["fail"] = False
        assert httpx.post(s.url + "/v1/moderations", json={"input": "hi"}).status_code == 200


def test_settings_are_validated(guard):
    with pytest.raises(UserError, match="max-inputs"):
        create_app(guard, max_inputs=0)
    with pytest.raises(UserError, match="API key is empty"):
        create_app(guard, api_key=" ")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")


# ----------------------------------------------------------------------------------------------- CLI
def test_serve_cli_end_to_end_with_env_api_key(guard, cache, tmp_path):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", SAFETYNEURONS_CACHE=str(cache), SAFETYNEURONS_API_KEY=KEY)
    log_file = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "safetyneurons", "serve", "--guard", str(guard.path),
                             "--port", str(port), "--max-inputs", "2"], env=env, stdout=log_file,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = wait_until_up(proc, port, tmp_path / "serve.log")
        assert httpx.post(url + "/v1/moderations", json={"input": "hi"}).status_code == 401
        r = httpx.post(url + "/v1/moderations", json={"input": QUERIES[:2]}, headers=AUTH, timeout=30)
        assert r.status_code == 200
        np.testing.assert_allclose([x["category_scores"]["unsafe"] for x in r.json()["results"]],
                                   expected(guard, QUERIES[:2]), rtol=1e-5, atol=1e-6)
        assert httpx.post(url + "/v1/moderations", json={"input": ["a", "b", "c"]}, headers=AUTH).status_code == 413
    finally:
        proc.terminate()
        proc.wait(30)
    out = (tmp_path / "serve.log").read_text()
    assert f"on http://127.0.0.1:{port}" in out
    assert "POST /v1/moderations 200 n_inputs=2" in out and QUERIES[0] not in out


def test_serve_cli_bad_inputs_exit_2(guard, cache, tmp_path):
    r = run_cli("serve", "--guard", tmp_path / "nope", "--port", free_port(), cache=cache)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = run_cli("serve", "--guard", guard.path, "--port", busy.getsockname()[1], cache=cache)
    assert r.returncode == 2 and "Cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", "--guard", guard.path, "--port", "70000", cache=cache)
    assert r.returncode == 2 and "Traceback" not in r.stderr
