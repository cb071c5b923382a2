"""``POST /v1/moderations``: the OpenAI moderation endpoint of the guard service.

Request ``{"input": ..., "model": str (optional, ignored)}``, with ``input`` as OpenAI defines it:

- a **string**: one input, one result;
- a **list of strings**: one input, and one result, per string;
- a **list of content parts** ``[{"type": "text", "text": ...}, ...]``: **one** input with one result (OpenAI's
  multi-modal input is one item whose parts belong together). The text parts are joined into one text (as the
  chat route joins a message's parts), so a request split over parts is read as a whole. A part that is not
  text (``image_url``, ...) cannot be read by this guard: 422 ``unsupported_input`` naming the part. Nothing
  that was not read is ever answered as unflagged;
- a list mixing strings and parts: 422 ``invalid_input``.

Limits: at most ``max_inputs`` inputs (413 ``too_many_inputs``) and ``max_request_chars`` characters in all
(413 ``request_too_long``). An input longer than the guard's token limit is read whole, in overlapping windows
(:mod:`safetyneurons.serve.scoring`), up to the per-input ceiling ``max_chars`` (100,000 characters by default).
Above it the answer is 413 ``input_too_long``, and a request whose reading would cost more than
``max_request_tokens`` tokens gets 413 ``input_too_costly``: the guard did not read the input, so **a client
should treat either as flagged**. An empty input (or one of invisible characters only) or text that is not
valid Unicode gets 422 naming it.

The response is ``{"id", "model", "results", "safetyneurons": {"guard", "operating_point", "threshold"}}``
(``operating_point``: the calibrated point in use, null when the server runs with an explicit ``--threshold``).
Each result has OpenAI's shape: ``flagged`` is the guard's verdict, and ``categories`` (bool), ``category_scores``
(float) and ``category_applied_input_types`` (list) hold every OpenAI category, then ``unsafe`` (the guard's
overall verdict and probability), then the guard's hazards that no OpenAI category covers
(:func:`safetyneurons.probes.categories.openai_categories`, table :data:`~safetyneurons.probes.categories.OPENAI_CATEGORIES`).
A category that this guard does not measure is 0.0, false and ``[]``. A category is true only when the input is
flagged, so the categories never loosen ``flagged``. A probability that is not a finite number is flagged and
reported as 1.0. This route takes no threshold from the caller.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves the (postponed) annotations from here

from safetyneurons.checks import check_text, normalise_text
from safetyneurons.errors import UserError
from safetyneurons.probes.categories import openai_categories
from safetyneurons.serve.admission import read_body
from safetyneurons.serve.limits import ApiError, parse_body
from safetyneurons.serve.scoring import Verdict, score_for_request

_EXAMPLE = "{\"input\": \"text\"}, {\"input\": [\"text\", ...]} or {\"input\": [{\"type\": \"text\", \"text\": ...}]}"


def parse_moderation(body: bytes, settings) -> list[str]:
    """The inputs of a moderation request body, each checked (see the module docstring for the errors)."""
    obj = parse_body(body)
    if not isinstance(obj, dict):
        raise ApiError(422, f"The request body must be a JSON object like {_EXAMPLE}.", code="invalid_body")
    if "input" not in obj:
        raise ApiError(422, "Missing field \"input\" (a string or a list of strings).", code="missing_input")
    if "model" in obj and obj["model"] is not None and not isinstance(obj["model"], str):
        raise ApiError(422, "Field \"model\" must be a string when given.", code="invalid_model")
    inputs = input_texts(obj["input"])
    if len(inputs) > settings.max_inputs:
        raise ApiError(413, f"Too many inputs: {len(inputs)} > {settings.max_inputs} per request. Split the "
                            f"request.", code="too_many_inputs")
    check_sizes(inputs, settings, "input")
    for k, text in enumerate(inputs):  # each input is validated before it can join a batch
        text_or_422(text, f"input[{k}]")
        if not normalise_text(text):
            raise ApiError(422, f"input[{k}] is empty (or only invisible characters); give some text to score.",
                           code="empty_input")
    return inputs


def input_texts(value: Any) -> list[str]:
    """OpenAI's ``input``: a string, a list of strings (one input each) or a list of parts (one input)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ApiError(422, "Field \"input\" must be a string, a list of strings or a list of "
                            "{\"type\": \"text\", \"text\": ...} parts.", code="invalid_input")
    if not value:
        raise ApiError(422, "Field \"input\" is an empty list; give at least one text.", code="empty_input")
    if all(isinstance(x, str) for x in value):
        return list(value)
    if all(isinstance(x, dict) for x in value):
        return [parts_text(value, "input")]
    k = next(k for k, x in enumerate(value) if not isinstance(x, str))
    kind = "a content part" if isinstance(value[k], dict) else type(value[k]).__name__
    raise ApiError(422, f"input[{k}] is {kind}; give a string, a list of strings, or a list of "
                        f"{{\"type\": \"text\", \"text\": ...}} parts (not a mix).",
                   code="invalid_input")


def parts_text(parts: list, where: str) -> str:
    """Content parts as one text (their texts joined); any part that is not text: 422 (fail closed)."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type")
        if kind != "text":
            raise ApiError(422, f"{where}[{j}] is a {kind!r} part; this guard reads text only and does not "
                                f"answer for what it cannot read. Send text parts.", code="unsupported_input")
        if not isinstance(part.get("text"), str):
            raise ApiError(422, f"{where}[{j}] is a text part without a \"text\" string.", code="invalid_input")
        texts.append(part["text"])
    return "".join(texts)


def check_sizes(texts: list[str], settings, what: str) -> None:
    """The per-input ceiling (``max_chars``) and the per-request total (``max_request_chars``): 413."""
    for k, text in enumerate(texts):
        if len(text) > settings.max_chars:
            raise ApiError(413, f"{what}[{k}] has {len(text)} characters, more than this server's ceiling of "
                                f"{settings.max_chars} per input; it was not read (treat it as flagged).",
                           code="input_too_long")
    total = sum(len(t) for t in texts)
    if total > settings.max_request_chars:
        raise ApiError(413, f"The request holds {total} characters, more than this server's limit of "
                            f"{settings.max_request_chars}; it was not read (treat it as flagged). Split it.",
                       code="request_too_long")


def text_or_422(text: str, where: str) -> None:
    try:
        check_text(text, where)
    except UserError as e:
        raise ApiError(422, str(e), code="invalid_text") from None


def moderation_result(r: Verdict) -> dict:
    """One moderation result in OpenAI's shape (see the module docstring); ``flagged`` is the guard's verdict."""
    categories, scores, applied = openai_categories(r.flagged, r.categories, r.category_scores, r.unsafe_probability)
    return {"flagged": bool(r.flagged), "categories": categories, "category_scores": scores,
            "category_applied_input_types": applied}


def served_point(guard) -> dict:
    """What the server scores with: the guard, its operating point (None: an explicit threshold) and threshold."""
    return {"guard": guard.name, "operating_point": getattr(guard, "operating_point", None),
            "threshold": float(guard.threshold)}


def add_moderation_route(app: FastAPI) -> None:
    """``POST /v1/moderations`` on ``app`` (from :func:`safetyneurons.serve.server.create_app`)."""
    state = app.state
    settings, guard = state.settings, state.guard

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        state.check_auth(request)
        inputs = parse_moderation(await read_body(request, settings.max_body_bytes), settings)
        request.state.n_inputs = len(inputs)
        if settings.log_prompts:
            request.state.prompts = inputs
        results = await score_for_request(request, state.scorer, inputs, settings.request_timeout_s)
        return {"id": f"modr-{uuid.uuid4().hex}", "model": guard.name,
                "results": [moderation_result(r) for r in results], "safetyneurons": served_point(guard)}
