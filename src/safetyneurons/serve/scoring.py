"""Scoring the inputs of one request on the service's worker: costs, bounded turns, long inputs, fail closed.

An input is a text or a conversation (a list of ``{"role", "content"}``; every message is read). Its **cost**
is the number of tokens the guard's forward passes read for it: the text whole when it fits the guard's token
limit, plus its overlapping windows (:meth:`Guard.read_cost <safetyneurons.guard.guard.Guard.read_cost>`),
so a long input costs per window, not per input.

- **Short inputs** (estimated cost at most half of ``max_batch_tokens``): the estimate (:func:`estimate_cost`,
  from the UTF-8 length, no tokeniser on the event loop) is what the queue counts. The request's short inputs
  are queued as chunks of at most ``max_batch_size`` inputs and ``max_batch_tokens`` tokens, scored whole by
  ``Guard.score`` and batched with other requests' inputs (:class:`~safetyneurons.serve.batcher.MicroBatcher`).
- **Long inputs** (any length up to the server's per-input ceiling, ``max_chars``): on the worker, the guard's
  reader splits the input into the pieces ``Guard.score`` reads (with their exact token counts), and the pieces
  are read in **slices** of at most ``slice_tokens`` tokens (a slice holds at least one piece), each slice a
  turn of its own in the client's line (:meth:`PieceReader.verdict`). The input's verdict is its most unsafe
  piece, exactly as ``Guard.score`` decides it (:meth:`Guard.result <safetyneurons.guard.guard.Guard.result>`,
  with the category heads of that piece). So a long input never holds the worker for more than one bounded turn
  at a time: it takes its client's turns, not the other clients'. The guarded chat reads a conversation the same
  way (:mod:`safetyneurons.serve.chat_routes`). With a custom ``score_fn`` (instrumentation), moderation inputs
  are always scored whole through it.
- **Too costly:** a request whose inputs together cost more than ``max_request_tokens`` tokens gets 413
  ``input_too_costly`` (the moderation route documents it as: treat as flagged; the LiteLLM route answers
  ``BLOCKED``).
- **Fail closed:** a probability that is not a finite number is flagged and reported as 1.0
  (:func:`fail_closed`), on every route, whatever ``score_fn`` returned.
- **Deadline and disconnect:** :func:`score_for_request` races the whole scoring against the request deadline
  (504) and the client's disconnect; the unfinished work leaves the queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from safetyneurons.data.compose import sentence_breaks
from safetyneurons.errors import UserError
from safetyneurons.serve.admission import RequestWatch, client_key
from safetyneurons.serve.batcher import InputFailed, MicroBatcher
from safetyneurons.serve.limits import ApiError, escape_for_log

if TYPE_CHECKING:
    from starlette.requests import Request

    from safetyneurons.guard.guard import Guard

log = logging.getLogger("safetyneurons.serve.server")  # the service's one log
WINDOW_TOKENS = 32  # the guard's window of a long message, in content tokens (stride half of it)
TEMPLATE_TOKENS = 16  # about what a chat template adds around each piece (the Scorer measures its guard's)
BYTES_PER_TOKEN = 3  # estimate: English takes ~4 UTF-8 bytes a token, emoji and rare scripts 1-4


def estimate_tokens(text: str) -> int:
    """Content tokens of ``text``, estimated from its UTF-8 length (no tokeniser)."""
    return len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN + 1


def estimate_cost(item: Any, template_tokens: int = TEMPLATE_TOKENS) -> int:
    """Tokens the guard reads for an input (a text or a conversation): each message whole, plus its windows,
    plus its sentence pieces (each sentence's tokens once more and a template per sentence; at most: equal
    sentences are read once); ``template_tokens`` around each piece."""
    texts = [item] if isinstance(item, str) else [m.get("content", "") for m in item if isinstance(m, dict)]
    total = 0
    for text in texts:
        text = text if isinstance(text, str) else ""
        n = estimate_tokens(text)
        total += n + template_tokens
        if n > WINDOW_TOKENS:
            total += (2 * n // WINDOW_TOKENS) * (WINDOW_TOKENS + template_tokens)
        breaks = sentence_breaks(text)
        if breaks:  # short sentences hold more tokens per byte (digits, marks): counted at 2 bytes a token
            total += len(text.encode("utf-8", "surrogatepass")) // 2 + (breaks + 1) * (template_tokens + 1)
    return total


def template_tokens(guard: Any) -> int:
    """The tokens ``guard``'s chat template adds around each piece it reads (:data:`TEMPLATE_TOKENS` for a guard
    without a model's template, e.g. a stand-in in tests)."""
    if not PieceReader.supports(guard):
        return TEMPLATE_TOKENS
    piece = guard.reader.pieces(["x"])[0]
    return max(TEMPLATE_TOKENS, len(piece.ids) - (piece.end - piece.start))


@dataclass(frozen=True)
class Verdict:
    """A result as the routes report it: never NaN, flagged when the probability was not finite."""

    unsafe_probability: float
    flagged: bool
    categories: dict | None = None
    category_scores: dict | None = None


def fail_closed(result: Any) -> Verdict:
    """``result`` (a ``GuardResult``) with every non-finite score flagged and reported as 1.0."""
    p = _number(getattr(result, "unsafe_probability", float("nan")))
    finite = math.isfinite(p)
    flagged = bool(getattr(result, "flagged", True)) or not finite
    scores = getattr(result, "category_scores", None)
    cats = getattr(result, "categories", None)
    if scores is not None:
        scores = {k: (v if math.isfinite(_number(v)) else 1.0) for k, v in scores.items()}
        scores["unsafe"] = p if finite else 1.0
    if cats is not None:
        cats = {**cats, "unsafe": flagged}
    return Verdict(p if finite else 1.0, flagged, cats, scores)


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


class PieceReader:
    """Reads an input piece by piece with the guard's own reader (what ``Guard.score`` reads), in slices of at most
    ``slice_tokens`` tokens, each slice one worker turn."""

    def __init__(self, guard: Guard, slice_tokens: int):
        self.guard, self.slice_tokens = guard, max(1, int(slice_tokens))

    @staticmethod
    def supports(guard: Any) -> bool:
        reader = getattr(guard, "reader", None)
        return callable(getattr(reader, "pieces", None)) and callable(getattr(reader, "read_pieces", None))

    def pieces(self, item: Any) -> list:
        """The pieces of one input (tokenisation only; on the worker thread)."""
        return self.guard.reader.pieces([item])

    def slices(self, pieces: Sequence) -> list[list]:
        """``pieces`` in order, cut into slices of at most ``slice_tokens`` tokens (a longer piece alone)."""
        out, cur, cost = [], [], 0
        for p in pieces:
            if cur and cost + len(p.ids) > self.slice_tokens:
                out.append(cur)
                cur, cost = [], 0
            cur.append(p)
            cost += len(p.ids)
        return out + ([cur] if cur else [])

    def read(self, pieces: Sequence) -> tuple[float, Any]:
        """The most unsafe piece of a slice: (probability, its pooled features); a NaN counts as most unsafe."""
        import numpy as np

        pieces = list(pieces)
        feats, _ = self.guard.reader.read_pieces(pieces)
        p = self.guard.probability(feats, pieces)
        k = int(np.argmax(np.where(np.isnan(p), np.inf, p)))
        return float(p[k]), feats[k]

    def result(self, p: float, x: Any):
        """The input's ``GuardResult`` from its most unsafe piece, built by :meth:`Guard.result`."""
        return self.guard.result(p, x)

    async def verdict(self, pieces: Sequence, call: Callable[..., Awaitable]) -> Any:
        """The ``GuardResult`` of one input from its pieces: each slice is read by ``await call(self.read, slice,
        cost=tokens)`` (one worker turn in the caller's line), and the most unsafe piece decides (a NaN piece
        first: it flags)."""
        if not pieces:
            raise UserError("there is no text to read")
        best_p, best_x = -math.inf, None
        for part in self.slices(pieces):
            p, x = await call(self.read, part, cost=sum(len(q.ids) for q in part))
            if best_x is None or math.isnan(p) or (not math.isnan(best_p) and p > best_p):
                best_p, best_x = p, x
        return self.result(best_p, best_x)


class Scorer:
    """How the service scores a request's inputs on its worker (see the module docstring)."""

    def __init__(self, guard: Guard, batcher: MicroBatcher, *, max_batch_size: int, max_batch_tokens: int,
                 max_request_tokens: int, slice_tokens: int | None = None, custom_score_fn: bool = False):
        self.batcher = batcher
        self.max_batch_size, self.max_batch_tokens = int(max_batch_size), int(max_batch_tokens)
        self.max_request_tokens = int(max_request_tokens)
        self.slice_tokens = min(self.max_batch_tokens, int(slice_tokens or self.max_batch_tokens))
        self.template_tokens = template_tokens(guard)
        supported = not custom_score_fn and PieceReader.supports(guard)
        self.pieces = PieceReader(guard, self.slice_tokens) if supported else None

    def is_long(self, cost: int) -> bool:
        return self.pieces is not None and cost > self.max_batch_tokens // 2

    async def score(self, inputs: Sequence[Any], client: str) -> list:
        """One result per input, in order (``InputFailed`` naming the input that failed)."""
        est = [estimate_cost(x, self.template_tokens) for x in inputs]
        long = [k for k, c in enumerate(est) if self.is_long(c)]
        plans = {k: await self._plan(inputs[k], k, client) for k in long}
        cost = sum(c for k, c in enumerate(est) if k not in plans)
        cost += sum(len(p.ids) for pieces in plans.values() for p in pieces)
        if cost > self.max_request_tokens:
            raise ApiError(413, f"The inputs would take {cost} tokens of reading (long texts are read in "
                                f"overlapping windows), more than this server's limit of {self.max_request_tokens} "
                                f"per request. Send less text per request.", code="input_too_costly")
        results: list = [None] * len(inputs)
        short = [k for k in range(len(inputs)) if k not in plans]
        jobs = [self._short(chunk, inputs, est, client, results) for chunk in self._chunks(short, est)]
        jobs += [self._long(k, pieces, client, results) for k, pieces in plans.items()]
        tasks = [asyncio.ensure_future(j) for j in jobs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        return results

    def _chunks(self, ks: list[int], est: list[int]) -> list[list[int]]:
        chunks, cur, cost = [], [], 0
        for k in ks:
            if cur and (len(cur) >= self.max_batch_size or cost + est[k] > self.max_batch_tokens):
                chunks.append(cur)
                cur, cost = [], 0
            cur.append(k)
            cost += est[k]
        return chunks + ([cur] if cur else [])

    async def _short(self, ks: list[int], inputs, est, client: str, results: list) -> None:
        try:
            out = await self.batcher.submit([inputs[k] for k in ks], client, cost=sum(est[k] for k in ks))
        except InputFailed as e:
            raise InputFailed(ks[e.index], e.cause) from None
        for k, r in zip(ks, out):
            results[k] = r

    async def _call(self, k: int, fn: Callable, *args, client: str, cost: int):
        try:
            return await self.batcher.call(fn, *args, client=client, cost=cost)
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - named after the input it came from
            raise InputFailed(k, e) from None

    async def _plan(self, item: Any, k: int, client: str) -> list:
        text_tokens = estimate_cost(item, self.template_tokens) // 3 + 1  # tokenising costs far less than reading
        return await self._call(k, self.pieces.pieces, item, client=client, cost=text_tokens)

    async def _long(self, k: int, pieces: list, client: str, results: list) -> None:
        async def call(fn, *args, cost: int):
            return await self._call(k, fn, *args, client=client, cost=cost)

        try:
            results[k] = await self.pieces.verdict(pieces, call)
        except UserError as e:  # no pieces: nothing to read
            raise InputFailed(k, e) from None


async def score_for_request(request: Request, scorer: Scorer, inputs: list, timeout_s: float) -> list[Verdict]:
    """Score ``inputs`` under the request's client key, within the request deadline (504), dropping the work
    when the client disconnects; errors name the input (422 for input the guard cannot read, 500 otherwise)."""
    with RequestWatch(request, timeout_s) as watch:
        try:
            results = await watch.run(scorer.score(inputs, client_key(request)))
        except InputFailed as e:
            if isinstance(e.cause, UserError):
                raise ApiError(422, f"input[{e.index}]: {e.cause}", code="invalid_input") from None
            log.error("scoring failed for input[%d]: %s: %s", e.index, type(e.cause).__name__,
                      escape_for_log(str(e.cause)))
            raise ApiError(500, f"Internal error while scoring input[{e.index}]; see the server log.",
                           "server_error", "scoring_failed") from None
    return [fail_closed(r) for r in results]
