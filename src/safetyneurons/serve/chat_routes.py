"""Guarded chat completions: ``POST /v1/chat/completions`` and ``GET /v1/models``, with admission control.

OpenAI-compatible, non-streaming or ``"stream": true`` (server-sent events, ``stream_options.include_usage``).
The guard reads the whole conversation (every message, whatever its role; tool calls as text) through the
same reader as ``Guard.score``; a flagged conversation gets the refusal with ``finish_reason:
"content_filter"`` and nothing is generated. A guard probability that is not a finite number is refused in
``block`` mode (fail closed). Extension field ``safetyneurons``: ``{"guard", "mode", "unsafe_probability",
"threshold", "flagged", "blocked", "guard_ms"}`` (in the first chunk when streaming).

**Admission control**, equal to moderation's (:mod:`safetyneurons.serve.admission`):

- Every piece of model work is a bounded turn in the client's line of the service's fair queue
  (:mod:`safetyneurons.serve.batcher`), under the same client key as moderation, costed in tokens of guard
  reading, so chat and moderation share the worker fairly in tokens: tokenising (one turn: the conversation for
  the model and the guard's pieces of it); **the guard's reading**, in slices of at most ``slice_tokens`` tokens
  exactly as moderation reads a long input (:class:`~safetyneurons.serve.scoring.PieceReader`: the verdict is
  the most unsafe piece, as ``Guard.result`` forms it); **the prefill**, in chunks of at most ``slice_tokens``
  tokens' worth (a token of the whole model weighs its layers over the guard's), the KV cache carried from
  chunk to chunk (:meth:`GuardedChat.prefill_steps`); decoding, at most ``decode_tokens_per_turn`` tokens a
  turn. A prompt that is the guard's one piece and one chunk is read inside the prefill's own pass (one turn).
  So a long prompt never holds the worker for more than one slice at a time. The queue's caps apply (429/503).
- At most ``max_generations`` live generations (503) and ``max_generations_per_client`` per client (429); each
  reserves prompt + ``max_tokens`` tokens of KV cache against ``max_kv_tokens`` until it ends (503 while others
  hold it, 413 ``context_too_large`` if it can never fit). A prompt over ``max_prompt_tokens`` tokens or the
  model's context gets 413 ``context_length_exceeded``.
- The request deadline (``request_timeout_s``, from arrival) covers the whole reply: past it, a non-streaming
  request gets 504 ``deadline_exceeded`` and a stream gets an SSE error event and ends; the rest of its work is
  dropped. A client that disconnects stops its generation: queued turns leave the queue, the decoder is closed
  on the worker and its KV cache freed. Neither leaves a traceback in the log.

**Parameters.** ``max_tokens`` (or ``max_completion_tokens``, at most the server's ``max_tokens``, else 422),
``temperature`` in [0, 2] (0 = greedy; a positive temperature below 0.001 is read as greedy, since dividing the
logits by it would overflow), ``top_p`` in (0, 1], ``stop`` (a string or up to 4 strings of at most
``MAX_STOP_CHARS`` = 64 characters each: checking them costs at most 4 x 64^2 character comparisons a token)
and ``seed`` (a whole number in [-2^63, 2^64), else 422).

**Model name.** The reply's ``model`` and ``GET /v1/models`` show a public name (:func:`public_model_name`): the
model's hub or ``pypi:`` ref, but never a local path (a local model shows as ``local-<sha256 prefix>``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves the (postponed) annotations from here
from fastapi.responses import StreamingResponse

from safetyneurons.errors import UserError
from safetyneurons.guard.chat import GuardedChat, SamplingSettings, normalize_messages
from safetyneurons.serve.admission import ClientGone, RequestWatch, client_key, read_json_object
from safetyneurons.serve.limits import ApiError
from safetyneurons.serve.moderation import check_sizes, text_or_422
from safetyneurons.serve.scoring import PieceReader, estimate_cost

if TYPE_CHECKING:
    from safetyneurons.serve.admission import Generation

log = logging.getLogger("safetyneurons.serve.server")  # the service's one log
MAX_STOP_CHARS = 64
MIN_TEMPERATURE = 1e-3  # a positive temperature below this is greedy decoding
SEED_MIN, SEED_END = -(2 ** 63), 2 ** 64
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call")
_EXAMPLE = '{"model": "any", "messages": [{"role": "user", "content": "hi"}]}'


# ------------------------------------------------------------------------------------------ request
def sampling_from(obj: dict, max_tokens: int) -> SamplingSettings:
    """The request's decoding parameters, checked (422 ``invalid_parameter`` / ``invalid_stop``)."""
    stop = obj.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)):
        raise ApiError(422, "stop must be a string or a list of strings.", code="invalid_stop")
    if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(422, f"A stop string may have at most {MAX_STOP_CHARS} characters.", code="invalid_stop")
    seed = 0 if obj.get("seed") is None else obj["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed < SEED_END:
        raise ApiError(422, "seed must be a whole number in [-2^63, 2^64).", code="invalid_parameter")
    temperature = 1.0 if obj.get("temperature") is None else obj["temperature"]
    numeric = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if numeric and 0 < temperature < MIN_TEMPERATURE:
        temperature = 0.0  # greedy: the limit of sampling as the temperature goes to 0
    limit = obj.get("max_completion_tokens", obj.get("max_tokens"))
    try:
        return SamplingSettings(max_tokens=max_tokens if limit is None else limit, temperature=temperature,
                                top_p=1.0 if obj.get("top_p") is None else obj["top_p"], stop=tuple(stop),
                                seed=seed).check(max_tokens)
    except UserError as e:
        raise ApiError(422, str(e), code="invalid_parameter") from None


def chat_messages(obj: dict, settings) -> list[dict]:
    """The request's messages, normalised and checked (413 over the limits, 422 what cannot be read)."""
    if "messages" not in obj:
        raise ApiError(422, "Missing field \"messages\" (a list of {\"role\", \"content\"}).", code="missing_messages")
    if obj.get("n") not in (None, 1):
        raise ApiError(422, "Only n = 1 is supported.", code="invalid_parameter")
    for name in _UNSUPPORTED:
        if obj.get(name):
            raise ApiError(422, f"{name} is not supported by this server (plain chat only).", code="invalid_parameter")
    raw = obj["messages"]
    if isinstance(raw, list) and len(raw) > settings.max_inputs:
        raise ApiError(413, f"Too many messages: {len(raw)} > {settings.max_inputs}.", code="too_many_inputs")
    try:
        messages = normalize_messages(raw)
    except UserError as e:
        raise ApiError(422, str(e), code="invalid_messages") from None
    check_sizes([m["content"] for m in messages], settings, "messages")
    for k, m in enumerate(messages):
        text_or_422(m["content"], f"messages[{k}]")
    return messages


def public_model_name(chat: GuardedChat) -> str:
    """The served model's name for clients: its ref, unless that is a local path (see the module docstring)."""
    ref = str(chat.lm.ref)
    local = ref.startswith(("/", "~", "\\", ".")) or (len(ref) > 1 and ref[1] == ":") or _exists(ref)
    if local:
        fp = str(getattr(chat.lm, "fingerprint", "") or "")
        ref = f"local-{fp[:12]}" if fp else "local-model"
    return f"{ref}+{chat.guard.name}" if chat.mode != "off" else ref


def _exists(ref: str) -> bool:
    try:
        return not ref.startswith("pypi:") and Path(ref).expanduser().exists()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------- generation
def encode_for(chat: GuardedChat, messages: list[dict]) -> tuple[Any, list]:
    """On the worker: the encoded conversation and the pieces the guard reads of it (tokenising only)."""
    enc = chat.encode(messages)
    return enc, chat.guard_pieces(enc)


def timed(fn, *args) -> tuple[Any, float]:
    """On the worker: ``fn(*args)`` and the seconds it took."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def full_pass_weight(chat: GuardedChat) -> float:
    """What a token of the whole model costs in the queue's unit, a token the guard reads (the guard stops after
    its deepest safety-neuron layer): layers of the model / layers the guard runs."""
    try:
        return max(1.0, float(chat.lm.info["num_layers"]) / float(chat.guard.layers_run))
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return 1.0


def decode_turn(steps, n: int, budget_s: float = 0.25) -> tuple[list, Exception | None]:
    """On the worker: up to ``n`` pieces of the reply (fewer when the reply ends or ``budget_s`` is spent), and
    the error that stopped the decoder after them (raised at once when there are none)."""
    out, t0 = [], time.perf_counter()
    try:
        for _ in range(n):
            d = next(steps, None)
            if d is None:
                break
            out.append(d)
            if d.finish_reason is not None or time.perf_counter() - t0 > budget_s:
                break
    except Exception as e:  # noqa: BLE001 - the pieces before it are still sent
        if not out:
            raise
        return out, e
    return out, None


class ChatRun:
    """One admitted generation: its turns on the worker, its KV reservation, and its clean-up."""

    def __init__(self, app: FastAPI, chat: GuardedChat, gen: Generation, client: str, watch: RequestWatch):
        self.chat, self.gen, self.client, self.watch = chat, gen, client, watch
        self.batcher, self.settings = app.state.batcher, app.state.settings
        self.full = full_pass_weight(chat)
        slice_tokens = app.state.scorer.slice_tokens
        self.reader = PieceReader(chat.guard, slice_tokens)  # the guard's reading, sliced as moderation's
        self.chunk = max(1, int(slice_tokens / self.full))  # prompt tokens per prefill turn
        self.guard_s = 0.0
        self.steps = None  # the prefill's steps, then the decoder's
        self.failed: Exception | None = None

    async def _turn(self, what: str, fn, *args, cost: int, status: int = 422, code: str = "invalid_request"):
        try:
            return await self.watch.run(self.batcher.call(fn, *args, client=self.client, cost=cost))
        except UserError as e:
            raise ApiError(status, str(e), code=code) from None
        except (ApiError, ClientGone):
            raise
        except Exception:  # noqa: BLE001 - logged, answered without internals
            log.exception("%s failed", what)
            raise ApiError(500, f"Internal error while {what}; see the server log.", "server_error") from None

    async def _read(self, fn, *args, cost: int):
        """One slice of the guard's reading, a turn of its own (timed on the worker)."""
        out, seconds = await self._turn("reading the prompt", timed, fn, *args, cost=cost)
        self.guard_s += seconds
        return out

    async def start(self, messages: list[dict], sampling: SamplingSettings):
        """Tokenise, reserve the KV cache, the guard's reading in slices, the prefill in chunks; returns the
        prefill."""
        enc, pieces = await self._turn("tokenizing", encode_for, self.chat, messages,
                                       cost=estimate_cost(messages) // 3, status=413, code="context_length_exceeded")
        n = enc.n_tokens
        if n > self.settings.max_prompt_tokens:
            raise ApiError(413, f"The conversation is {n} tokens, more than this server's limit of "
                                f"{self.settings.max_prompt_tokens} per prompt; shorten it.",
                           code="context_length_exceeded")
        self.gen.reserve(n + min(sampling.max_tokens, max(0, self.chat.context_length - n)))
        verdict, pre = None, None
        if self.chat.mode != "off" and not self.chat.reads_in_prefill(enc, pieces, self.chunk):
            try:
                result = await self.reader.verdict(pieces, self._read)
            except UserError as e:
                raise ApiError(422, str(e), code="invalid_messages") from None
            verdict = (result.unsafe_probability, self.guard_s * 1000.0)
            if self.chat.mode == "block" and result.flagged:
                pre = self.chat.refused(enc, *verdict)  # nothing more runs
        if pre is None:
            pre = await self._prefill(enc, verdict, pieces)
        p = pre.unsafe_probability
        if self.chat.mode == "block" and not pre.blocked and p is not None and not math.isfinite(p):
            pre = dataclasses.replace(pre, blocked=True, logits=None, past=None)  # fail closed
        self.steps = self.chat.generate(pre, sampling)
        return pre

    async def _prefill(self, enc, verdict, pieces: list):
        """The prefill's steps, each a turn: chunks of at most ``self.chunk`` tokens (one step when the guard
        reads inside the prefill: then the prompt is one chunk)."""
        self.steps = steps = self.chat.prefill_steps(enc, self.chunk, verdict, pieces)
        n, pre = enc.n_tokens, None
        for a in range(0, n, self.chunk):
            k = min(self.chunk, n - a)
            pre = await self._turn("reading the prompt", next, steps, None, cost=math.ceil(k * self.full))
            if pre is not None:
                break
        if pre is None:
            raise ApiError(500, "Internal error while reading the prompt; see the server log.", "server_error")
        return pre

    async def pieces(self) -> list:
        """The next pieces of the reply (one turn); [] when the decoder has ended."""
        if self.failed is not None:
            failed, self.failed = self.failed, None
            log.error("generating failed", exc_info=failed)
            raise ApiError(500, "Internal error while generating; see the server log.", "server_error")
        n = self.settings.decode_tokens_per_turn
        got, self.failed = await self._turn("generating", decode_turn, self.steps, n, cost=int(n * self.full) + 1)
        return got

    def close(self) -> None:
        """End the generation however it ended: close the decoder on the worker (frees its KV cache)."""
        steps, self.steps = self.steps, None
        if steps is not None:
            self.batcher.run_soon(steps.close)
        self.watch.close()
        self.gen.release()


def guard_info(chat: GuardedChat, pre) -> dict:
    p = pre.unsafe_probability
    finite = p is None or math.isfinite(p)
    return {"guard": chat.guard.name, "mode": chat.mode, "unsafe_probability": p if finite else 1.0,
            "threshold": chat.guard.threshold, "flagged": p is not None and (not finite or p >= chat.guard.threshold),
            "blocked": pre.blocked, "guard_ms": round(pre.guard_ms, 4)}


def usage(pre, completion_tokens: int) -> dict:
    return {"prompt_tokens": pre.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": pre.prompt_tokens + completion_tokens}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class GuardedStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however the stream ends (finished, failed, client gone)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except OSError:  # the client went away mid-send: nothing to report to anyone
            pass
        finally:
            self.on_close()


# ------------------------------------------------------------------------------------------- routes
def add_chat_routes(app: FastAPI, chat: GuardedChat, *, max_tokens: int = 512) -> None:
    """``POST /v1/chat/completions`` and ``GET /v1/models`` on ``app`` (from :func:`create_app`)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError(f"max-tokens must be a whole number >= 1 (got {max_tokens!r}).")
    settings, name = app.state.settings, public_model_name(chat)
    app.state.chat = chat

    @app.get("/v1/models")
    async def models(request: Request):
        request.app.state.check_auth(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "safetyneurons"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        obj = await read_json_object(request, _EXAMPLE)
        messages = chat_messages(obj, settings)
        sampling = sampling_from(obj, max_tokens)
        request.state.n_inputs = len(messages)
        if settings.log_prompts:
            request.state.prompts = [m["content"] for m in messages]
        client = client_key(request)
        gen = app.state.generations.admit(client)
        run = ChatRun(app, chat, gen, client, RequestWatch(request, settings.request_timeout_s))
        streaming = False
        try:
            pre = await run.start(messages, sampling)
            head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
            if obj.get("stream"):
                opts = obj.get("stream_options") or {}
                include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
                run.watch.stop_watching_disconnect()  # the stream's own task watches it from here
                streaming = True
                return GuardedStream(stream(run, head, pre, include_usage), run.close, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await complete(run, head, pre)
        finally:
            if not streaming:
                run.close()


async def complete(run: ChatRun, head: dict, pre) -> dict:
    parts, last = [], None
    while last is None or last.finish_reason is None:
        got = await run.pieces()
        if not got:
            break
        parts += [d.text for d in got]
        last = got[-1]
    text = "".join(parts)
    message = {"role": "assistant", "content": text, "refusal": text if pre.blocked else None}
    finish = last.finish_reason if last is not None else "stop"
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage(pre, last.completion_tokens if last is not None else 0),
            "safetyneurons": guard_info(run.chat, pre)}


async def stream(run: ChatRun, head: dict, pre, include_usage: bool):
    def chunk(delta: dict, finish=None, **extra) -> str:
        return sse({**head, "object": "chat.completion.chunk", **extra,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""}, safetyneurons=guard_info(run.chat, pre))
    last = None
    try:
        while last is None or last.finish_reason is None:
            got = await run.pieces()
            if not got:
                break
            for d in got:
                if d.text:
                    yield chunk({"content": d.text, **({"refusal": d.text} if pre.blocked else {})})
            last = got[-1]
    except ApiError as e:  # the status line is sent: report the error in the stream, then end it
        yield sse({"error": {"message": e.message, "type": e.type, "code": e.code}})
        return
    yield chunk({}, last.finish_reason if last is not None else "stop")
    if include_usage:
        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                   "usage": usage(pre, last.completion_tokens if last is not None else 0)})
    yield "data: [DONE]\n\n"
