"""Issue 22, guarded chat: parameters that used to give 500 get 422 (or a sane reading), stop strings are
bounded, the model name shows no local path, and a guard probability that is not a number refuses."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest

from safetyneurons.guard.chat import GuardedChat
from safetyneurons.serve.routes import create_service
from builders import SAFE, Served, error_code

GOOD = SAFE[0]


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


class NanChat(GuardedChat):
    """A guard whose probe gives NaN for every conversation (a broken probe, or a poisoned input)."""

    def prefill(self, conversation):
        return dataclasses.replace(super().prefill(conversation), unsafe_probability=float("nan"))


@pytest.mark.parametrize("stream", [False, True])
def test_a_non_finite_guard_probability_refuses(guard, stream):
    with Served(create_service(guard, chat=NanChat(guard, mode="block", refusal="No."), max_tokens=8)) as s:
        body = {"model": "m", "messages": [{"role": "user", "content": GOOD}], "stream": stream}
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
        assert (text, finish) == ("No.", "content_filter")  # was: generated a reply
        assert ext["blocked"] is True and ext["flagged"] is True and ext["unsafe_probability"] == 1.0
