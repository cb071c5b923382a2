"""The guard service's plug-in routes: guarded chat completions and LiteLLM's generic guardrail API.

:func:`create_service` is :func:`safetyneurons.serve.server.create_app` plus these routes (same API key, size
limits, JSON error shape ``{"error": {"message", "type", "code"}}``, access log and scoring thread):

- ``POST /v1/chat/completions`` (with a :class:`~safetyneurons.guard.chat.GuardedChat`): OpenAI-compatible,
  non-streaming or ``"stream": true`` (server-sent events, ``stream_options.include_usage``). The guard
  reads the model's own prefill; a flagged conversation gets the refusal with ``finish_reason:
  "content_filter"`` and nothing is generated. Parameters: ``max_tokens`` (or ``max_completion_tokens``),
  ``temperature`` (0 = greedy), ``top_p``, ``stop``, ``seed``. ``usage`` counts prompt and completion
  tokens. Extension field ``safetyneurons``: ``{"guard", "mode", "unsafe_probability", "threshold",
  "flagged", "blocked", "guard_ms"}`` (in the first chunk when streaming).
- ``GET /v1/models``: the served model (for clients that list models first).
- ``POST /beta/litellm_basic_guardrail_api``: LiteLLM's generic guardrail API. Request ``{"texts": [...],
  "input_type": "request"|"response", "litellm_call_id", "additional_provider_specific_params":
  {"threshold": 0.5}, ...}``; response ``{"action": "BLOCKED"|"NONE", "blocked_reason", ...}``. Each
  text is scored by the guard (batched with the moderation requests); any flagged text blocks.

Model work (prefill, each decoding step, scoring batches) runs on the service's single scoring thread, one
step at a time, so concurrent streams interleave and never run hooks into each other's forward passes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves the (postponed) annotations from here
from fastapi.responses import StreamingResponse

from safetyneurons._io import check_text
from safetyneurons.guard.chat import GuardedChat, SamplingSettings, normalize_messages
from safetyneurons.errors import UserError
from safetyneurons.serve.limits import parse_body
from safetyneurons.serve.server import ApiError, _read_body, create_app, score_for_request

if TYPE_CHECKING:
    from safetyneurons.guard.guard import Guard

log = logging.getLogger("safetyneurons.serve.server")
GUARDRAIL_PATH = "/beta/litellm_basic_guardrail_api"
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call")


def create_service(guard: Guard, *, chat: GuardedChat | None = None, max_tokens: int = 512,
                   **app_kwargs: Any) -> FastAPI:
    """The full guard service: moderation (:func:`~safetyneurons.serve.server.create_app`, which takes
    ``app_kwargs``), LiteLLM's guardrail API, and with ``chat`` guarded chat completions of at most
    ``max_tokens`` tokens per reply."""
    app = create_app(guard, **app_kwargs)
    add_guardrail_routes(app)
    if chat is not None:
        if chat.guard is not guard:
            raise UserError("The chat must use the served guard (GuardedChat(guard)).")
        add_chat_routes(app, chat, max_tokens=max_tokens)
    return app


# ------------------------------------------------------------------------------------------ helpers
def _json_object(body: bytes, example: str) -> dict:
    obj = parse_body(body)  # 400 for broken or too deeply nested JSON
    if not isinstance(obj, dict):
        raise ApiError(422, f"The request body must be a JSON object like {example}.", code="invalid_body")
    return obj


async def _request_object(request: Request, example: str) -> dict:
    request.app.state.check_auth(request)
    return _json_object(await _read_body(request, request.app.state.settings.max_body_bytes), example)


def _user_error(e: UserError, code: str = "invalid_request") -> ApiError:
    return ApiError(422, str(e), code=code)


async def _on_model_thread(batcher, what: str, fn, *args, status: int = 422, code: str = "invalid_request"):
    """``fn(*args)`` on the scoring thread; a UserError becomes ``status``/``code``, anything else a JSON 500."""
    try:
        return await batcher.call(fn, *args)
    except UserError as e:
        raise ApiError(status, str(e), code=code) from None
    except Exception:  # noqa: BLE001 - logged, answered without internals
        log.exception("%s failed", what)
        raise ApiError(500, f"Internal error while {what}; see the server log.", "server_error") from None


# --------------------------------------------------------------------------------------------- chat
def _sampling(obj: dict, max_tokens: int) -> SamplingSettings:
    stop = obj.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)):
        raise ApiError(422, "stop must be a string or a list of strings.", code="invalid_stop")
    limit = obj.get("max_completion_tokens", obj.get("max_tokens"))
    try:
        return SamplingSettings(
            max_tokens=max_tokens if limit is None else limit,
            temperature=1.0 if obj.get("temperature") is None else obj["temperature"],
            top_p=1.0 if obj.get("top_p") is None else obj["top_p"],
            stop=tuple(stop), seed=0 if obj.get("seed") is None else obj["seed"]).check(max_tokens)
    except UserError as e:
        raise _user_error(e, "invalid_parameter") from None


def _check_chat_request(obj: dict, settings) -> list[dict]:
    if "messages" not in obj:
        raise ApiError(422, "Missing field \"messages\" (a list of {\"role\", \"content\"}).", code="missing_messages")
    if obj.get("n") not in (None, 1):
        raise ApiError(422, "Only n = 1 is supported.", code="invalid_parameter")
    for name in _UNSUPPORTED:
        if obj.get(name):
            raise ApiError(422, f"{name} is not supported by this server (plain chat only).", code="invalid_parameter")
    if isinstance(obj["messages"], list) and len(obj["messages"]) > settings.max_inputs:
        raise ApiError(413, f"Too many messages: {len(obj['messages'])} > {settings.max_inputs}.",
                       code="too_many_inputs")
    try:
        messages = normalize_messages(obj["messages"])
    except UserError as e:
        raise _user_error(e, "invalid_messages") from None
    for k, m in enumerate(messages):
        if len(m["content"]) > settings.max_chars:
            raise ApiError(413, f"messages[{k}] has {len(m['content'])} characters, more than the limit of "
                                f"{settings.max_chars}.", code="input_too_long")
        _text_or_422(m["content"], f"messages[{k}]")
    return messages


def _text_or_422(text: str, where: str) -> None:
    try:
        check_text(text, where)
    except UserError as e:
        raise ApiError(422, str(e), code="invalid_text") from None


def _guard_info(chat: GuardedChat, pre) -> dict:
    p = pre.unsafe_probability
    return {"guard": chat.guard.name, "mode": chat.mode, "unsafe_probability": p, "threshold": chat.guard.threshold,
            "flagged": p is not None and p >= chat.guard.threshold, "blocked": pre.blocked,
            "guard_ms": round(pre.guard_ms, 4)}


def _usage(pre, completion_tokens: int) -> dict:
    return {"prompt_tokens": pre.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": pre.prompt_tokens + completion_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def add_chat_routes(app: FastAPI, chat: GuardedChat, *, max_tokens: int = 512) -> None:
    """``POST /v1/chat/completions`` and ``GET /v1/models`` on ``app`` (from :func:`create_app`)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError(f"max-tokens must be a whole number >= 1 (got {max_tokens!r}).")
    batcher, settings = app.state.batcher, app.state.settings
    app.state.chat = chat

    @app.get("/v1/models")
    async def models(request: Request):
        request.app.state.check_auth(request)
        return {"object": "list", "data": [{"id": chat.model_name, "object": "model", "created": 0,
                                            "owned_by": "safetyneurons"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        obj = await _request_object(request, '{"model": "any", "messages": [{"role": "user", "content": "hi"}]}')
        messages = _check_chat_request(obj, settings)
        sampling = _sampling(obj, max_tokens)
        request.state.n_inputs = len(messages)
        if settings.log_prompts:
            request.state.prompts = [m["content"] for m in messages]
        # the tokenizer is shared with the scoring thread (and not thread-safe): encode there too
        enc = await _on_model_thread(batcher, "tokenizing", chat.encode, messages, status=413,
                                     code="context_length_exceeded")
        pre = await _on_model_thread(batcher, "reading the prompt", chat.prefill, enc)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": chat.model_name}
        steps = chat.generate(pre, sampling)
        if obj.get("stream"):
            opts = obj.get("stream_options") or {}
            usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            return StreamingResponse(_stream(batcher, steps, head, chat, pre, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts, last = [], None
        while (d := await _on_model_thread(batcher, "generating", next, steps, None)) is not None:
            parts.append(d.text)
            last = d
        text = "".join(parts)
        message = {"role": "assistant", "content": text, "refusal": text if pre.blocked else None}
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(pre, last.completion_tokens), "safetyneurons": _guard_info(chat, pre)}


async def _stream(batcher, steps, head: dict, chat: GuardedChat, pre, include_usage: bool):
    def chunk(delta: dict, finish=None, **extra) -> str:
        return _sse({**head, "object": "chat.completion.chunk", **extra,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""}, safetyneurons=_guard_info(chat, pre))
    try:
        last = None
        while (d := await _on_model_thread(batcher, "generating", next, steps, None)) is not None:
            if d.text:
                yield chunk({"content": d.text, **({"refusal": d.text} if pre.blocked else {})})
            last = d
    except ApiError as e:  # the status line is sent: report the error in the stream, then end it
        yield _sse({"error": {"message": e.message, "type": e.type, "code": e.code}})
        return
    yield chunk({}, last.finish_reason)
    if include_usage:
        yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                    "usage": _usage(pre, last.completion_tokens)})
    yield "data: [DONE]\n\n"


# -------------------------------------------------------------------------------- LiteLLM guardrail
def _guardrail_request(obj: dict, guard, settings) -> tuple[list[str], float]:
    if obj.get("input_type") not in ("request", "response"):
        raise ApiError(422, f"input_type must be \"request\" or \"response\", got {obj.get('input_type')!r}.",
                       code="invalid_input_type")
    texts = obj.get("texts") or []
    if not isinstance(texts, list) or any(not isinstance(t, str) for t in texts):
        raise ApiError(422, "texts must be a list of strings.", code="invalid_input")
    texts = [t for t in texts if t.strip()]
    if len(texts) > settings.max_inputs:
        raise ApiError(413, f"Too many texts: {len(texts)} > {settings.max_inputs} per request.",
                       code="too_many_inputs")
    for k, t in enumerate(texts):
        if len(t) > settings.max_chars:
            raise ApiError(413, f"texts[{k}] has {len(t)} characters, more than the limit of {settings.max_chars}.",
                           code="input_too_long")
        _text_or_422(t, f"texts[{k}]")
    params = obj.get("additional_provider_specific_params") or {}
    if not isinstance(params, dict):
        raise ApiError(422, "additional_provider_specific_params must be an object.", code="invalid_parameter")
    t = params.get("threshold", guard.threshold)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise ApiError(422, f"additional_provider_specific_params.threshold must be a probability in [0, 1], "
                            f"got {t!r}.", code="invalid_threshold")
    return texts, float(t)


def add_guardrail_routes(app: FastAPI) -> None:
    """``POST /beta/litellm_basic_guardrail_api`` on ``app`` (from :func:`create_app`)."""
    guard, batcher, settings = app.state.guard, app.state.batcher, app.state.settings

    @app.post(GUARDRAIL_PATH)
    async def litellm_guardrail(request: Request):
        obj = await _request_object(request, '{"texts": ["..."], "input_type": "request"}')
        texts, threshold = _guardrail_request(obj, guard, settings)
        request.state.n_inputs = len(texts)
        if settings.log_prompts:
            request.state.prompts = texts
        results = await score_for_request(request, batcher, texts, settings.request_timeout_s) if texts else []
        probs = [float(r.unsafe_probability) for r in results]
        hits = [k for k, p in enumerate(probs) if p >= threshold]
        body = {"action": "BLOCKED" if hits else "NONE", "blocked_reason": None,
                "safetyneurons": {"guard": guard.name, "unsafe_probability": probs, "threshold": threshold,
                                  "litellm_call_id": obj.get("litellm_call_id")}}
        if hits:
            k = max(hits, key=lambda i: probs[i])
            body["blocked_reason"] = (f"safetyneurons guard {guard.name}: text {k} has unsafe probability "
                                      f"{probs[k]:.3f} >= threshold {threshold:.3f}")
        return body
