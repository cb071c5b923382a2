"""The guard service's plug-in routes: LiteLLM's generic guardrail API, and guarded chat completions.

:func:`create_service` is :func:`safetyneurons.serve.server.create_app` plus these routes (same API key, size
limits, JSON error shape ``{"error": {"message", "type", "code"}}``, access log, worker and fair queue):

- ``POST /v1/chat/completions`` and ``GET /v1/models`` (with a :class:`~safetyneurons.guard.chat.GuardedChat`):
  :mod:`safetyneurons.serve.chat_routes`.
- ``POST /beta/litellm_basic_guardrail_api``: LiteLLM's generic guardrail API. Request ``{"texts": [...],
  "input_type": "request"|"response", "structured_messages", "images", "tool_calls", "litellm_call_id",
  "additional_provider_specific_params": {"threshold": 0.5}, ...}``; response ``{"action": "BLOCKED"|"NONE",
  "blocked_reason", "safetyneurons": {"guard", "unsafe_probability": [...], "threshold", "operating_point",
  "litellm_call_id"}}`` (``operating_point``: the calibrated point whose threshold was used, null for a threshold
  that is no calibrated point's). It reports no categories (LiteLLM's API has none; ``/v1/moderations`` has them).

What the guardrail reads (a guard that cannot be talked around):

- ``texts`` (what LiteLLM extracted from the messages), each one input, plus the text of every top-level
  ``tool_calls`` entry (``name(arguments)``). Without texts or tool calls, ``structured_messages`` is read as
  one conversation: every message, whatever its role, tool calls and tool results included
  (:func:`safetyneurons.guard.chat.normalize_messages`, then ``Guard.score`` on the conversation; a trailing
  assistant message, as in a post-call check, is read like any other). **Nothing to read** (no text anywhere):
  422 ``nothing_to_read``, never ``NONE``.
- **Images cannot be read**: a request with ``images`` or an image (any non-text) part in a message is answered
  ``BLOCKED`` with a reason saying so (fail closed: the guard does not pass what it did not read).
- **Over the limits** (more than ``max_inputs`` texts, a text over the per-input ceiling ``max_chars``, a request
  over ``max_request_chars`` characters or ``max_request_tokens`` tokens of reading): ``BLOCKED`` with the reason,
  not an HTTP error, since a proxy may pass errors through. A probability that is not a finite number blocks.
- **The threshold** in ``additional_provider_specific_params.threshold`` (or ``operating_point``, one of the guard's
  calibrated points, e.g. ``strict``) comes from the end user's request, so a caller may only make the guard
  **stricter**: a threshold at or below the served one is used; a higher one is refused with 422
  ``threshold_not_allowed``, unless the operator started the server with ``allow_caller_loosen``
  (``create_app(..., allow_caller_loosen=True)``). Not a probability, or an unknown point: 422.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves the (postponed) annotations from here

from safetyneurons.checks import check_threshold, normalise_text
from safetyneurons.errors import UserError
from safetyneurons.guard.chat import GuardedChat, normalize_messages
from safetyneurons.serve.admission import read_json_object
from safetyneurons.serve.chat_routes import add_chat_routes
from safetyneurons.serve.limits import ApiError
from safetyneurons.serve.moderation import check_sizes, text_or_422
from safetyneurons.serve.scoring import score_for_request
from safetyneurons.serve.server import create_app

if TYPE_CHECKING:
    from safetyneurons.guard.guard import Guard

GUARDRAIL_PATH = "/beta/litellm_basic_guardrail_api"
_BLOCK_CODES = ("too_many_inputs", "input_too_long", "request_too_long", "input_too_costly")


def create_service(guard: Guard, *, chat: GuardedChat | None = None, max_tokens: int = 512,
                   **app_kwargs: Any) -> FastAPI:
    """The full guard service: moderation (:func:`~safetyneurons.serve.server.create_app`, which takes
    ``app_kwargs``, e.g. ``allow_caller_loosen``), LiteLLM's guardrail API, and with ``chat`` guarded chat
    completions of at most ``max_tokens`` tokens per reply."""
    app = create_app(guard, **app_kwargs)
    add_guardrail_routes(app)
    if chat is not None:
        if chat.guard is not guard:
            raise UserError("The chat must use the served guard (GuardedChat(guard)).")
        add_chat_routes(app, chat, max_tokens=max_tokens)
    return app


class Blocked(Exception):
    """The guardrail answers BLOCKED without scoring (what it cannot read, or more than it may read)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# -------------------------------------------------------------------------------- LiteLLM guardrail
def caller_threshold(obj: dict, guard: Guard, allow_loosen: bool) -> float:
    """The threshold a guardrail request may use: the served one, or a stricter (lower) one it asks for, as a
    ``threshold`` or as one of the guard's calibrated ``operating_point`` names."""
    params = obj.get("additional_provider_specific_params") or {}
    if not isinstance(params, dict):
        raise ApiError(422, "additional_provider_specific_params must be an object.", code="invalid_parameter")
    served = float(guard.threshold)
    t = params.get("threshold")
    point = None if params.get("operating_point") is None else point_threshold(guard, params["operating_point"],
                                                                               allow_loosen)
    if t is None:
        return served if point is None else point
    if point is not None:  # both given: each is checked, the stricter (lower) one is used
        return min(point, caller_threshold({"additional_provider_specific_params": {"threshold": t}}, guard,
                                           allow_loosen))
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ApiError(422, f"additional_provider_specific_params.threshold must be a probability in [0, 1], "
                            f"got {t!r}.", code="invalid_threshold")
    try:
        t = check_threshold(t)
    except UserError as e:
        raise ApiError(422, f"additional_provider_specific_params.threshold: {e}", code="invalid_threshold") from None
    if t > served and not allow_loosen:
        raise ApiError(422, f"additional_provider_specific_params.threshold {t:g} is above this server's threshold "
                            f"{served:g}; a caller may only make the guard stricter (a lower threshold). The "
                            f"operator can allow it (allow_caller_loosen).", code="threshold_not_allowed")
    return t


def point_threshold(guard: Guard, point: Any, allow_loosen: bool) -> float:
    """The threshold of a calibrated operating point (``strict``, ``loose``) a caller names; a looser one than the
    server's is refused (422 ``threshold_not_allowed``) unless the operator allows it."""
    thresholds = getattr(guard, "thresholds", None) or {}
    if not isinstance(point, str) or point not in thresholds:
        raise ApiError(422, f"additional_provider_specific_params.operating_point must be one of "
                            f"{', '.join(sorted(thresholds)) or 'none (this guard has none)'}, got {point!r}.",
                       code="invalid_threshold")
    t = float(thresholds[point])
    if t > float(guard.threshold) and not allow_loosen:
        raise ApiError(422, f"Operating point {point!r} (threshold {t:g}) is looser than this server's threshold "
                            f"{float(guard.threshold):g}; a caller may only make the guard stricter.",
                       code="threshold_not_allowed")
    return t


def point_name(guard: Guard, threshold: float) -> str | None:
    """The operating point a threshold in use belongs to: the server's own when it is the served threshold,
    else a calibrated point with exactly that threshold; None for any other threshold."""
    if threshold == float(guard.threshold):
        return getattr(guard, "operating_point", None)
    thresholds = getattr(guard, "thresholds", None) or {}
    return next((name for name, t in sorted(thresholds.items()) if float(t) == threshold), None)


def tool_call_texts(calls: Any, where: str) -> list[str]:
    """Tool calls (OpenAI shape) as text, ``name(arguments)`` each (arguments as JSON text when not a string)."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise ApiError(422, f"{where} must be a list of tool calls.", code="invalid_input")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name", ""), str):
            raise ApiError(422, f"{where}[{j}] must be {{\"function\": {{\"name\", \"arguments\"}}}}.",
                           code="invalid_input")
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            import json

            args = json.dumps(args, ensure_ascii=False)
        out.append(f"{fn.get('name', '')}({args})")
    return out


def _non_text_part(messages: list) -> str | None:
    """Where the first part a text guard cannot read (image, audio, file) sits in the messages, if any."""
    for k, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    return f"structured_messages[{k}].content[{j}] is a {part.get('type')!r} part"
    return None


def _has_text(messages: Any) -> bool:
    """Whether any message holds something to read (text, a non-text part, a tool call); malformed: True (the
    reader then says what is wrong)."""
    if not isinstance(messages, list):
        return True
    for m in messages:
        if not isinstance(m, dict) or m.get("tool_calls") or m.get("function_call"):
            return True
        content = m.get("content")
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            text = part.get("text", "") if isinstance(part, dict) and part.get("type") == "text" else part
            if text is None:
                continue
            if not isinstance(text, str) or normalise_text(text):
                return True
    return False


def conversation(messages: Any) -> list[dict]:
    """LiteLLM's structured messages as one conversation the guard reads (every role; tool calls as text)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ApiError(422, "structured_messages must be a list of {\"role\", \"content\"} messages.",
                       code="invalid_input")
    where = _non_text_part(messages)
    if where is not None:
        raise Blocked(f"{where}; this guard reads text only and does not pass what it cannot read.")
    msgs = [dict(m) for m in messages]
    if msgs and msgs[-1].get("role") == "assistant":  # a post-call check: the reply is read like any message
        msgs[-1]["role"] = "user"
    try:
        return normalize_messages(msgs)
    except UserError as e:
        raise ApiError(422, f"structured_messages: {e}", code="invalid_input") from None


def guardrail_inputs(obj: dict, settings) -> list:
    """What a guardrail request gives the guard to read (see the module docstring)."""
    if obj.get("input_type") not in ("request", "response"):
        raise ApiError(422, f"input_type must be \"request\" or \"response\", got {obj.get('input_type')!r}.",
                       code="invalid_input_type")
    texts = obj.get("texts")
    if texts is None:
        texts = []
    if not isinstance(texts, list) or any(not isinstance(t, str) for t in texts):
        raise ApiError(422, "texts must be a list of strings.", code="invalid_input")
    for k, t in enumerate(texts):
        text_or_422(t, f"texts[{k}]")
    images = obj.get("images")
    if images:
        raise Blocked(f"the request holds {len(images) if isinstance(images, list) else 'some'} image(s); this guard "
                      f"reads text only and does not pass what it cannot read.")
    inputs: list = [t for t in texts + tool_call_texts(obj.get("tool_calls"), "tool_calls") if normalise_text(t)]
    messages = obj.get("structured_messages")
    if not inputs and messages and _has_text(messages):
        inputs = [conversation(messages)]
    if not inputs:
        raise ApiError(422, "Nothing to read: no texts, tool calls or messages with text. Send the text to check.",
                       code="nothing_to_read")
    if len(inputs) > settings.max_inputs:
        raise Blocked(f"{len(inputs)} texts, more than this server reads per request ({settings.max_inputs}).")
    flat = [x if isinstance(x, str) else "\n".join(m["content"] for m in x) for x in inputs]
    try:
        check_sizes(flat, settings, "texts")
    except ApiError as e:
        raise Blocked(e.message) from None
    return inputs


def add_guardrail_routes(app: FastAPI) -> None:
    """``POST /beta/litellm_basic_guardrail_api`` on ``app`` (from :func:`create_app`)."""
    state = app.state
    guard, settings = state.guard, state.settings

    @app.post(GUARDRAIL_PATH)
    async def litellm_guardrail(request: Request):
        obj = await read_json_object(request, '{"texts": ["..."], "input_type": "request"}')
        threshold = caller_threshold(obj, guard, settings.allow_caller_loosen)
        body = {"action": "NONE", "blocked_reason": None,
                "safetyneurons": {"guard": guard.name, "unsafe_probability": [], "threshold": threshold,
                                  "operating_point": point_name(guard, threshold),
                                  "litellm_call_id": obj.get("litellm_call_id")}}
        try:
            inputs = guardrail_inputs(obj, settings)
            request.state.n_inputs = len(inputs)
            if settings.log_prompts:
                request.state.prompts = inputs
            try:
                results = await score_for_request(request, state.scorer, inputs, settings.request_timeout_s)
            except ApiError as e:
                if e.status == 413 and e.code in _BLOCK_CODES:
                    raise Blocked(e.message) from None
                raise
        except Blocked as b:
            return {**body, "action": "BLOCKED", "blocked_reason": f"safetyneurons guard {guard.name}: {b.reason}"}
        probs = [float(r.unsafe_probability) for r in results]  # fail closed: a non-finite probability is 1.0
        hits = [k for k, p in enumerate(probs) if not math.isfinite(p) or p >= threshold]
        body["safetyneurons"]["unsafe_probability"] = probs
        if hits:
            k = max(hits, key=lambda i: probs[i])
            body["action"] = "BLOCKED"
            body["blocked_reason"] = (f"safetyneurons guard {guard.name}: text {k} has unsafe probability "
                                      f"{probs[k]:.3f} >= threshold {threshold:.3f}")
        return body
