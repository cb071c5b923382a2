"""Token positions: which tokens of a chat-formatted prompt hold the **content**, the user's own message.

A chat template wraps the user's message in role markers and, for many models, a system prompt
(SmolLM2 adds a fixed 24-token one; Llama 3 adds a dated one). Under causal attention those template
tokens read the same text for every prompt, so counting them in a change score or a mean pooling mixes
prompt-independent weight drift (and a 1/length factor) into every measurement. The **content mask** marks
only the tokens that carry the user's message:

- the template is applied to two one-letter messages, ``"a"`` and ``"b"``; their common prefix and common
  suffix are the template text before and after the message (system prompt, role markers, generation prompt);
- in a real formatted prompt, the message is what lies between that prefix and that suffix; if a template
  makes the prefix depend on the message (or the date changed between the two calls), the message is
  found as the last occurrence of the (trimmed) prompt text instead;
- the formatted prompt is tokenized with the tokenizer's character offsets (a fast tokenizer,
  ``return_offsets_mapping=True``), and a token is content when its characters overlap the message span.
  A token that straddles the boundary (a BPE merge of template and message characters) counts as content.

Without a chat template the formatted prompt is the prompt itself, so the content is every token except
those the tokenizer adds (BOS), which have no characters. For a template without a system prompt the content
is the same thing: every token of the user's message, never the role markers or the generation prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from safetyneurons.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_FILLERS = ("a", "b")


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def template_affixes(format_prompt: Callable[[str], str]) -> tuple[str, str]:
    """(prefix, suffix): the template text before and after the user's message."""
    x, y = (format_prompt(f) for f in _FILLERS)
    p = _common_prefix(x, y)
    s = _common_prefix(x[::-1], y[::-1])
    s = min(s, len(x) - p, len(y) - p)  # the prefix and suffix must not overlap
    return x[:p], (x[len(x) - s:] if s else "")


def message_span(formatted: str, prompt: str, affixes: tuple[str, str]) -> tuple[int, int]:
    """Character span ``[start, end)`` of the user's message inside ``formatted``."""
    prefix, suffix = affixes
    if formatted.startswith(prefix) and formatted.endswith(suffix) and len(prefix) + len(suffix) <= len(formatted):
        return len(prefix), len(formatted) - len(suffix)
    text = prompt.strip()
    at = formatted.rfind(text) if text else -1
    if at < 0:
        raise UserError("Cannot find the user's message in the chat-formatted prompt (the chat template changes "
                        "the message text). Use --positions prompt (every token) or run without the chat template.")
    return at, at + len(text)


def content_mask(offsets: torch.Tensor, spans: Sequence[tuple[int, int]], attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[batch, seq]``: real tokens whose characters ``offsets[b, t] = (start, end)`` overlap ``spans[b]``."""
    starts, ends = offsets[..., 0], offsets[..., 1]
    span = torch.tensor([list(s) for s in spans], dtype=starts.dtype).reshape(-1, 2)
    lo, hi = span[:, :1], span[:, 1:]
    return attention_mask.bool() & (ends > starts) & (starts < hi) & (ends > lo)


def encode_with_content(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], prompts: Sequence[str],
                        affixes: tuple[str, str], **tokenizer_kwargs: Any) -> dict:
    """Tokenize formatted ``texts`` (of ``prompts``) into a padded batch with a ``content_mask``."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("Content-only token positions need a fast tokenizer (character offsets); this model's "
                        "tokenizer is a slow one. Use --positions prompt, or a model with a tokenizer.json.")
    enc = tokenizer(list(texts), return_offsets_mapping=True, **tokenizer_kwargs)
    spans = [message_span(t, p, affixes) for t, p in zip(texts, prompts)]
    mask = content_mask(enc["offset_mapping"], spans, enc["attention_mask"])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "content_mask": mask}
