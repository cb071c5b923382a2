"""The service's one model thread: a fair queue of bounded turns, with micro-batching of moderation inputs.

All model work of the service (moderation batches, the slices of long inputs, chat tokenising, the slices of a
chat's guard reading, prefill chunks and decoding steps) runs on one worker thread, one **turn** at a time, so the
event loop stays free and hooks never fire inside another request's forward pass. Work is queued under its
client's key (:func:`safetyneurons.serve.admission.client_key`) as items of two kinds:

- **score** items (:meth:`MicroBatcher.submit`): inputs to score with ``score_fn``. A turn gathers score items
  in fair order (below), waits up to ``max_wait_ms`` for company, up to ``max_batch_size`` inputs and
  ``max_batch_tokens`` estimated tokens, and scores them with one ``score_fn`` call.
- **call** items (:meth:`MicroBatcher.call`): one function call that is a turn of its own (a slice of a long
  input or of a chat's guard reading, a chunk of a chat prefill, a few decoding steps). Callers keep each call
  bounded (``slice_tokens``, :mod:`safetyneurons.serve.scoring`). Calls met while a batch is
  gathered run right after it (they do not cut the batch short).

Every item has a **cost** in tokens (what the guard's or the model's forward passes read; given by the
caller). The order is **fair in tokens** (start-time fair queueing): each item is tagged with its client's
virtual start time, ``max(now, the end of the client's previous item)``, where an item ends ``cost`` tokens after
it starts and "now" is the tag of the item last taken; the smallest tag goes first. So every client with work
waiting gets about the same number of tokens of the worker's time, whatever the size of its items: a client
with a long input or a chat prefill waits its turn behind the short requests of others instead of taking one
turn per request as they do. Within a client, items keep their order. A client may have at most
``max_per_client`` inputs and ``max_client_tokens`` tokens queued (more: 429), the whole queue at most
``max_queue`` inputs and ``max_queue_tokens`` tokens (more: 503), so one client cannot fill it. Since turns are
bounded, a client's expensive work delays the others by at most about one turn: its fair share.

Isolation: when a batch fails, its requests are scored again one by one, and a failing request's inputs
one by one, so only the request holding the bad input fails, with an error naming that input. Items whose
caller went away (deadline, disconnect: the caller's future is cancelled) leave the queue at once and are
never run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from safetyneurons.serve.limits import ApiError

_T = TypeVar("_T")


class InputFailed(Exception):
    """Scoring failed for input ``index`` of a request (``cause`` is the original exception)."""

    def __init__(self, index: int, cause: BaseException):
        super().__init__(f"input[{index}]: {cause}")
        self.index, self.cause = index, cause


@dataclass(eq=False)
class _Item:
    """Queued work of one client: inputs to score (``texts``) or a call (``fn(*args)``)."""

    client: str
    fut: asyncio.Future
    cost: int
    texts: list | None = None
    fn: Callable | None = None
    args: tuple = ()
    queued: bool = field(default=True)

    @property
    def n(self) -> int:
        return len(self.texts) if self.texts is not None else 0


class MicroBatcher:
    """Fair, bounded turns on one worker thread; moderation inputs of concurrent requests are batched."""

    def __init__(self, score_fn: Callable[[list], list], max_batch_size: int, max_wait_ms: float,
                 max_queue: int, max_per_client: int | None = None, *, max_batch_tokens: int = 8192,
                 max_queue_tokens: int = 1 << 19, max_client_tokens: int | None = None):
        self.score_fn = score_fn
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.max_per_client = int(max_per_client or max_queue)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_queue_tokens = int(max_queue_tokens)
        self.max_client_tokens = int(max_client_tokens or max_queue_tokens)
        self.queued = 0  # inputs waiting (not yet taken by the worker)
        self.queued_tokens = 0
        self.batches = 0  # batches scored so far (for metadata and tests)
        self.calls = 0  # call turns run so far
        self.largest_batch = 0
        self.rescored = 0  # batches that failed and were scored again request by request
        self.busy_since: float | None = None  # monotonic time the turn being run started
        self._per_client: dict[str, list[int]] = {}  # client -> [inputs, tokens] queued
        self._heap: list[tuple[float, int, _Item]] = []  # (virtual start, arrival, item): fair order
        self._finish: dict[str, float] = {}  # client -> virtual end of its last queued item
        self._vtime = 0.0  # virtual start of the item taken last
        self._seq = itertools.count()
        self._dead = 0  # heap entries of items whose caller went away
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

    def health(self) -> dict:
        """Liveness of the worker task, queue size, and how long the current turn has been running."""
        alive = self._task is not None and not self._task.done()
        busy = None if self.busy_since is None else round(time.monotonic() - self.busy_since, 3)
        return {"alive": alive, "queued": self.queued, "queued_tokens": self.queued_tokens,
                "clients_waiting": len(self._per_client), "batches": self.batches, "calls": self.calls,
                "busy_s": busy}

    # ---- queueing
    async def submit(self, texts: list, client: str = "", cost: int | None = None) -> list:
        """Score ``texts`` (batched with other requests' inputs); one result per text, in order."""
        item = self._enqueue(_Item(client, self._future(), _cost(cost, len(texts)), texts=list(texts)))
        return await item.fut

    async def call(self, fn: Callable[..., _T], *args: Any, client: str = "", cost: int = 1) -> _T:
        """Run ``fn(*args)`` on the worker thread as a turn of its own, in ``client``'s line."""
        item = self._enqueue(_Item(client, self._future(), _cost(cost, 1), fn=fn, args=args))
        return await item.fut

    def run_soon(self, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` on the worker thread after the running turn, outside the queue (cleanup, e.g. closing
        a generator whose request went away); its result and errors are dropped."""
        with contextlib.suppress(RuntimeError):  # the pool is shut down: nothing left to clean
            self._pool.submit(fn).add_done_callback(lambda f: f.cancelled() or f.exception())

    def _future(self) -> asyncio.Future:
        if self._task is None or self._task.done():
            raise ApiError(503, "The scoring worker is not running; the server is unhealthy.", "server_error",
                           "worker_down")
        return asyncio.get_running_loop().create_future()

    def _enqueue(self, item: _Item) -> _Item:
        if self.queued + item.n > self.max_queue or self.queued_tokens + item.cost > self.max_queue_tokens:
            raise ApiError(503, f"The server is busy ({self.queued} inputs, {self.queued_tokens} tokens queued); "
                                f"retry shortly.", "server_busy", "queue_full")
        mine = self._per_client.setdefault(item.client, [0, 0])
        if mine[0] + item.n > self.max_per_client or (mine[1] and mine[1] + item.cost > self.max_client_tokens):
            if not any(mine):
                self._per_client.pop(item.client, None)
            raise ApiError(429, f"Too much work queued for this client ({mine[0]} inputs, {mine[1]} tokens "
                                f"waiting; limits {self.max_per_client} inputs, {self.max_client_tokens} tokens); "
                                f"wait for your earlier requests.", "rate_limit_error", "client_queue_full")
        mine[0] += item.n
        mine[1] += item.cost
        self.queued += item.n
        self.queued_tokens += item.cost
        start = max(self._vtime, self._finish.get(item.client, 0.0))
        self._finish[item.client] = start + item.cost
        heapq.heappush(self._heap, (start, next(self._seq), item))
        item.fut.add_done_callback(lambda _: self._forget(item))  # a caller that went away leaves the queue
        self._ready.set()
        return item

    def _forget(self, item: _Item) -> None:
        if item.queued and item.fut.cancelled():
            self._taken(item)  # its heap entry is skipped when it comes up
            self._dead += 1
            if self._dead > 1024 and self._dead * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2].queued]
                heapq.heapify(self._heap)
                self._dead = 0

    def _pop(self) -> _Item | None:
        """The waiting item with the smallest virtual start (fair in tokens across clients)."""
        while self._heap:
            start, _, item = heapq.heappop(self._heap)
            if not item.queued:
                self._dead = max(0, self._dead - 1)
                continue
            self._vtime = max(self._vtime, start)
            if len(self._finish) > 4096:  # forget clients that have caught up with "now"
                self._finish = {c: f for c, f in self._finish.items() if f > self._vtime}
            return item
        return None

    async def _take(self, timeout: float | None) -> _Item:
        while True:
            item = self._pop()
            if item is not None:
                return item
            self._ready.clear()
            if timeout is None:
                await self._ready.wait()
            else:
                await asyncio.wait_for(self._ready.wait(), timeout)  # TimeoutError: nothing came

    def _taken(self, item: _Item) -> None:
        if not item.queued:
            return
        item.queued = False
        self.queued -= item.n
        self.queued_tokens -= item.cost
        mine = self._per_client.get(item.client)
        if mine is not None:
            mine[0] -= item.n
            mine[1] -= item.cost
            if mine[0] <= 0 and mine[1] <= 0:
                del self._per_client[item.client]

    # ---- worker
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carried: deque[_Item] = deque()  # taken while gathering a batch but not in it: they run next, in order
        while True:
            first = carried.popleft() if carried else await self._take(None)
            if first.texts is None:
                self._taken(first)
                if not first.fut.done():
                    await self._run_call(loop, first)
                continue
            items = await self._gather(loop, first, carried)
            for it in items:
                self._taken(it)
            items = [it for it in items if not it.fut.done()]  # callers that went away
            if items:
                await self._score(loop, items)

    async def _gather(self, loop, first: _Item, carried: deque) -> list[_Item]:
        """A batch starting with ``first``: more score items in fair order, within the size and token limits.
        Calls met on the way are carried to run right after the batch (they do not cut it short); a score item
        that does not fit is carried too and starts the next batch."""
        items, n, cost = [first], first.n, first.cost
        deadline = loop.time() + self.max_wait
        while n < self.max_batch_size and cost < self.max_batch_tokens:
            try:
                item = await self._take(max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                break
            if item.fut.done():
                self._taken(item)
                continue
            if item.texts is None:
                carried.append(item)
                continue
            if n + item.n > self.max_batch_size or cost + item.cost > self.max_batch_tokens:
                carried.append(item)
                break
            items.append(item)
            n += item.n
            cost += item.cost
        return items

    async def _thread(self, loop, fn: Callable, *args):
        self.busy_since = time.monotonic()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        finally:
            self.busy_since = None

    async def _run_call(self, loop, item: _Item) -> None:
        self.calls += 1
        try:
            result = await self._thread(loop, item.fn, *item.args)
        except asyncio.CancelledError:
            item.fut.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the caller gets it
            _settle(item.fut, exc=e)
            return
        _settle(item.fut, result=result)

    async def _score(self, loop, items: list[_Item]) -> None:
        texts = [t for it in items for t in it.texts]
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(texts))
        try:
            results = await self._thread(loop, self.score_fn, texts)
        except asyncio.CancelledError:
            for it in items:
                it.fut.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - isolate: rescore request by request
            if len(items) == 1 and len(texts) == 1:
                _settle(items[0].fut, exc=InputFailed(0, e))
                return
            self.rescored += 1
            for item in items:
                await self._score_alone(loop, item)
            return
        k = 0
        for it in items:
            _settle(it.fut, result=results[k:k + it.n])
            k += it.n

    async def _score_alone(self, loop, item: _Item) -> None:
        """Score one request on its own; if it fails, find the input that fails (one by one)."""
        if item.fut.done():
            return
        try:
            _settle(item.fut, result=await self._thread(loop, self.score_fn, item.texts))
            return
        except Exception as e:  # noqa: BLE001
            failure = InputFailed(0, e)
        if item.n > 1:
            for k, text in enumerate(item.texts):
                try:
                    await self._thread(loop, self.score_fn, [text])
                except Exception as e:  # noqa: BLE001
                    failure = InputFailed(k, e)
                    break
        _settle(item.fut, exc=failure)


def _cost(cost: int | None, default: int) -> int:
    return max(1, int(default if cost is None else cost))


def _settle(fut, result=None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
