"""Long prompts: score the whole prompt in overlapping token windows, never a silently truncated head.

A model reads at most ``max_length`` tokens of a chat-formatted prompt (the guard's token limit, 256 by
default). Cutting a longer prompt to its first ``max_length`` tokens would drop both the rest of the
prompt and the chat template's assistant marker (the generation prompt), so a harmful request placed
after enough benign padding would go unseen. Instead, a prompt whose formatted form is too long is split
into windows over its *content*: each window holds ``WINDOW_TOKENS`` (32) content tokens, or fewer when
``max_length - overhead`` is smaller (``overhead``: the tokens the chat template adds, with the assistant
marker); consecutive windows overlap by half a window, and every window is formatted with the chat
template on its own. Windows are short on purpose: a request hidden in a long prompt then fills a good
part of some window instead of being averaged away among hundreds of padding tokens (mean pooling). So every window the
model reads ends with the assistant marker, and every token of the prompt is read in at least one window
(two, away from the ends) with at least half a window of context before it.

The guard scores every window and keeps the **highest** unsafe probability per prompt
(:meth:`safetyneurons.guard.guard.Guard.unsafe_probability`): one harmful window flags the prompt. Cost: a
prompt of ``T`` content tokens takes about ``2 T / W`` windows of ``W`` tokens instead of one pass, so the
compute grows linearly with its length (each token is read about twice, plus the template per window).
Prompts that fit are read exactly as before (one window, the prompt itself); a request diluted by padding
*within* the limit is not split (a limit of the mean-pooled guard, not of truncation).

Why 32: on the real default guard (mean pooling, SmolLM2), a 13-token harmful request after 2,250 characters of
benign text scored 0.003 with 64-token windows (diluted inside its window), 0.989 with 32; 24- and 16-token windows
flagged the benign padding alone (0.46 and 0.95: very short texts look like the short harmful prompts of the
training data). 32 was the only size that flagged the padded request and not the padding. This is one example, not
a validation set: a long benign prompt with edgy words is still more likely to be flagged than its parts would be.

Windows are cut at token boundaries of the content tokenised alone, and each window is the matching
substring of the original text, so it is read through the usual formatting and tokenisation path. A
substring may tokenise a token or two differently at its edges; a window that then exceeds the limit is
shrunk until it fits (checked, never truncated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from safetyneurons.errors import UserError

if TYPE_CHECKING:
    from safetyneurons.model.pair import LoadedModel

WINDOW_TOKENS = 32  # content tokens per window of a long prompt (stride: half of it); see the docstring
MIN_WINDOW_TOKENS = 8  # a limit that leaves fewer content tokens than this next to the template is refused
_MARGIN = 2  # content tokens kept free for tokenisation differences at window edges


def _encode(lm, texts: Sequence[str]) -> list[list[int]]:
    return lm.tokenizer(list(texts), padding=False, truncation=False,
                        add_special_tokens=not lm.chat_template)["input_ids"]


def formatted_lengths(lm: LoadedModel, prompts: Sequence[str]) -> np.ndarray:
    """Tokens each prompt takes once formatted for the model (chat template included), untruncated."""
    return np.array([len(ids) for ids in _encode(lm, [lm.format(p) for p in prompts])], dtype=np.int64)


def template_overhead(lm: LoadedModel) -> int:
    """Tokens the formatting adds around the content (chat template with the assistant marker, specials)."""
    return int(formatted_lengths(lm, [""])[0])


def _token_spans(lm, text: str) -> list[tuple[int, int]]:
    """(start, end) character span of each content token of ``text`` tokenised alone."""
    tok = lm.tokenizer
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        if spans and all(b >= a for a, b in spans):
            return spans
    # slow tokenizers: rebuild spans from the decoded prefix lengths
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans, prev = [], 0
    for k in range(1, len(ids) + 1):
        end = min(len(tok.decode(ids[:k])), len(text))
        spans.append((prev, end))
        prev = end
    return spans


def _window_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) of overlapping windows of ``size`` tokens (stride size // 2) covering all n tokens."""
    stride = max(1, size // 2)
    out, a = [], 0
    while True:
        b = min(a + size, n)
        out.append((a, b))
        if b >= n:
            return out
        a += stride


def split_windows(lm: LoadedModel, prompts: Sequence[str], max_length: int | None,
                  window_tokens: int = WINDOW_TOKENS) -> tuple[list[str], np.ndarray]:
    """Texts the model reads for ``prompts``: each prompt itself when it fits in ``max_length`` formatted
    tokens, else its overlapping content windows. Returns (texts, owner) with ``owner[k]`` the index of
    the prompt text ``k`` comes from; every formatted text fits in ``max_length`` tokens."""
    prompts = list(prompts)
    if max_length is None or not prompts:
        return prompts, np.arange(len(prompts), dtype=np.int64)
    lengths = formatted_lengths(lm, prompts)
    if bool((lengths <= max_length).all()):
        return prompts, np.arange(len(prompts), dtype=np.int64)
    overhead = template_overhead(lm)
    room = int(max_length) - overhead - _MARGIN
    size = min(room, max(int(window_tokens), MIN_WINDOW_TOKENS))
    if room < MIN_WINDOW_TOKENS:
        least = overhead + _MARGIN + MIN_WINDOW_TOKENS
        raise UserError(f"The token limit ({max_length}) leaves {max(room, 0)} tokens for the prompt next to the "
                        f"chat template's {overhead}; raise --max-length to at least {least}.")
    texts, owner = [], []
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        if n <= max_length:
            texts.append(prompt)
            owner.append(i)
            continue
        spans = _token_spans(lm, prompt)
        ranges = _window_ranges(len(spans), size)
        pieces = [prompt[spans[a][0]:spans[b - 1][1]] for a, b in ranges]
        for (a, b), piece, m in zip(ranges, pieces, formatted_lengths(lm, pieces)):
            texts.append(piece if m <= max_length else _fit(lm, prompt, spans, a, b, max_length))
            owner.append(i)
    return texts, np.asarray(owner, dtype=np.int64)


def _fit(lm, prompt: str, spans, a: int, b: int, max_length: int) -> str:
    """The substring for tokens [a, b), shrunk from the end until its formatted form fits."""
    while b > a:
        text = prompt[spans[a][0]:spans[b - 1][1]]
        excess = int(formatted_lengths(lm, [text])[0]) - max_length
        if excess <= 0:
            return text
        b -= excess
    raise UserError("A prompt window could not be fitted into the token limit; raise max_length.")


def head_that_fits(lm: LoadedModel, prompt: str, max_length: int) -> str:
    """The longest leading part of ``prompt`` whose formatted form fits (the chat template and its
    assistant marker stay whole). Used where one vector per prompt is needed (activation stores)."""
    overhead = template_overhead(lm)
    return split_windows(lm, [prompt], max_length, window_tokens=max_length - overhead - _MARGIN)[0][0]


def best_per_prompt(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Row index of each prompt's highest value over its windows (the first on ties), int64 ``[n]``."""
    values, owner = np.asarray(values, dtype=np.float64), np.asarray(owner, dtype=np.int64)
    order = np.lexsort((-values, owner))  # by prompt, then by value descending
    first = np.ones(len(order), dtype=bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    best = order[first]
    if len(best) != n:
        raise ValueError("every prompt needs at least one window")
    return best


def max_per_prompt(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """The highest value per prompt over its windows (float64 ``[n]``)."""
    return np.asarray(values, dtype=np.float64)[best_per_prompt(values, owner, n)]
