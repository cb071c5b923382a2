"""Issue 22, LiteLLM's guardrail route: a caller can only make the guard stricter, nothing unread is passed,
every message (any role, tool calls) is read, and what cannot be read blocks. Real uvicorn on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from safetyneurons.guard.guard import Guard, GuardResult
from safetyneurons.serve.routes import GUARDRAIL_PATH, create_service
from builders import SAFE, UNSAFE, Served, build_guard, error_code

BAD, GOOD = UNSAFE[0], SAFE[0]
MARK = "bomb"  # the fake scorer's notion of harm


@pytest.fixture(scope="module")
def guard(tmp_path_factory, cache):
    path, lm, _, _ = build_guard(tmp_path_factory.mktemp("g"))
    g = Guard.load(path, lm=lm)
    p_bad, p_good = (r.unsafe_probability for r in g.score([BAD, GOOD]))
    assert p_bad > p_good
    g.threshold = (p_bad + p_good) / 2  # BAD is flagged and GOOD is not
    return g


def _text(item) -> str:
    return item if isinstance(item, str) else "\n".join(m["content"] for m in item)


def fake_score(seen: list):
    """Flags any input holding MARK (text, or anywhere in a conversation); records what it was given."""
    def score(inputs):
        seen.extend(inputs)
        return [GuardResult(0.9, True) if MARK in _text(x) else GuardResult(0.1, False) for x in inputs]
    return score


@pytest.fixture(scope="module")
def served(guard):
    with Served(create_service(guard, max_inputs=4, max_chars=300)) as s:
        yield s


@pytest.fixture(scope="module")
def faked(guard):
    seen: list = []
    with Served(create_service(guard, score_fn=fake_score(seen), max_inputs=4, max_chars=300)) as s:
        s.seen = seen
        yield s


def request(texts=None, input_type="request", messages=None, **extra) -> dict:
    body = {"input_type": input_type, "litellm_call_id": "call-1", "litellm_trace_id": None,
            "structured_messages": messages, "images": None, "tools": None, "texts": texts, "request_data": {},
            "request_headers": None, "litellm_version": "1.110.2", "additional_provider_specific_params": {},
            "tool_calls": None, "model": "m"}
    body.update(extra)
    return body


def post(served, body):
    return httpx.post(served.url + GUARDRAIL_PATH, json=body, timeout=60)


# ------------------------------------------------------------------------ 1. only stricter thresholds
def test_a_caller_cannot_loosen_the_threshold(served, guard):
    looser = request([BAD], additional_provider_specific_params={"threshold": 1.0})
    assert error_code(post(served, looser), 422) == "threshold_not_allowed"  # was: NONE for every text
    just_above = request([BAD], additional_provider_specific_params={"threshold": guard.threshold + 1e-3})
    assert error_code(post(served, just_above), 422) == "threshold_not_allowed"
    same = post(served, request([BAD], additional_provider_specific_params={"threshold": guard.threshold})).json()
    assert same["action"] == "BLOCKED" and same["safetyneurons"]["threshold"] == guard.threshold
    stricter = post(served, request([GOOD], additional_provider_specific_params={"threshold": 0.0})).json()
    assert stricter["action"] == "BLOCKED" and stricter["safetyneurons"]["threshold"] == 0.0
    for bad in (float("nan"), -0.1, "0.5", True):
        body = request([GOOD], additional_provider_specific_params={"threshold": bad})
        r = httpx.post(served.url + GUARDRAIL_PATH, timeout=60, headers={"Content-Type": "application/json"},
                       content=json.dumps(body))  # NaN as the JSON literal Python writes
        assert error_code(r, 422) == "invalid_threshold"


def test_operating_points_follow_the_same_rule(served, guard):
    points = guard.thresholds
    for name, t in points.items():
        r = post(served, request([GOOD], additional_provider_specific_params={"operating_point": name}))
        if t <= guard.threshold:
            assert r.status_code == 200 and r.json()["safetyneurons"]["threshold"] == t
        else:
            assert error_code(r, 422) == "threshold_not_allowed"
    r = post(served, request([GOOD], additional_provider_specific_params={"operating_point": "lenient"}))
    assert error_code(r, 422) == "invalid_threshold"


def test_the_operator_may_allow_callers_to_loosen_it(guard):
    with Served(create_service(guard, allow_caller_loosen=True)) as s:
        r = post(s, request([BAD], additional_provider_specific_params={"threshold": 1.0}))
        assert r.status_code == 200 and r.json()["action"] == "NONE"
        assert httpx.get(s.url + "/v1/guard").json()["server"]["allow_caller_loosen"] is True


# ----------------------------------------------------------------------- 2. nothing unread passes
def test_without_texts_the_structured_messages_are_read_in_every_role(served):
    for role in ("system", "assistant", "user", "tool"):
        messages = [{"role": "user", "content": GOOD}, {"role": role, "content": BAD},
                    {"role": "user", "content": "Thanks!"}]
        body = post(served, request(None, messages=messages)).json()
        assert body["action"] == "BLOCKED", (role, body)  # was: NONE (nothing read)
        assert len(body["safetyneurons"]["unsafe_probability"]) == 1  # one conversation, one verdict
    ok = post(served, request([], messages=[{"role": "user", "content": GOOD}])).json()
    assert ok["action"] == "NONE"
    reply = post(served, request(None, "response", messages=[{"role": "user", "content": GOOD},
                                                            {"role": "assistant", "content": BAD}])).json()
    assert reply["action"] == "BLOCKED"  # a post-call check ends with the assistant's reply: it is read


def test_tool_calls_are_read(faked):
    call = {"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"q": "a bomb"}'}}
    messages = [{"role": "user", "content": "Look this up."}, {"role": "assistant", "content": None,
                                                              "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "no results"}]
    faked.seen.clear()
    assert post(faked, request(None, messages=messages)).json()["action"] == "BLOCKED"
    assert any("search" in _text(x) and MARK in _text(x) for x in faked.seen)
    result = [{"role": "user", "content": "Look this up."}, {"role": "tool", "content": "how to build a bomb"}]
    assert post(faked, request(None, messages=result)).json()["action"] == "BLOCKED"
    top = post(faked, request(["Here you go."], "response", tool_calls=[call])).json()  # LiteLLM's own field
    assert top["action"] == "BLOCKED" and len(top["safetyneurons"]["unsafe_probability"]) == 2
    assert post(faked, request(["Here you go."], "response")).json()["action"] == "NONE"


@pytest.mark.parametrize("body", [request(None), request([]), request(["", "   "]), request(None, messages=[]),
                                  request(None, messages=[{"role": "user", "content": ""}]),
                                  request(None, messages=[{"role": "user", "content": " \u200b "}])])
def test_nothing_to_read_is_422_never_none(served, body):
    assert error_code(post(served, body), 422) == "nothing_to_read"


def test_images_cannot_be_read_so_they_block(served):
    body = post(served, request([GOOD], images=["data:image/png;base64,iVBORw0KGgo="])).json()
    assert body["action"] == "BLOCKED" and "image" in body["blocked_reason"]
    part = [{"role": "user", "content": [{"type": "text", "text": GOOD},
                                          {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    body = post(served, request(None, messages=part)).json()
    assert body["action"] == "BLOCKED" and "image_url" in body["blocked_reason"]


# ------------------------------------------------------------ 4. fail closed: limits and NaN block
def test_over_the_limits_blocks_instead_of_an_error(served):
    for body in (request(["x" * 301]), request(["a", "b", "c", "d", "e"]),
                 request(None, messages=[{"role": "user", "content": "y" * 301}])):
        r = post(served, body)
        assert r.status_code == 200 and r.json()["action"] == "BLOCKED", r.text  # was: 413 (an error)
        assert "safetyneurons guard" in r.json()["blocked_reason"]


def test_a_non_finite_probability_blocks(guard):
    def nan_scores(inputs):
        return [GuardResult(float("nan"), False) for _ in inputs]

    with Served(create_service(guard, score_fn=nan_scores)) as s:
        r = post(s, request([GOOD]))
        assert r.status_code == 200 and r.json()["action"] == "BLOCKED"  # was: NONE (nan >= t is false)
        assert r.json()["safetyneurons"]["unsafe_probability"] == [1.0]
        m = httpx.post(s.url + "/v1/moderations", json={"input": GOOD}, timeout=60)
        assert m.status_code == 200 and m.json()["results"][0]["flagged"] is True
        assert m.json()["results"][0]["category_scores"]["unsafe"] == 1.0


# ------------------------------------------------------------- issue 25: the operating point in use
def test_the_response_names_the_operating_point_in_use(guard):
    g = Guard.load(guard.path, lm=guard.lm)  # at its calibrated point (the fixture's guard has a hand-set cut)
    with Served(create_service(g)) as s:
        served = post(s, request([GOOD])).json()["safetyneurons"]
        assert (served["operating_point"], served["threshold"]) == (g.operating_point, g.threshold) and \
            g.operating_point == "strict"
        named = post(s, request([GOOD], additional_provider_specific_params={"operating_point": "strict"})).json()
        assert named["safetyneurons"]["operating_point"] == "strict"
        own = post(s, request([GOOD], additional_provider_specific_params={"threshold": g.threshold / 2})).json()
        assert (own["safetyneurons"]["operating_point"], own["safetyneurons"]["threshold"]) == (None, g.threshold / 2)


# -------------------------------------------------------- issue 25: examples/litellm_guardrail.py
def test_the_litellm_example_builds_its_throwaway_guard_without_the_test_suite(tmp_path):
    """--throwaway builds and serves its guard with the library's public API: no module of tests/ or benchmarks/
    is imported, and the guard's own checks (moderation verdicts, a looser threshold refused) pass on it."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(root / 'examples')!r})\n"
        "import litellm_guardrail as ex\n"
        "with ex.throwaway_server('tiny') as url:\n"
        "    flags, probs = ex.guard_verdicts(url, None, None)\n"
        "    served, loosen = ex.served_settings(url, None)\n"
        "    assert ex.looser_is_refused(url, None, served, loosen)\n"
        "    assert flags == [p >= served for p in probs] and len(probs) == len(ex.PROMPTS)\n"
        f"roots = ({str(root / 'tests')!r}, {str(root / 'benchmarks')!r})\n"
        "bad = sorted(n for n, m in list(sys.modules.items()) if str(getattr(m, '__file__', '') or '').startswith(roots))\n"
        "print('FROM_TESTS', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "SAFETYNEURONS_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "FROM_TESTS []"
    assert "threshold_not_allowed" in out.stdout
