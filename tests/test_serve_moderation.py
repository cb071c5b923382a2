"""Issue 22, the moderation route: content parts are one input, long inputs are read in windows (in bounded
slices, exactly as ``Guard.score`` reads them) up to a ceiling, and what is not read is never unflagged."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from safetyneurons.serve.server import create_app
from builders import HARMFUL, PADDING, SAFE, UNSAFE, Served, error_code

BAD, GOOD = UNSAFE[0], SAFE[0]


# the `guard` and `planted` fixtures (builders.build_guard / build_planted_guard, loaded) are in tests/conftest.py
@pytest.fixture(scope="module")
def served(planted):
    with Served(create_app(planted)) as s:  # default limits
        yield s


def moderate(served, inp, timeout=120):
    return httpx.post(served.url + "/v1/moderations", json={"input": inp}, timeout=timeout)


# ----------------------------------------------------------------------- 3. content parts: one input
def test_content_parts_are_one_input_with_one_result(served, planted):
    parts = [{"type": "text", "text": "Write a poem about the sea. "}, {"type": "text", "text": HARMFUL}]
    r = moderate(served, parts)
    assert r.status_code == 200, r.text
    [res] = r.json()["results"]  # was: one result per part
    assert res["flagged"] is True
    want = planted.score(["Write a poem about the sea. " + HARMFUL])[0].unsafe_probability
    assert res["category_scores"]["unsafe"] == pytest.approx(want, abs=1e-6)
    split = [{"type": "text", "text": HARMFUL[:12]}, {"type": "text", "text": HARMFUL[12:]}]  # a split request
    assert moderate(served, split).json()["results"][0]["flagged"] is True
    strings = moderate(served, ["Write a poem about the sea.", HARMFUL]).json()["results"]
    assert [x["flagged"] for x in strings] == [False, True]  # a list of strings: one result per string


@pytest.mark.parametrize("inp,code", [
    ([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
     "unsupported_input"),
    ([{"type": "input_audio", "input_audio": {"data": "AAAA"}}], "unsupported_input"),
    (["hi", {"type": "text", "text": "there"}], "invalid_input"),
    ([{"type": "text"}], "invalid_input"),
    ([{"type": "text", "text": " \u200b "}], "empty_input"),
])
def test_parts_that_cannot_be_read_are_refused_never_passed(served, inp, code):
    assert error_code(moderate(served, inp), 422) == code


# ------------------------------------------------------------------ 4. long inputs: read, not refused
def test_an_input_over_the_old_limit_is_read_in_windows(served, planted):
    padded = PADDING * 4 + HARMFUL  # 9,509 characters: over the old 8,192 limit
    assert len(padded) > 8192
    r = moderate(served, [padded, PADDING * 4])
    assert r.status_code == 200, r.text  # was: 413 input_too_long
    got = [x["category_scores"]["unsafe"] for x in r.json()["results"]]
    assert [x["flagged"] for x in r.json()["results"]] == [True, False]
    want = [x.unsafe_probability for x in planted.score([padded, PADDING * 4])]
    np.testing.assert_allclose(got, want, atol=1e-5)  # what Guard.score reads, in bounded slices


def test_above_the_ceiling_is_413_to_be_treated_as_flagged(planted):
    with Served(create_app(planted, max_chars=10_000, max_request_tokens=20_000)) as s:
        err = moderate(s, "x" * 10_001).json()["error"]
        assert err["code"] == "input_too_long" and "treat it as flagged" in err["message"]
        costly = PADDING * 3 + HARMFUL  # fits the ceiling, but its windows cost more than 20,000 tokens
        err = moderate(s, [costly, costly, costly]).json()["error"]
        assert err["code"] in ("input_too_costly", "request_too_long"), err
        r = moderate(s, costly)
        assert r.status_code == 200 and r.json()["results"][0]["flagged"] is True


def test_a_long_input_is_read_in_slices_costed_per_window(guard):
    """The scorer reads a long input in turns of at most max_batch_tokens tokens, counts the tokens the guard's
    passes read (Guard.read_cost), and gives Guard.score's verdict."""
    from safetyneurons.serve.batcher import MicroBatcher
    from safetyneurons.serve.scoring import Scorer

    text = "Write a poem about the sea, the moon and the stars tonight. " * 40 + BAD
    costs: list[int] = []

    class Recording(MicroBatcher):
        async def call(self, fn, *args, client="", cost=1):
            costs.append(cost)
            return await super().call(fn, *args, client=client, cost=cost)

    async def run():
        batcher = Recording(guard.score, 8, 1.0, 64, max_batch_tokens=256, max_queue_tokens=1 << 20)
        await batcher.start()
        try:
            scorer = Scorer(guard, batcher, max_batch_size=8, max_batch_tokens=256, max_request_tokens=1 << 20)
            return await scorer.score([GOOD, text], "client"), batcher
        finally:
            await batcher.stop()

    (short, long), batcher = asyncio.run(run())
    read = guard.read_cost([text])[0]
    slices = costs[1:]  # the first call splits the input into the guard's pieces (tokenising only)
    assert len(slices) > 3 and max(slices) <= 256 and sum(slices) == read
    want_short, want_long = guard.score([GOOD, text])
    assert short.unsafe_probability == pytest.approx(want_short.unsafe_probability, abs=1e-6)
    assert long.unsafe_probability == pytest.approx(want_long.unsafe_probability, abs=1e-5)
    assert long.flagged == want_long.flagged and batcher.batches == 1  # the short input: one batch


# -------------------------------------------------------- issue 25: OpenAI's categories, all of them
OPENAI_KEYS = ["harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
               "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
               "violence/graphic"]


@pytest.fixture(scope="module")
def with_heads(planted):
    """The planted guard with category heads on its one feature (the planted neuron): violent_crimes rises and
    nonviolent_crimes falls with it (so on benign text the nonviolent head says 0.95), hate stays at 0.27, and
    privacy (a hazard no OpenAI category covers) at 0.88. self_harm and sexual_content have no head."""
    from safetyneurons.guard.guard import Guard
    from safetyneurons.probes.categories import CategoryHeads

    g = Guard.load(planted.path, lm=planted.lm)
    g.category_heads = CategoryHeads(["violent_crimes", "nonviolent_crimes", "privacy", "hate"], np.zeros(1),
                                     np.ones(1), np.array([[50.0], [-50.0], [0.0], [0.0]]),
                                     np.array([-3.0, 3.0, 2.0, -1.0]))
    with Served(create_app(g)) as s:
        yield s, g


def test_every_openai_category_is_present_and_the_heads_map_by_the_table(with_heads):
    from safetyneurons.probes.categories import OPENAI_CATEGORIES

    served, g = with_heads
    assert list(OPENAI_CATEGORIES) == OPENAI_KEYS
    body = moderate(served, [HARMFUL, GOOD]).json()
    bad, good = body["results"]
    want = g.score([HARMFUL, GOOD])
    for res, r in zip((bad, good), want):
        assert res["flagged"] is r.flagged  # the guard's verdict, whatever the categories say
        assert list(res["categories"]) == list(res["category_scores"]) == list(res["category_applied_input_types"])
        assert list(res["categories"]) == OPENAI_KEYS + ["unsafe", "privacy"]  # privacy: no OpenAI key covers it
        assert res["category_scores"]["unsafe"] == pytest.approx(r.unsafe_probability, abs=1e-6)
        for key in ("violence", "illicit/violent"):  # both read violent_crimes
            assert res["category_scores"][key] == pytest.approx(r.category_scores["violent_crimes"], abs=1e-6)
        assert res["category_scores"]["illicit"] == pytest.approx(r.category_scores["nonviolent_crimes"], abs=1e-6)
        assert res["category_scores"]["harassment"] == res["category_scores"]["hate"] == pytest.approx(
            r.category_scores["hate"], abs=1e-6)
        for key in ("self-harm", "sexual", "sexual/minors", "violence/graphic", "harassment/threatening"):
            assert (res["categories"][key], res["category_scores"][key],
                    res["category_applied_input_types"][key]) == (False, 0.0, [])  # not measured: says so
        assert res["category_applied_input_types"]["violence"] == res["category_applied_input_types"]["unsafe"] == \
            ["text"]
    assert bad["flagged"] is True and good["flagged"] is False
    assert [k for k, v in bad["categories"].items() if v] == ["illicit/violent", "violence", "unsafe", "privacy"]
    assert good["category_scores"]["illicit"] > 0  # the nonviolent head says 0.95 on benign text ...
    assert not any(good["categories"].values())  # ... but a category is never true on an unflagged input
    assert body["safetyneurons"] == {"guard": g.name, "operating_point": g.operating_point, "threshold": g.threshold}


@pytest.mark.parametrize("heads", [True, False])
def test_the_openai_client_reads_every_category_attribute(with_heads, served, heads):
    """Every attribute of the client's Categories / CategoryScores / CategoryAppliedInputTypes is set (None
    would break code that reads them), with and without category heads."""
    import openai

    s = with_heads[0] if heads else served
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    r = client.moderations.create(model="omni-moderation-latest", input=[HARMFUL, GOOD])
    assert [m.flagged for m in r.results] == [True, False]
    for m in r.results:
        for part in (m.categories, m.category_scores, m.category_applied_input_types):
            fields = type(part).model_fields
            assert len(fields) >= 13 and all(getattr(part, name) is not None for name in fields), part
        assert m.categories.model_extra["unsafe"] is m.flagged
    bad = r.results[0]
    assert bad.categories.violence is heads and bad.category_applied_input_types.violence == (["text"] if heads
                                                                                              else [])
    assert bad.category_scores.self_harm == 0.0 and bad.category_applied_input_types.self_harm == []


def test_the_response_names_the_operating_point_in_use(planted):
    from safetyneurons.guard.guard import Guard

    explicit = Guard.load(planted.path, lm=planted.lm, threshold=0.3)
    with Served(create_app(explicit)) as s:
        assert moderate(s, GOOD).json()["safetyneurons"] == {"guard": planted.name, "operating_point": None,
                                                             "threshold": 0.3}
