"""The service's model-thread queue (safetyneurons.serve.batcher.MicroBatcher), driven directly, without a model
or a server: fair order across clients, micro-batching, isolation of a bad input, the queue caps, and callers
that went away. A ``held`` call keeps the worker busy while a test queues its work, so the order is fixed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from safetyneurons.serve.batcher import InputFailed, MicroBatcher
from safetyneurons.serve.limits import ApiError


def echo(texts):
    return [t.upper() for t in texts]


async def started(score_fn=echo, max_batch_size=8, max_wait_ms=20.0, max_queue=100, max_per_client=None, **kw):
    b = MicroBatcher(score_fn, max_batch_size, max_wait_ms, max_queue, max_per_client, **kw)
    await b.start()
    return b


async def hold(b: MicroBatcher) -> tuple[threading.Event, asyncio.Future]:
    """Occupy the worker with a call that waits for the returned event."""
    gate = threading.Event()
    held = asyncio.ensure_future(b.call(gate.wait, 5, client="holder", cost=1))
    await asyncio.sleep(0.05)  # the worker takes the call and blocks in it
    return gate, held


# ------------------------------------------------------------------------------------------- fair order
def test_the_queue_is_fair_in_tokens_not_in_requests():
    """A client whose items cost 1,000 tokens each gets its next one after another client's 100-token items
    worth as much (round robin by request gave them one turn each, alternating)."""
    order = []

    async def run():
        b = MicroBatcher(lambda texts: [None] * len(texts), 1, 0.0, 100, max_batch_tokens=10 ** 6,
                         max_queue_tokens=10 ** 6)
        await b.start()
        gate = threading.Event()
        held = asyncio.ensure_future(b.call(gate.wait, 5, client="x", cost=1))  # holds the worker
        await asyncio.sleep(0.05)
        jobs = [b.call(order.append, ("big", k), client="big", cost=1000) for k in range(3)]
        jobs += [b.call(order.append, ("small", k), client="small", cost=100) for k in range(6)]
        tasks = [asyncio.ensure_future(j) for j in jobs]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(held, *tasks)
        await b.stop()

    asyncio.run(run())
    assert order == [("big", 0)] + [("small", k) for k in range(6)] + [("big", 1), ("big", 2)]


def test_a_client_keeps_its_own_order_and_equal_clients_alternate():
    """Two clients with equal items take turns, whoever queued first (first in, first out would run all of a's)."""
    order = []

    async def run():
        b = await started()
        gate, held = await hold(b)
        tasks = [asyncio.ensure_future(b.call(order.append, (c, k), client=c, cost=10))
                 for c in ("a", "b") for k in range(3)]  # all of a's queued before b's
        await asyncio.sleep(0.02)
        gate.set()
        await asyncio.gather(held, *tasks)
        await b.stop()

    asyncio.run(run())
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


# ------------------------------------------------------------------------------------------ batching
def test_waiting_requests_are_scored_in_one_batch_and_answered_in_order():
    batches = []

    def score(texts):
        batches.append(list(texts))
        return echo(texts)

    async def run():
        b = await started(score, max_batch_size=8)
        gate, held = await hold(b)
        requests = [["a1", "a2"], ["b1"], ["c1", "c2", "c3"]]
        tasks = [asyncio.ensure_future(b.submit(r, client=c)) for r, c in zip(requests, "abc")]
        await asyncio.sleep(0.02)
        gate.set()
        got = await asyncio.gather(*tasks)
        await held
        stats = (b.batches, b.largest_batch, b.queued, b.queued_tokens)
        await b.stop()
        return got, stats

    got, (n_batches, largest, queued, queued_tokens) = asyncio.run(run())
    assert got == [["A1", "A2"], ["B1"], ["C1", "C2", "C3"]]
    assert batches == [["a1", "a2", "b1", "c1", "c2", "c3"]] and n_batches == 1 and largest == 6
    assert queued == queued_tokens == 0


def test_a_batch_never_exceeds_max_batch_size():
    batches = []

    def score(texts):
        batches.append(len(texts))
        return echo(texts)

    async def run():
        b = await started(score, max_batch_size=3)
        gate, held = await hold(b)
        tasks = [asyncio.ensure_future(b.submit([f"t{k}"], client=f"c{k}")) for k in range(7)]
        await asyncio.sleep(0.02)
        gate.set()
        got = await asyncio.gather(*tasks)
        await held
        await b.stop()
        return got

    assert asyncio.run(run()) == [[f"T{k}"] for k in range(7)]
    assert batches == [3, 3, 1]


# ----------------------------------------------------------------------------------------- isolation
def test_a_bad_input_fails_only_its_own_request_and_is_named():
    def score(texts):
        if "BAD" in texts:
            raise ValueError("cannot encode")
        return echo(texts)

    async def run():
        b = await started(score)
        gate, held = await hold(b)
        tasks = [asyncio.ensure_future(b.submit(r, client=c))
                 for r, c in ((["ok1"], "a"), (["ok2", "BAD", "ok3"], "b"), (["ok4"], "c"))]
        await asyncio.sleep(0.02)
        gate.set()
        got = await asyncio.gather(*tasks, return_exceptions=True)
        await held
        lone = await asyncio.gather(b.submit(["BAD"], client="d"), return_exceptions=True)
        after = await b.submit(["fine"], client="b")  # the worker keeps serving
        rescored = b.rescored
        await b.stop()
        return got, lone[0], after, rescored

    (first, failed, third), lone, after, rescored = asyncio.run(run())
    assert first == ["OK1"] and third == ["OK4"] and after == ["FINE"]
    assert isinstance(failed, InputFailed) and failed.index == 1 and isinstance(failed.cause, ValueError)
    assert str(failed) == "input[1]: cannot encode"
    assert isinstance(lone, InputFailed) and lone.index == 0
    assert rescored == 1  # only the mixed batch was scored again request by request


def test_a_failing_call_reaches_only_its_caller():
    def boom():
        raise RuntimeError("call failed")

    async def run():
        b = await started()
        got = await asyncio.gather(b.call(boom, client="a"), b.call(lambda: 42, client="b"),
                                   return_exceptions=True)
        await b.stop()
        return got

    failed, ok = asyncio.run(run())
    assert isinstance(failed, RuntimeError) and str(failed) == "call failed" and ok == 42


# ------------------------------------------------------------------------------------------ queue caps
def test_queue_caps_per_client_429_and_in_all_503():
    async def run():
        b = await started(max_queue=4, max_per_client=2)
        gate, held = await hold(b)
        a = asyncio.ensure_future(b.submit(["a1", "a2"], client="a"))
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as too_many:
            await b.submit(["a3"], client="a")
        other = asyncio.ensure_future(b.submit(["b1", "b2"], client="b"))
        await asyncio.sleep(0)
        assert b.health()["queued"] == 4 and b.health()["clients_waiting"] == 2
        with pytest.raises(ApiError) as full:
            await b.submit(["c1"], client="c")
        gate.set()
        got = await asyncio.gather(a, other)
        await held
        health = b.health()
        await b.stop()
        return too_many.value, full.value, got, health

    too_many, full, got, health = asyncio.run(run())
    assert (too_many.status, too_many.code) == (429, "client_queue_full")
    assert (full.status, full.code) == (503, "queue_full")
    assert got == [["A1", "A2"], ["B1", "B2"]]  # the requests already queued were served
    assert health["queued"] == 0 and health["queued_tokens"] == 0 and health["clients_waiting"] == 0


def test_queue_token_cap_refuses_work_that_does_not_fit():
    async def run():
        b = await started(max_queue_tokens=100)
        with pytest.raises(ApiError) as full:
            await b.submit(["x"], client="a", cost=101)
        ok = await b.submit(["x"], client="a", cost=100)
        await b.stop()
        return full.value, ok

    full, ok = asyncio.run(run())
    assert (full.status, full.code) == (503, "queue_full") and ok == ["X"]


# ----------------------------------------------------------------------------------- callers who left
def test_a_cancelled_request_leaves_the_queue_and_is_never_scored():
    seen = []

    def score(texts):
        seen.extend(texts)
        return echo(texts)

    async def run():
        b = await started(score)
        gate, held = await hold(b)
        gone = asyncio.ensure_future(b.submit(["gone"], client="a"))
        stays = asyncio.ensure_future(b.submit(["stays"], client="b"))
        await asyncio.sleep(0)
        assert b.queued == 2
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        await asyncio.sleep(0.01)  # the future's done callbacks run
        queued = b.queued
        gate.set()
        got = await stays
        await held
        await b.stop()
        return queued, got

    queued, got = asyncio.run(run())
    assert queued == 1 and got == ["STAYS"] and seen == ["stays"]


def test_no_work_is_taken_before_start_or_after_stop():
    async def run():
        b = MicroBatcher(echo, 8, 1.0, 100)
        with pytest.raises(ApiError) as before:
            await b.submit(["x"])
        await b.start()
        alive = b.health()["alive"]
        await b.stop()
        with pytest.raises(ApiError) as after:
            await b.call(lambda: 1)
        return before.value, alive, after.value, b.health()["alive"]

    before, alive, after, alive_after = asyncio.run(run())
    assert (before.status, before.code) == (503, "worker_down") and (after.status, after.code) == (503, "worker_down")
    assert alive is True and alive_after is False
