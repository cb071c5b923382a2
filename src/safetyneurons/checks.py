"""One home for checking user input: prompt lists, batch sizes, token limits, thresholds, text and JSON limits.

Every module that takes these from a user (CLI, Python API, HTTP) checks them here, so a bad value gets the
same one-line :class:`~safetyneurons.errors.UserError` wherever it comes in.

Text is read in one normal form (:func:`normalise_text`): Unicode NFKC (fullwidth and other compatibility
letters become their plain forms) with every *format* character removed (Unicode category Cf: zero-width
spaces and joiners, direction marks, soft hyphens, the byte-order mark), then trimmed. Training data is stored
in this form and every text the guard scores is read in it, so invisible characters neither change the tokens
the guard reads nor count as content.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Iterable

import numpy as np

from safetyneurons.errors import UserError

#: Deeper JSON nesting is refused, in files and in request bodies (a request is an object holding lists of
#: messages whose content is a list of parts: depth 4).
MAX_JSON_DEPTH = 32


def normalise_text(text: str) -> str:
    """NFKC, without format (Cf) characters, trimmed: the form every prompt is stored and scored in."""
    text = unicodedata.normalize("NFKC", text)
    if not text.isascii():
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return text.strip()


def check_text(text: str, where: str) -> str:
    """``text`` must be encodable as UTF-8 (no lone surrogates, e.g. from undecodable argv bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where} is not valid UTF-8 text (character {e.start} is {text[e.start]!a}); "
                        f"give UTF-8 text.") from None
    return text


def check_prompts(prompts: Any, what: str = "Prompt", allow_empty_list: bool = True) -> list[str]:
    """A string or a list of strings -> list of strings; each must be valid text with visible content (a
    text that is empty after :func:`normalise_text`, e.g. only zero-width spaces, is refused)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (bytes, bytearray, dict)) or not isinstance(prompts, Iterable):
        raise UserError(f"{what}s must be a string or a list of strings, got {type(prompts).__name__}.")
    prompts = list(prompts)
    if not prompts and not allow_empty_list:
        raise UserError(f"No {what.lower()}s given; give at least one.")
    for k, p in enumerate(prompts):
        if not isinstance(p, str):
            raise UserError(f"{what} {k} is {type(p).__name__}, not a string.")
        check_text(p, f"{what} {k}")
        if not normalise_text(p):
            raise UserError(f"{what} {k} is empty (or only invisible characters); give some text to score.")
    return prompts


def check_positive_int(value: Any, what: str) -> int:
    """A whole number >= 1 (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise UserError(f"{what} must be a whole number >= 1, got {value!r}.")
    return int(value)


def check_batch_size(batch_size: Any) -> int:
    return check_positive_int(batch_size, "batch size (prompts per batch)")


def check_max_length(max_length: Any) -> int | None:
    """A token limit: a whole number >= 1, or None (no limit)."""
    return None if max_length is None else check_positive_int(max_length, "max length (tokens)")


MAX_PIECE_MARGIN = 10.0  # the largest piece margin a guard takes (a logit)


def check_piece_margin(value: Any) -> float:
    """A guard's piece margin (:func:`safetyneurons.guard.words.piece_probability`): a number from 0 to
    :data:`MAX_PIECE_MARGIN`, in the logit."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_PIECE_MARGIN:
        raise UserError(f"The piece margin must be a number from 0 to {MAX_PIECE_MARGIN:g} (a logit), got {value!r}.")
    return float(value)


def check_threshold(threshold: Any) -> float:
    """A probability in [0, 1]."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise UserError(f"The threshold must be a probability between 0 and 1, got {threshold!r}.") from None
    if not 0.0 <= t <= 1.0:
        raise UserError(f"The threshold must be a probability between 0 and 1, got {t:g}.")
    return t
