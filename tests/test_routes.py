"""The guard service's plug-in routes end to end: real uvicorn on loopback, the official `openai` client,
and LiteLLM's generic guardrail request shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from safetyneurons.guard.chat import Delta, GuardedChat
from safetyneurons.guard.guard import Guard
from safetyneurons.serve.chat_routes import public_model_name
from safetyneurons.serve.routes import GUARDRAIL_PATH, create_service
from builders import SAFE, UNSAFE, Served, build_guard, free_port, run_cli, wait_until_up

KEY = "chat-key"
BAD, GOOD = UNSAFE[0], SAFE[0]


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    path, lm, _, _ = build_guard(tmp_path_factory.mktemp("g"))
    g = Guard.load(path, lm=lm)
    p_bad, p_good = (r.unsafe_probability for r in g.score([BAD, GOOD]))
    assert p_bad > p_good  # the planted signal (the probe was fitted on these prompts)
    g.threshold = (p_bad + p_good) / 2  # so BAD is flagged and GOOD is not, deterministically
    return g


@pytest.fixture(scope="module")
def served(guard):
    chat = GuardedChat(guard, mode="block", refusal="Sorry, I can't help with that.")
    with Served(create_service(guard, chat=chat, max_tokens=16, api_key=KEY, max_inputs=4, max_chars=300)) as s:
        s.chat = chat
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield s


def ask(served, text, **kw):
    return served.client.chat.completions.create(model="anything", messages=[{"role": "user", "content": text}],
                                                 **kw)


# ---------------------------------------------------------------------------------- chat completions
def test_a_benign_chat_completion_answers_with_usage_and_the_guard_score(served, guard):
    steps = served.chat.decode_steps
    r = ask(served, GOOD, max_tokens=6, temperature=0)
    [choice] = r.choices
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert served.chat.decode_steps - steps == 5  # the first token comes from the prefill's logits
    ext = r.model_extra["safetyneurons"]
    assert ext["unsafe_probability"] == pytest.approx(guard.score(GOOD)[0].unsafe_probability, abs=1e-6)
    assert ext["flagged"] is False and ext["blocked"] is False and ext["guard"] == guard.name
    assert r.model == public_model_name(served.chat) == served.client.models.list().data[0].id
    assert r.model.endswith("+" + guard.name) and "/" not in r.model  # no local path


def test_a_harmful_chat_completion_is_refused_without_generating(served, guard):
    steps, prefills = served.chat.decode_steps, served.chat.prefills
    r = ask(served, BAD, max_tokens=8)
    [choice] = r.choices
    assert choice.finish_reason == "content_filter"
    assert choice.message.content == "Sorry, I can't help with that." == choice.message.refusal
    assert served.chat.decode_steps == steps and served.chat.prefills == prefills + 1  # no generation step ran
    assert r.usage.completion_tokens == 0
    ext = r.model_extra["safetyneurons"]
    assert ext["blocked"] is True and ext["unsafe_probability"] >= guard.threshold


def test_streaming_gives_the_same_answer_in_pieces(served):
    once = ask(served, GOOD, max_tokens=10, temperature=0)
    whole = once.choices[0].message.content
    chunks = list(ask(served, GOOD, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["safetyneurons"]["blocked"] is False
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [once.choices[0].finish_reason] and not chunks[-1].choices
    assert chunks[-1].usage.model_dump() == once.usage.model_dump()
    refused = list(ask(served, BAD, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in refused) == "Sorry, I can't help with that."
    assert refused[-1].choices[0].finish_reason == "content_filter"


def test_raw_sse_wire_format_ends_with_done(served):
    with httpx.stream("POST", served.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "m", "messages": [{"role": "user", "content": GOOD}], "stream": True,
                            "max_tokens": 3}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("body,status,code", [
    ({"model": "m"}, 422, "missing_messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 422, "invalid_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 17}, 422, "invalid_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 422, "invalid_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": 5}, 422, "invalid_stop"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422, "invalid_messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x" * 301}]}, 413, "input_too_long"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}] * 5}, 413, "too_many_inputs"),
])
def test_chat_requests_get_the_services_limits_and_json_errors(served, body, status, code):
    r = httpx.post(served.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_chat_needs_the_api_key(served):
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": "m", "messages": []}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])


class Broken(GuardedChat):
    """Generation fails after the first piece (a bug or a device error mid-reply)."""

    def generate(self, pre, settings):
        yield Delta("a")
        raise RuntimeError("boom in the decoder")


def test_generation_failures_are_json_500_or_an_sse_error_and_the_server_keeps_serving(guard):
    chat = Broken(guard, mode="monitor", context_length=40)
    with Served(create_service(guard, chat=chat)) as s:
        url = s.url + "/v1/chat/completions"
        msg = {"model": "m", "messages": [{"role": "user", "content": GOOD}]}
        r = httpx.post(url, json=msg, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "boom" not in r.text
        with httpx.stream("POST", url, json={**msg, "stream": True}, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
        assert events[-1]["error"]["type"] == "server_error" and events[1]["choices"][0]["delta"]["content"] == "a"
        long = {"model": "m", "messages": [{"role": "user", "content": "tell me about the sea " * 10}]}
        r = httpx.post(url, json=long, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "context_length_exceeded"
        assert httpx.post(s.url + "/v1/moderations", json={"input": GOOD}, timeout=60).status_code == 200


# -------------------------------------------------------------------------------------- moderation
def test_openai_client_parses_moderations_of_every_input_shape(served, guard):
    want = [r.unsafe_probability for r in guard.score([BAD, GOOD])]
    r = served.client.moderations.create(model="omni-moderation-latest", input=[BAD, GOOD])
    assert [m.flagged for m in r.results] == [True, False]  # a list of strings: one result per string
    assert [m.category_scores.model_extra["unsafe"] for m in r.results] == pytest.approx(want, abs=1e-6)
    assert r.results[0].category_applied_input_types.model_extra["unsafe"] == ["text"]
    parts = served.client.moderations.create(input=[{"type": "text", "text": GOOD}, {"type": "text", "text": BAD}])
    assert len(parts.results) == 1  # content parts: one input, one result (OpenAI's multi-modal input)
    assert parts.results[0].category_scores.model_extra["unsafe"] == pytest.approx(
        guard.score(GOOD + BAD)[0].unsafe_probability, abs=1e-6)
    one = served.client.moderations.create(input=GOOD)
    assert len(one.results) == 1 and one.results[0].flagged is False
    r = httpx.post(served.url + "/v1/moderations", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"input": [{"type": "image_url", "image_url": {"url": "http://x"}}]})
    assert r.status_code == 422 and "image_url" in r.json()["error"]["message"]


# --------------------------------------------------------------------------------- LiteLLM guardrail
def litellm_request(texts, input_type="request", **params):
    """The body LiteLLM's generic_guardrail_api sends: GenericGuardrailAPIRequest.model_dump(mode="json"), as
    dumped from litellm 1.110.2 (older versions send a subset of these fields)."""
    return {"input_type": input_type, "litellm_call_id": "call-123", "litellm_trace_id": "trace-9",
            "structured_messages": [{"role": "user", "content": t} for t in texts], "images": None, "tools": None,
            "texts": texts, "request_data": {"user_api_key_hash": "abc"}, "request_headers": None,
            "litellm_version": "1.110.2", "additional_provider_specific_params": params, "tool_calls": None,
            "model": "guarded-model"}


def guardrail(served, body, key=KEY):
    return httpx.post(served.url + GUARDRAIL_PATH, json=body, timeout=60,
                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})


def test_litellm_generic_guardrail_blocks_harmful_and_passes_benign(served, guard):
    r = guardrail(served, litellm_request([GOOD, BAD]))
    assert r.status_code == 200
    body = r.json()
    assert body["action"] == "BLOCKED" and "text 1" in body["blocked_reason"]
    assert body["safetyneurons"]["litellm_call_id"] == "call-123"
    ok = guardrail(served, litellm_request([GOOD], input_type="response")).json()
    assert ok["action"] == "NONE" and ok["blocked_reason"] is None
    # the threshold travels in additional_provider_specific_params: a caller may only make the guard stricter
    assert guardrail(served, litellm_request([GOOD], threshold=0.0)).json()["action"] == "BLOCKED"
    assert guardrail(served, litellm_request([BAD], threshold=1.0)).status_code == 422


@pytest.mark.parametrize("body,status", [({"texts": ["x"]}, 422), ({"input_type": "later", "texts": ["x"]}, 422),
                                         ({"input_type": "request", "texts": "x"}, 422),
                                         (litellm_request(["x"], threshold=2), 422), (litellm_request([]), 422)])
def test_litellm_guardrail_bad_requests_are_json_errors(served, body, status):
    r = guardrail(served, body)
    assert r.status_code == status and r.json()["error"]["message"]
    assert guardrail(served, litellm_request(["x"]), key="nope").status_code == 401


def test_serve_generate_cli_end_to_end(guard, tmp_path):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", SAFETYNEURONS_API_KEY=KEY)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w+") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "safetyneurons", "serve", "--guard", str(guard.path),
                                 "--port", str(port), "--generate", "--max-tokens", "4", "--threshold",
                                 str(guard.threshold), "--refusal", "Nope."], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, text=True)
        try:
            url = wait_until_up(proc, port, log_path, timeout=300)  # a loaded CI machine can be slow to import torch
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
            good = client.chat.completions.create(model="m", messages=[{"role": "user", "content": GOOD}])
            assert good.choices[0].finish_reason in ("stop", "length") and good.usage.completion_tokens <= 4
            bad = client.chat.completions.create(model="m", messages=[{"role": "user", "content": BAD}])
            assert bad.choices[0].finish_reason == "content_filter" and bad.choices[0].message.content == "Nope."
            with pytest.raises(openai.UnprocessableEntityError):
                client.chat.completions.create(model="m", max_tokens=5, messages=[{"role": "user", "content": GOOD}])
        finally:
            proc.terminate()
            proc.wait(30)
    out = log_path.read_text()
    assert "chat: " in out and "POST /v1/chat/completions 200 n_inputs=1" in out and BAD not in out


def test_serve_generate_cli_validates_options():
    r = run_cli("serve", "--guard", "nowhere", "--generate", "--max-tokens", "0")
    assert r.returncode == 2 and "max-tokens" in r.stderr and "Traceback" not in r.stderr
