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
