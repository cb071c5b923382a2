"""Guarded generation: the guard reads the safety neurons from the model's own prefill, then the model answers.

The paper's safeguard sits inside the model that answers. :class:`GuardedChat` serves a guard's own model:

1. **Prefill once.** The conversation is formatted with the chat template and run through the whole model
   with a KV cache. Hooks (:func:`safetyneurons.model.hooks.attached_hooks`) at the guard's hook point pool the
   safety neurons exactly as :meth:`Guard.features <safetyneurons.guard.guard.Guard.features>` does (the mean
   over the content tokens, i.e. the user's message (:mod:`safetyneurons.model.positions`), or the last token),
   and when the deepest safety-neuron layer has run, the guard's probe scores them. There is no second
   forward pass. A conversation longer than the guard's ``max_length`` is never cut to its head: the guard
   reads overlapping windows of ``max_length`` positions (stride half of it, the last one ending with the
   assistant marker) and keeps the highest probability, so padding cannot push a request out of sight
   (:mod:`safetyneurons.activations.windows` does the same for ``Guard.score``, by re-reading text windows).
2. **If flagged** (probability >= threshold), the prefill stops right there: later layers, the LM head and
   every decoding step are skipped, and the reply is the refusal message with finish reason
   ``content_filter``.
3. **Otherwise** the model decodes from the same KV cache: greedy at ``temperature`` 0, else sampling
   (optionally with ``top_p``) from a generator seeded with ``seed``, until the end-of-turn token,
   a ``stop`` string or ``max_tokens``.

Guard modes: ``block`` (the above), ``monitor`` (score and report, never block: a shadow deployment) and
``off`` (no hooks, no probe: the unguarded baseline of the overhead benchmark).

For one user message within the token limit the guard's probability equals ``Guard.score`` on that
message (same template, same tokens, same content mask); for a conversation it reads the whole formatted
conversation, which is what the model is about to answer, and mean pooling runs over the tokens of every
user message.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from safetyneurons.constants import GUARD_MODES
from safetyneurons.errors import UserError
from safetyneurons.model.hooks import attached_hooks
from safetyneurons.activations.features import plan_layers
from safetyneurons.model.generate import stop_token_ids
from safetyneurons.model.positions import content_mask, message_span, template_affixes

if TYPE_CHECKING:
    from safetyneurons.guard.guard import Guard

ROLES = ("system", "developer", "user", "assistant")
DEFAULT_REFUSAL = "I can't help with that request."
MAX_STOP = 4


def prefill_windows(n: int, max_length: int | None) -> list[tuple[int, int]]:
    """Position windows [a, b) the guard reads in a prefill of ``n`` tokens: all of it when it fits, else
    ``max_length`` positions with stride half of that, the last window ending at the end (assistant marker)."""
    if max_length is None or n <= int(max_length):
        return [(0, n)]
    w = int(max_length)
    starts = list(range(0, n - w, max(1, w // 2))) + [n - w]
    return [(a, a + w) for a in starts]


@dataclass(frozen=True)
class SamplingSettings:
    """How the reply is decoded (OpenAI chat-completion parameters of the same names)."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def check(self, max_tokens_limit: int | None = None) -> "SamplingSettings":
        """Validate (UserError naming the bad field) and return self."""
        m = self.max_tokens
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise UserError(f"max_tokens must be a whole number >= 1, got {m!r}.")
        if max_tokens_limit is not None and m > max_tokens_limit:
            raise UserError(f"max_tokens {m} is above this server's limit of {max_tokens_limit}; ask for fewer.")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 2.0:
            raise UserError(f"temperature must be a number between 0 and 2 (0 = greedy), got {t!r}.")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise UserError(f"top_p must be a number in (0, 1], got {p!r}.")
        if len(self.stop) > MAX_STOP or any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise UserError(f"seed must be a whole number, got {self.seed!r}.")
        return self


@dataclass(frozen=True)
class Encoded:
    """A formatted conversation as tokens: ids ``[1, n]`` and, for a mean-pooling guard, its content mask ``[n]``."""

    ids: torch.Tensor
    content: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[1])


@dataclass
class Prefill:
    """The prompt after one forward pass: the guard's verdict and, unless flagged, the state to decode from."""

    prompt_tokens: int
    unsafe_probability: float | None  # None with the guard off
    blocked: bool  # flagged in block mode: nothing more runs, the reply is the refusal
    guard_ms: float  # time spent pooling the safety neurons and running the probe
    logits: torch.Tensor | None = None  # next-token logits [vocab]; None when flagged
    past: Any = None  # the KV cache; None when flagged


@dataclass(frozen=True)
class Delta:
    """A piece of the reply; the last one carries the finish reason and the count of generated tokens."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "content_filter" on the last piece
    completion_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """A whole reply with its usage and the guard's verdict."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    unsafe_probability: float | None
    blocked: bool
    guard_ms: float


class _Flagged(Exception):
    pass


# -------------------------------------------------------------------------------------- messages
def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages -> ``[{"role", "content": str}]``. Content may be a string or a list of text parts.

    ``developer`` becomes ``system``. Anything else (images, tool calls, unknown roles) is a UserError.
    """
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects.")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"messages[{k}] must be an object with \"role\" and \"content\".")
        role = m.get("role")
        if role not in ROLES:
            raise UserError(f"messages[{k}].role is {role!r}; supported roles: {', '.join(ROLES)}.")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content_text(m.get("content"), f"messages[{k}].content")})
    if out[-1]["role"] == "assistant":
        raise UserError("The last message is the assistant's; end the conversation with a user message.")
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise UserError("The conversation has no user message with text; give one to answer.")
    return out


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise UserError(f"{where}[{j}] is a {kind!r} part; only {{\"type\": \"text\", \"text\": ...}} parts "
                                f"are supported (the model reads text).")
            texts.append(part["text"])
        return "".join(texts)
    raise UserError(f"{where} must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts.")


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might still grow into a stop string (or are a partial UTF-8 character)."""
    n = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


# ------------------------------------------------------------------------------------------ chat
class GuardedChat:
    """A guard's model answering chat conversations, with the guard reading the same prefill.

    ``mode``: ``block`` (refuse flagged prompts without generating), ``monitor`` (score, never block) or
    ``off``. ``context_length`` caps prompt + reply tokens (default: the model config's
    ``max_position_embeddings``). The counters ``prefills`` and ``decode_steps`` (model calls after the
    prefill) are for monitoring and tests.
    """

    def __init__(self, guard: Guard, *, mode: str = "block", refusal: str = DEFAULT_REFUSAL,
                 context_length: int | None = None):
        if mode not in GUARD_MODES:
            raise UserError(f"Unknown guard mode {mode!r}. Choose one of: {', '.join(GUARD_MODES)}.")
        if not isinstance(refusal, str) or not refusal.strip():
            raise UserError("The refusal message is empty; give the text to answer flagged prompts with.")
        self.guard, self.lm, self.mode, self.refusal = guard, guard.lm, mode, refusal
        cfg = getattr(self.lm.model, "config", None)
        self.context_length = int(context_length or getattr(cfg, "max_position_embeddings", 0) or 4096)
        self.stop_ids = stop_token_ids(self.lm)
        # transformers >= 5.2x names the KV cache argument `cache`; earlier versions `past_key_values`
        self._cache_arg = "cache" if "cache" in inspect.signature(self.lm.model.forward).parameters \
            else "past_key_values"
        self._layers, self._index, _, _, _ = plan_layers(self.lm, guard.hook_point, guard.neuron_set)
        self._affixes: tuple[str, str] | None = None
        self.prefills = 0
        self.decode_steps = 0

    @property
    def model_name(self) -> str:
        return f"{self.lm.ref}+{self.guard.name}" if self.mode != "off" else str(self.lm.ref)

    # ---- prompt
    def format(self, messages: list[dict]) -> str:
        """The text the model reads (chat template with the generation prompt; plain text without a template)."""
        if self.lm.chat_template:
            return self.lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def encode(self, messages: list[dict]) -> Encoded:
        """The formatted conversation as tokens (tokenized as the guard tokenizes prompts), with the content
        mask a mean-pooling guard reads: the tokens of the user messages' text."""
        text = self.format(messages)
        need_mask = self.mode != "off" and self.guard.pooling == "mean"
        if need_mask and not getattr(self.lm.tokenizer, "is_fast", False):
            raise UserError("A mean-pooling guard needs a fast tokenizer (character offsets) to find the user's "
                            "message; this model's tokenizer is a slow one.")
        enc = self.lm.tokenizer(text, return_tensors="pt", add_special_tokens=not self.lm.chat_template,
                                return_offsets_mapping=need_mask)
        ids = enc["input_ids"]
        if ids.shape[1] == 0:
            raise UserError("The conversation encodes to zero tokens; give some text.")
        if ids.shape[1] >= self.context_length:
            raise UserError(f"The conversation is {ids.shape[1]} tokens, but the model's context is "
                            f"{self.context_length}; shorten it.")
        if not need_mask:
            return Encoded(ids)
        masks = [content_mask(enc["offset_mapping"], [span], enc["attention_mask"])[0]
                 for span in self._user_spans(text, messages)]
        return Encoded(ids, torch.stack(masks).any(0))

    def _user_spans(self, text: str, messages: list[dict]) -> list[tuple[int, int]]:
        """Character spans of the user messages in the formatted conversation (one message: as the guard finds it)."""
        if len(messages) == 1:
            if self._affixes is None:
                self._affixes = template_affixes(self.lm.format)
            return [message_span(text, messages[0]["content"], self._affixes)]
        spans, pos = [], 0
        for m in messages:  # in order, so a user's text is not matched inside an earlier message
            body = m["content"].strip()
            at = text.find(body, pos) if body else -1
            if at < 0:
                continue
            pos = at + len(body)
            if m["role"] == "user":
                spans.append((at, pos))
        if not spans:
            raise UserError("Cannot find the user's messages in the chat-formatted conversation (the chat template "
                            "changes their text), so the guard cannot read them.")
        return spans

    # ---- prefill (+ guard)
    @torch.no_grad()
    def prefill(self, conversation: list[dict] | Encoded) -> Prefill:
        """One forward pass over the conversation (normalized messages, or :meth:`encode` of them); in
        block/monitor mode the guard scores it on the way."""
        enc = conversation if isinstance(conversation, Encoded) else self.encode(conversation)
        ids = enc.ids.to(self.lm.device)
        n_prompt = enc.n_tokens
        model = self.lm.model
        self.prefills += 1
        if self.mode == "off":
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return Prefill(n_prompt, None, False, 0.0, out.logits[0, -1], _cache_of(out))

        g = self.guard
        spans = prefill_windows(n_prompt, g.max_length)  # the token positions the guard reads, window by window
        if g.pooling == "mean":
            keep = enc.content.to(self.lm.device)
            spans = [(a, b) for a, b in spans if bool(keep[a:b].any())]  # windows holding user text
            if not spans:
                raise UserError("No user text is among the tokens the guard reads (the chat template and earlier "
                                "messages fill them); shorten the system prompt.")
            # the mean over each window's content tokens, as one product at the end: weights [windows, tokens]
            weights = torch.zeros(len(spans), n_prompt, device=keep.device)
            for k, (a, b) in enumerate(spans):
                weights[k, a:b] = keep[a:b].float() / keep[a:b].sum()
        last = [b - 1 for _, b in spans]  # last pooling: the last token of each window
        layers, index, deepest = self._layers, self._index, self._layers[-1]
        pieces: dict[int, torch.Tensor] = {}
        verdict = {"p": float("nan"), "s": 0.0}

        def read(layer: int, t: torch.Tensor) -> None:
            t0 = time.perf_counter()
            idx = index[layer]
            rows = t[0] if g.pooling == "mean" else t[0, last]
            # a copy of this layer's neurons only (the activation itself may be reused by the model)
            pieces[layer] = rows.clone() if idx is None else rows.index_select(-1, idx.to(t.device))
            if layer == deepest:
                x = torch.cat([pieces[i].to(t.device) for i in layers], -1).float()
                x = weights.to(t.device) @ x if g.pooling == "mean" else x
                verdict["p"] = float(g.probability(x.cpu().numpy()).max())  # the most unsafe window
            verdict["s"] += time.perf_counter() - t0
            if layer == deepest and self.mode == "block" and verdict["p"] >= g.threshold:
                raise _Flagged  # stop the prefill here: later layers and the LM head never run

        try:
            with attached_hooks(model, g.hook_point, read, layers):
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        except _Flagged:
            return Prefill(n_prompt, verdict["p"], True, verdict["s"] * 1000.0)
        return Prefill(n_prompt, verdict["p"], False, verdict["s"] * 1000.0, out.logits[0, -1], _cache_of(out))

    # ---- decoding
    @staticmethod
    def pick(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None) -> int:
        """The next token: argmax at temperature 0, else a (nucleus) sample."""
        if settings.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / settings.temperature, -1)
        if settings.top_p < 1.0:
            p_sorted, order = probs.sort(descending=True)
            keep = (p_sorted.cumsum(0) - p_sorted) < settings.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], p_sorted[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @torch.no_grad()
    def generate(self, pre: Prefill, settings: SamplingSettings) -> Iterator[Delta]:
        """Decode from a prefill, yielding text pieces; the last :class:`Delta` has the finish reason.

        Each step runs at most one model call, so a server can interleave steps of several requests.
        A flagged prefill yields the refusal at once with ``content_filter`` and runs nothing.
        """
        if pre.blocked:
            yield Delta(self.refusal, "content_filter", 0)
            return
        gen = torch.Generator().manual_seed(int(settings.seed))
        limit = min(int(settings.max_tokens), self.context_length - pre.prompt_tokens)
        logits, past = pre.logits, pre.past
        ids: list[int] = []
        sent, text, finish, n_sampled = 0, "", "length", 0
        while True:
            tok = self.pick(logits, settings, gen)
            n_sampled += 1  # usage counts every generated token, the end-of-turn token included
            if tok in self.stop_ids:
                finish = "stop"
                break
            ids.append(tok)
            text = self._decode(ids)
            cut = _first_stop(text, settings.stop)
            if cut is not None:
                text, finish = text[:cut], "stop"
                break
            end = len(text) - _held_back(text, settings.stop)
            if end > sent:
                yield Delta(text[sent:end])
                sent = end
            if len(ids) >= limit:
                break
            self.decode_steps += 1
            out = self.lm.model(input_ids=torch.tensor([[tok]], device=self.lm.device), use_cache=True,
                                **{self._cache_arg: past})
            logits, past = out.logits[0, -1], _cache_of(out)
        yield Delta(text[sent:] if len(text) > sent else "", finish, n_sampled)

    def complete(self, messages: list[dict], settings: SamplingSettings | None = None) -> Completion:
        """Answer a conversation (OpenAI-style messages) in one call."""
        settings = (settings or SamplingSettings()).check()
        pre = self.prefill(normalize_messages(messages))
        parts, last = [], None
        for d in self.generate(pre, settings):
            parts.append(d.text)
            last = d
        return Completion("".join(parts), last.finish_reason, pre.prompt_tokens, last.completion_tokens,
                          pre.unsafe_probability, pre.blocked, pre.guard_ms)
