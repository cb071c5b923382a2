"""Token positions: a conversation as token ids, with the **content** (the messages' own text) marked.

A chat template wraps each message in role markers and, for many models, a system prompt (SmolLM2 adds a
fixed 24-token one; Llama 3 adds a dated one). Under causal attention those template tokens read the same text
for every prompt, so counting them in a change score or a mean pooling mixes prompt-independent weight drift
(and a 1/length factor) into every measurement. :class:`ChatTemplate` therefore encodes a conversation **piece
by piece**:

- the template is applied once per sequence of roles to *sentinel* messages (private-use characters that no
  template changes); the text between the sentinels is the template's own text (system prompt, role markers,
  generation prompt), tokenised with its control tokens;
- each message's text is tokenised on its own with ``split_special_tokens=True``: a control-token string inside
  a message (``<|im_end|>``, ``<|im_start|>assistant``) is read as the plain text it is, by the guard and by the
  model, never as a control token (no forged turns);
- the ids are the concatenation, and each message's tokens form one **content span** ``[start, end)``.

Without a chat template a prompt is its text with the tokenizer's own special tokens (BOS) around it; the
content is the text's tokens. Content is tokenised alone, so no BPE merge crosses a span boundary; for the
byte-level BPE and SentencePiece tokenizers of the supported families this gives the same ids as tokenising the
formatted text whole, because the templates put a newline or a control token at every boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from safetyneurons.errors import UserError

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters around a sentinel's number


@dataclass(frozen=True)
class EncodedConversation:
    """A conversation as the model reads it: token ids and one content span per message (same order)."""

    ids: list[int]
    spans: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.ids)


class ChatTemplate:
    """How a model's tokenizer turns messages into ids (see the module docstring). ``use_template`` False: plain
    text with the tokenizer's special tokens (a model without a chat template, or with it turned off)."""

    def __init__(self, tokenizer: Any, use_template: bool):
        self.tokenizer = tokenizer
        self.use_template = bool(use_template)
        self._segments: dict[tuple[str, ...], list[list[int]]] = {}

    # ---- template text
    def _tok(self, texts: Sequence[str], split_special: bool) -> list[list[int]]:
        if not texts:
            return []
        kw = {"split_special_tokens": True} if split_special else {}
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False, **kw)["input_ids"]]

    def segments(self, roles: tuple[str, ...]) -> list[list[int]]:
        """Token ids of the template text around messages of these roles: ``len(roles) + 1`` segments
        (before the first message, between messages, after the last one with the generation prompt)."""
        if roles not in self._segments:
            self._segments[roles] = self._template_segments(roles) if self.use_template else self._plain(roles)
        return self._segments[roles]

    def _plain(self, roles: tuple[str, ...]) -> list[list[int]]:
        """No template: the tokenizer's own special tokens around the text; messages joined by a blank line."""
        ids = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
        bare = list(self.tokenizer("a", add_special_tokens=False)["input_ids"])
        at = next((i for i in range(len(ids) - len(bare) + 1) if ids[i:i + len(bare)] == bare), 0)
        sep = self._tok(["\n\n"], split_special=False)[0]
        return [ids[:at]] + [sep] * (len(roles) - 1) + [ids[at + len(bare):]]

    def _template_segments(self, roles: tuple[str, ...]) -> list[list[int]]:
        sentinels = [f"{_OPEN}{k}{_CLOSE}" for k in range(len(roles))]
        text = self.tokenizer.apply_chat_template([{"role": r, "content": s} for r, s in zip(roles, sentinels)],
                                                  tokenize=False, add_generation_prompt=True)
        out, pos = [], 0
        for s in sentinels:
            at = text.find(s, pos)
            if at < 0:
                raise UserError(f"The chat template drops or changes message text (roles {', '.join(roles)}), so "
                                f"the messages' tokens cannot be found; run without the chat template.")
            out.append(text[pos:at])
            pos = at + len(s)
        return self._tok(out + [text[pos:]], split_special=False)

    # ---- messages
    def encode(self, conversations: Sequence[Sequence[dict]]) -> list[EncodedConversation]:
        """Encode conversations (lists of ``{"role", "content": str}``); message texts are tokenised in one call."""
        texts = [m["content"] for conv in conversations for m in conv]
        content = iter(self._tok(texts, split_special=True))
        out = []
        for conv in conversations:
            segs = self.segments(tuple(m["role"] for m in conv))
            ids, spans = list(segs[0]), []
            for k in range(len(conv)):
                c = next(content)
                spans.append((len(ids), len(ids) + len(c)))
                ids += c
                ids += segs[k + 1]
            out.append(EncodedConversation(ids, spans))
        return out

    def encode_prompts(self, prompts: Sequence[str]) -> list[EncodedConversation]:
        """Each prompt as one user message."""
        return self.encode([[{"role": "user", "content": p}] for p in prompts])

    def overhead(self) -> int:
        """Tokens the template adds around one user message (system prompt, markers, generation prompt)."""
        return sum(len(s) for s in self.segments(("user",)))

    def head(self, enc: EncodedConversation, max_length: int) -> EncodedConversation:
        """A one-message encoding cut to ``max_length`` tokens by dropping the end of the message's text (the
        template, with its generation prompt, stays whole)."""
        if len(enc.ids) <= max_length:
            return enc
        (a, b), = enc.spans
        keep = max_length - (len(enc.ids) - (b - a))
        if keep < 1:
            raise UserError(f"The token limit ({max_length}) leaves no room for the prompt next to the chat "
                            f"template's {len(enc.ids) - (b - a)} tokens; raise --max-length.")
        return EncodedConversation(enc.ids[:a + keep] + enc.ids[b:], [(a, a + keep)])


def pad_batch(encoded: Sequence[EncodedConversation], pad_id: int, padding_side: str = "right",
              suffix: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """A padded batch: ``input_ids``, ``attention_mask`` and ``content_mask`` (bool, the content spans' tokens);
    ``suffix`` ids (e.g. a prefilled start of the reply) follow each sequence."""
    rows = [list(e.ids) + list(suffix) for e in encoded]
    n = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), n), int(pad_id), dtype=torch.long)
    attn = torch.zeros((len(rows), n), dtype=torch.long)
    content = torch.zeros((len(rows), n), dtype=torch.bool)
    for i, (row, e) in enumerate(zip(rows, encoded)):
        off = n - len(row) if padding_side == "left" else 0
        ids[i, off:off + len(row)] = torch.tensor(row, dtype=torch.long)
        attn[i, off:off + len(row)] = 1
        for a, b in e.spans:
            content[i, off + a:off + b] = True
    return {"input_ids": ids, "attention_mask": attn, "content_mask": content}
