"""Micro-batching for the HTTP service: concurrent requests are scored together, fairly and in isolation.

Each request queues its inputs under its client's key (the client address). One worker builds a batch by
taking requests **round-robin over clients** (one request per client in turn), waits up to ``max_wait_ms``
for company, up to ``max_batch_size`` inputs, and scores the batch with one ``score_fn`` call in a worker
thread, so the event loop stays free. A client may have at most ``max_per_client`` inputs queued (more:
429), the whole queue at most ``max_queue`` (more: 503), so one client cannot fill it.

Isolation: when a batch fails, its requests are scored again one by one, and a failing request's inputs
one by one, so only the request holding the bad input fails, with an error naming that input. Requests
whose caller went away (deadline, disconnect) are dropped before scoring.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections import deque
from typing import Any, Callable, TypeVar

from safetyneurons.serve.limits import ApiError

_T = TypeVar("_T")


class InputFailed(Exception):
    """Scoring failed for input ``index`` of a request (``cause`` is the original exception)."""

    def __init__(self, index: int, cause: BaseException):
        super().__init__(f"input[{index}]: {cause}")
        self.index, self.cause = index, cause


class MicroBatcher:
    """Gather inputs of concurrent requests into batches scored by ``score_fn`` in one worker thread."""

    def __init__(self, score_fn: Callable[[list[str]], list], max_batch_size: int, max_wait_ms: float,
                 max_queue: int, max_per_client: int | None = None):
        self.score_fn = score_fn
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.max_per_client = int(max_per_client or max_queue)
        self.queued = 0  # inputs waiting (not yet taken by the worker)
        self.batches = 0  # batches scored so far (for metadata and tests)
        self.largest_batch = 0
        self.rescored = 0  # batches that failed and were scored again request by request
        self.busy_since: float | None = None  # monotonic time the batch being scored started
        self._per_client: dict[str, int] = {}
        self._pending: dict[str, deque] = {}  # client -> its waiting requests (insertion order = round robin)
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard-score")

    # ---- lifecycle
    async def start(self) -> None:
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="guard-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the scoring thread, so it never overlaps a scoring batch (the model is shared)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def health(self) -> dict:
        """Liveness of the worker task, queue size, and how long the current batch has been scoring."""
        alive = self._task is not None and not self._task.done()
        busy = None if self.busy_since is None else round(time.monotonic() - self.busy_since, 3)
        return {"alive": alive, "queued": self.queued, "batches": self.batches, "busy_s": busy}

    # ---- queueing
    async def submit(self, texts: list[str], client: str = "") -> list:
        if self._task is None or self._task.done():
            raise ApiError(503, "The scoring worker is not running; the server is unhealthy.", "server_error",
                           "worker_down")
        if self.queued + len(texts) > self.max_queue:
            raise ApiError(503, f"The server is busy ({self.queued} inputs queued); retry shortly.",
                           "server_busy", "queue_full")
        mine = self._per_client.get(client, 0)
        if mine + len(texts) > self.max_per_client:
            raise ApiError(429, f"Too many inputs queued for this client ({mine} waiting, limit "
                                f"{self.max_per_client}); wait for your earlier requests.", "rate_limit_error",
                           "client_queue_full")
        fut = asyncio.get_running_loop().create_future()
        self.queued += len(texts)
        self._per_client[client] = mine + len(texts)
        self._pending.setdefault(client, deque()).append((texts, fut, client))
        self._ready.set()
        return await fut

    def _pop(self):
        """The oldest request of the client first in line; that client then moves to the back."""
        for client in list(self._pending):
            waiting = self._pending.pop(client)
            item = waiting.popleft()
            if waiting:
                self._pending[client] = waiting
            return item
        return None

    async def _take(self, timeout: float | None):
        while True:
            item = self._pop()
            if item is not None:
                return item
            self._ready.clear()
            if timeout is None:
                await self._ready.wait()
            else:
                await asyncio.wait_for(self._ready.wait(), timeout)  # TimeoutError: nothing came

    def _taken(self, item) -> None:
        texts, _, client = item
        self.queued -= len(texts)
        left = self._per_client.get(client, 0) - len(texts)
        if left > 0:
            self._per_client[client] = left
        else:
            self._per_client.pop(client, None)

    # ---- worker
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending = None  # a request that did not fit in the previous batch
        while True:
            first = pending if pending is not None else await self._take(None)
            pending = None
            items = [first]
            n = len(first[0])
            deadline = loop.time() + self.max_wait
            while n < self.max_batch_size:
                try:
                    item = await self._take(max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if n + len(item[0]) > self.max_batch_size:
                    pending = item  # starts the next batch
                    break
                items.append(item)
                n += len(item[0])
            for it in items:
                self._taken(it)
            items = [it for it in items if not it[1].done()]  # callers that went away
            if items:
                await self._score(loop, items)

    async def _call(self, loop, texts: list[str]):
        self.busy_since = time.monotonic()
        try:
            return await loop.run_in_executor(self._pool, self.score_fn, texts)
        finally:
            self.busy_since = None

    async def _score(self, loop, items) -> None:
        texts = [t for it in items for t in it[0]]
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(texts))
        try:
            results = await self._call(loop, texts)
        except asyncio.CancelledError:
            for _, fut, _ in items:
                if not fut.done():
                    fut.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - isolate: rescore request by request
            if len(items) == 1 and len(texts) == 1:
                _settle(items[0][1], exc=InputFailed(0, e))
                return
            self.rescored += 1
            for item in items:
                await self._score_alone(loop, item)
            return
        k = 0
        for batch_texts, fut, _ in items:
            _settle(fut, result=results[k:k + len(batch_texts)])
            k += len(batch_texts)

    async def _score_alone(self, loop, item) -> None:
        """Score one request on its own; if it fails, find the input that fails (one by one)."""
        texts, fut, _ = item
        if fut.done():
            return
        try:
            _settle(fut, result=await self._call(loop, texts))
            return
        except Exception as e:  # noqa: BLE001
            failure = InputFailed(0, e)
        if len(texts) > 1:
            for k, text in enumerate(texts):
                try:
                    await self._call(loop, [text])
                except Exception as e:  # noqa: BLE001
                    failure = InputFailed(k, e)
                    break
        _settle(fut, exc=failure)


def _settle(fut, result=None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
