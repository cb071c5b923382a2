"""Issue 22, guarded chat: parameters that used to give 500 get 422 (or a sane reading), stop strings are
bounded, the model name shows no local path, a guard probability that is not a number refuses, and a long prompt
takes bounded turns of the worker (the guard's reading in slices, the prefill in chunks), so another client's
moderation request is served between them."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import threading
import time

import httpx
import numpy as np
import pytest

from safetyneurons.guard.chat import GuardedChat, SamplingSettings
from safetyneurons.serve.chat_routes import full_pass_weight
from safetyneurons.serve.routes import create_service
from builders import SAFE, Served, error_code

GOOD = SAFE[0]
LONG = "Please read these notes about our garden before you answer: tomatoes, basil and beans. " * 2


# the `guard` fixture (the tiny guard of builders.build_guard, loaded) is in tests/conftest.py
@pytest.fixture(scope="module")
def served(guard):
    chat = GuardedChat(guard, mode="monitor")
    with Served(create_service(guard, chat=chat, max_tokens=8)) as s:
        s.chat = chat
        yield s


def complete(served, **kw):
    body = {"model": "m", "messages": [{"role": "user", "content": GOOD}], "max_tokens": 6, **kw}
    return httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("seed", [2 ** 64, 10 ** 30, -(2 ** 63) - 1])
def test_a_seed_out_of_range_is_422(served, seed):
    assert error_code(complete(served, seed=seed, temperature=1), 422) == "invalid_parameter"  # was: 500


@pytest.mark.parametrize("seed", [2 ** 64 - 1, -(2 ** 63), 0])
def test_seeds_in_range_sample(served, seed):
    assert complete(served, seed=seed, temperature=1).status_code == 200


def test_a_tiny_temperature_is_greedy(served):
    greedy = complete(served, temperature=0).json()["choices"][0]["message"]["content"]
    for t in (1e-300, 5e-324, 1e-4):
        r = complete(served, temperature=t)
        assert r.status_code == 200, r.text  # was: 500 (the logits overflowed to inf)
        assert r.json()["choices"][0]["message"]["content"] == greedy


def test_stop_strings_are_bounded(served):
    assert error_code(complete(served, stop="x" * 65), 422) == "invalid_stop"  # was: accepted (O(L^2) a token)
    assert error_code(complete(served, stop=["a", "y" * 10_000]), 422) == "invalid_stop"
    assert complete(served, stop="z" * 64).status_code == 200


def test_the_model_name_shows_no_local_path(served, guard):
    r = complete(served, temperature=0)
    listed = httpx.get(served.url + "/v1/models", timeout=60).json()["data"][0]["id"]
    model_dir = str(guard.lm.ref)
    assert model_dir.startswith("/")  # precondition: the guard's model is a local directory
    assert r.json()["model"] == listed and model_dir not in r.text and "/" not in listed  # was: the path
    assert listed.startswith("local-") and listed.endswith("+" + guard.name)


def nan_guard(guard):
    """The guard with a probe that gives NaN for everything (a broken probe, or a poisoned input)."""
    g = copy.copy(guard)
    g.probability = lambda X, pieces=None: np.full(len(X), np.nan)
    return g


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("text", [GOOD, LONG], ids=["read-in-the-prefill", "read-in-slices"])
def test_a_non_finite_guard_probability_refuses(guard, stream, text):
    g = nan_guard(guard)
    with Served(create_service(g, chat=GuardedChat(g, mode="block", refusal="No."), max_tokens=8,
                               slice_tokens=64)) as s:
        body = {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if stream:
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            ext = events[0]["safetyneurons"]
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
            finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
        else:
            ext, choice = r.json()["safetyneurons"], r.json()["choices"][0]
            text, finish = choice["message"]["content"], choice["finish_reason"]
        assert (text, finish) == ("No.", "content_filter")
        assert ext["blocked"] is True and ext["flagged"] is True and ext["unsafe_probability"] == 1.0


# ------------------------------------------------------------------ a long prompt takes bounded turns
class Recorded:
    """Records the cost and function of every call turn the service's worker is given."""

    def __init__(self, batcher):
        self.turns: list[tuple[str, int]] = []
        inner = batcher.call

        async def call(fn, *args, client="", cost=1):
            self.turns.append((getattr(fn, "__name__", str(fn)), cost))
            return await inner(fn, *args, client=client, cost=cost)

        batcher.call = call


def test_a_long_chat_prompt_takes_bounded_turns_and_reads_as_guard_score(guard):
    """The guard's reading of a long prompt goes in slices and the prefill in chunks, each a turn of at most
    max_batch_tokens (64) tokens; the verdict is Guard.score's and the greedy reply that of one unchunked
    prefill (the chat used to read and prefill the whole prompt in one turn)."""
    chat = GuardedChat(guard, mode="monitor")
    app = create_service(guard, chat=chat, max_tokens=8, max_batch_tokens=64)
    rec = Recorded(app.state.batcher)
    with Served(app) as s:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": LONG}], "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    n = r.json()["usage"]["prompt_tokens"]
    assert n * full_pass_weight(chat) > 3 * 64  # precondition: one prefill turn would cost far more than 64
    reads = [c for name, c in rec.turns if name == "timed"]
    prefill = [c for name, c in rec.turns if name == "next"]
    assert len(reads) >= 2 and len(prefill) >= 3, rec.turns
    assert max(c for _, c in rec.turns[1:]) <= 64, rec.turns  # [0]: tokenising
    assert sum(reads) == guard.read_cost([LONG])[0]  # every piece read once
    ext = r.json()["safetyneurons"]
    assert ext["unsafe_probability"] == pytest.approx(guard.score(LONG)[0].unsafe_probability, abs=1e-5)
    alone = chat.complete([{"role": "user", "content": LONG}], SamplingSettings(max_tokens=6, temperature=0))
    assert r.json()["choices"][0]["message"]["content"] == alone.text


def test_a_moderation_request_is_served_before_a_long_chat_prefill_completes(guard):
    """Another client's moderation request, queued while the chat's prefill runs, is scored before the prefill
    has read the whole prompt (it used to wait for the whole prefill: one turn)."""
    events: list[tuple[str, int]] = []
    fed = [0]  # prompt and decoding tokens the model (with its LM head) has read so far
    started = threading.Event()

    def score(inputs):
        events.append(("moderation", fed[0]))
        return guard.score(inputs)

    app = create_service(guard, chat=GuardedChat(guard, mode="monitor"), score_fn=score, max_tokens=4,
                         max_batch_tokens=64, max_wait_ms=1)

    def model_call(module, args, kwargs):  # the whole model's passes: prefill chunks and decoding steps
        if not started.is_set():
            started.set()
            for _ in range(3000):  # hold this first chunk until the moderation request is queued
                if app.state.batcher.queued:
                    break
                time.sleep(0.01)
        fed[0] += kwargs["input_ids"].shape[1]

    handle = guard.lm.model.register_forward_pre_hook(model_call, with_kwargs=True)
    try:
        with Served(app) as s, concurrent.futures.ThreadPoolExecutor(1) as ex:
            body = {"model": "m", "messages": [{"role": "user", "content": LONG}], "max_tokens": 2, "temperature": 0}
            chat = ex.submit(httpx.post, s.url + "/v1/chat/completions", json=body, timeout=60)
            assert started.wait(60)
            with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60) as other:
                assert other.post(s.url + "/v1/moderations", json={"input": GOOD}).status_code == 200
            r = chat.result()
    finally:
        handle.remove()
    assert r.status_code == 200, r.text
    n = r.json()["usage"]["prompt_tokens"]
    [(_, at)] = events
    assert 0 < at < n, (at, n)  # scored between two chunks of the chat's prefill
