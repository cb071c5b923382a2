"""Guarded generation: the guard reads the safety neurons from the model's own prefill, then the model answers.

The paper's safeguard sits inside the model that answers. :class:`GuardedChat` serves a guard's own model:

1. **The guard reads the conversation** through the activation reader (:mod:`safetyneurons.activations.reader`),
   exactly as :meth:`Guard.score <safetyneurons.guard.guard.Guard.score>` and every HTTP route read it: every
   message, whatever its role, normalised, template markers in its text read as plain text, long messages also
   in windows; the verdict is the most unsafe piece. When the whole conversation is one piece (one user message
   that the guard reads whole), that piece is the prefill itself: hooks
   (:func:`safetyneurons.model.hooks.attached_hooks`) pool the safety neurons during the model's own forward
   pass and the probe scores them when the deepest safety-neuron layer has run, with no second pass. Otherwise
   the reader scores the pieces first (its passes stop after the deepest safety neuron) and the prefill follows
   only if the conversation is not blocked. A server runs this step by step (:meth:`GuardedChat.prefill_steps`):
   it reads the pieces in slices of its own and feeds the prompt in chunks of bounded tokens, the KV cache
   carried from chunk to chunk (the same logits as one pass, to float rounding); the one-pass reading inside the
   prefill is then used when the prompt is one chunk.
2. **If flagged** (probability >= threshold), the prefill stops right there: later layers, the LM head and
   every decoding step are skipped, and the reply is the refusal message with finish reason
   ``content_filter``.
3. **Otherwise** the model decodes from the same KV cache: greedy at ``temperature`` 0, else sampling
   (optionally with ``top_p``) from a generator seeded with ``seed``, until the end-of-turn token,
   a ``stop`` string or ``max_tokens``.

Guard modes: ``block`` (the above), ``monitor`` (score and report, never block: a shadow deployment) and
``off`` (no hooks, no probe: the unguarded baseline of the overhead benchmark).

The model reads the same normalised messages the guard reads, formatted by the same
:class:`~safetyneurons.model.positions.ChatTemplate`, so a control-token string inside a message never becomes a
control token for the model either.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from safetyneurons.constants import GUARD_MODES
from safetyneurons.errors import UserError
from safetyneurons.activations.reader import max_per_input
from safetyneurons.checks import normalise_text
from safetyneurons.model.generate import stop_token_ids
from safetyneurons.model.hooks import EarlyExit, attached_hooks, cache_argument, kv_cache

if TYPE_CHECKING:
    from safetyneurons.guard.guard import Guard

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_ROLE_AS = {"developer": "system", "function": "tool"}
DEFAULT_REFUSAL = "I can't help with that request."
MAX_STOP = 4


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
    """A formatted conversation as the model reads it: ids ``[1, n]``, the normalised messages they encode."""

    ids: torch.Tensor
    messages: tuple = ()

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


# -------------------------------------------------------------------------------------- messages
def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages -> ``[{"role", "content": str}]`` with every text normalised
    (:func:`safetyneurons.checks.normalise_text`), as the guard and the model read them.

    Content may be a string or a list of text parts (joined into one text). ``developer`` becomes ``system``;
    ``tool`` (and ``function``) results are kept as ``tool`` messages; an assistant's ``tool_calls`` are read as
    text (``name(arguments)`` per call). Image or audio parts cannot be read: a UserError, never skipped.
    Messages with no text are dropped; the conversation must hold text and must not end with the assistant.
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
        text = "" if m.get("content") is None else content_text(m["content"], f"messages[{k}].content")
        text = "\n".join(x for x in [text, *_tool_call_texts(m.get("tool_calls"), k)] if x)
        out.append({"role": _ROLE_AS.get(role, role), "content": normalise_text(text)})
    if out[-1]["role"] == "assistant":
        raise UserError("The last message is the assistant's; end the conversation with a user message.")
    if not any(m["role"] == "user" and m["content"] for m in out):
        raise UserError("The conversation has no user message with text; give one to answer.")
    return [m for m in out if m["content"]]


def content_text(content, where: str) -> str:
    """A message's content as one text: a string, or a list of ``{"type": "text", "text"}`` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise UserError(f"{where}[{j}] is a {kind!r} part; only {{\"type\": \"text\", \"text\": ...}} parts "
                                f"can be read (the guard reads text, and refuses what it cannot read).")
            texts.append(part["text"])
        return "".join(texts)
    raise UserError(f"{where} must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts.")


def _tool_call_texts(calls, k: int) -> list[str]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise UserError(f"messages[{k}].tool_calls must be a list of tool calls.")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments", ""), str):
            raise UserError(f"messages[{k}].tool_calls[{j}] must be {{\"function\": {{\"name\", \"arguments\"}}}}.")
        out.append(f"{fn['name']}({fn.get('arguments', '')})")
    return out


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might still grow into a stop string (or are a partial UTF-8 character)."""
    n = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the first stop string begins, looking only at text from ``start`` minus the longest stop (text
    before that was searched at earlier steps): linear in the new text per token, not in the whole reply."""
    if not stops:
        return None
    since = max(0, start - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, since) for s in stops) if i >= 0]
    return min(hits) if hits else None


# ------------------------------------------------------------------------------------------ chat
def _flags(p: float, threshold: float) -> bool:
    """Flagged: at or over the threshold, or not a finite number (fail closed)."""
    return not math.isfinite(p) or p >= threshold


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
        self._cache_arg = cache_argument(self.lm.model)
        self.prefills = 0
        self.decode_steps = 0

    @property
    def model_name(self) -> str:
        return f"{self.lm.ref}+{self.guard.name}" if self.mode != "off" else str(self.lm.ref)

    # ---- prompt
    def encode(self, messages: list[dict]) -> Encoded:
        """The conversation (normalised messages) as the model reads it: one tokenisation, template markers in
        the messages' text read as plain text (:class:`~safetyneurons.model.positions.ChatTemplate`)."""
        ids = self.lm.template.encode([messages])[0].ids
        if not ids:
            raise UserError("The conversation encodes to zero tokens; give some text.")
        if len(ids) >= self.context_length:
            raise UserError(f"The conversation is {len(ids)} tokens, but the model's context is "
                            f"{self.context_length}; shorten it.")
        return Encoded(torch.tensor([ids], dtype=torch.long), tuple(dict(m) for m in messages))

    # ---- prefill (+ guard)
    def guard_pieces(self, enc: Encoded) -> list:
        """The pieces the guard reads of the conversation (:meth:`ActivationReader.pieces
        <safetyneurons.activations.reader.ActivationReader.pieces>`: each message tokenised once, long ones also in
        windows); none with the guard off."""
        return [] if self.mode == "off" else self.guard.reader.pieces([list(enc.messages)])

    @staticmethod
    def reads_in_prefill(enc: Encoded, pieces: Sequence, chunk_tokens: int | None = None) -> bool:
        """Whether the guard reads the conversation inside the prefill's own pass: the conversation is the guard's
        one piece and the prefill is one chunk."""
        one_chunk = chunk_tokens is None or enc.n_tokens <= int(chunk_tokens)
        return one_chunk and len(pieces) == 1 and list(pieces[0].ids) == enc.ids[0].tolist()

    def read_guard(self, pieces: Sequence) -> tuple[float, float]:
        """The guard's verdict on the pieces in one go: (probability of the most unsafe piece, milliseconds)."""
        t0 = time.perf_counter()
        X, owner = self.guard.reader.read_pieces(pieces)  # pieces already made: nothing is tokenised again
        p = float(max_per_input(self.guard.probability(X, pieces), owner, 1)[0])
        return p, (time.perf_counter() - t0) * 1000.0

    def refused(self, enc: Encoded, p: float, guard_ms: float) -> Prefill:
        """The prefill of a conversation the guard blocked before it: nothing runs, the reply is the refusal."""
        self.prefills += 1
        return Prefill(enc.n_tokens, p, True, guard_ms)

    def prefill(self, conversation: list[dict] | Encoded, chunk_tokens: int | None = None) -> Prefill:
        """The guard's verdict on the conversation (normalised messages, or :meth:`encode` of them) and, unless
        it is blocked, the forward pass over it with a KV cache (see the module docstring); ``chunk_tokens``: in
        chunks of at most that many tokens (:meth:`prefill_steps`)."""
        pre = None
        for pre in self.prefill_steps(conversation, chunk_tokens):
            pass
        return pre

    @torch.no_grad()
    def prefill_steps(self, conversation: list[dict] | Encoded, chunk_tokens: int | None = None,
                      verdict: tuple[float, float] | None = None,
                      pieces: Sequence | None = None) -> Iterator[Prefill | None]:
        """:meth:`prefill` one model call at a time, so a server can run each step as a turn of its own: yields
        None after each step but the last, then the :class:`Prefill`.

        The prompt is fed in chunks of at most ``chunk_tokens`` tokens (None: at once), the KV cache carried from
        chunk to chunk; the logits and the cache are those of one pass (to float rounding). ``verdict``: the
        guard's (probability, milliseconds), read beforehand (a server reads the pieces in slices); None: read
        here, inside the prefill's own pass when :meth:`reads_in_prefill`, else all pieces in one step first
        (``pieces``: :meth:`guard_pieces` of the conversation, when already made). In block mode a flagged verdict
        ends it at once: nothing more runs."""
        enc = conversation if isinstance(conversation, Encoded) else self.encode(conversation)
        if self.mode != "off" and verdict is None:
            pieces = self.guard_pieces(enc) if pieces is None else pieces
            if self.reads_in_prefill(enc, pieces, chunk_tokens):
                self.prefills += 1
                yield self._guarded_forward(enc, pieces[0])  # the prefill is the guard's one piece
                return
            verdict = self.read_guard(pieces)
            yield None
        p, guard_ms = (None, 0.0) if self.mode == "off" else verdict
        if self.mode == "block" and _flags(p, self.guard.threshold):
            yield self.refused(enc, p, guard_ms)
            return
        self.prefills += 1
        yield from self._forward_chunks(enc, p, guard_ms, chunk_tokens)

    def _forward_chunks(self, enc: Encoded, p: float | None, guard_ms: float,
                        chunk_tokens: int | None) -> Iterator[Prefill | None]:
        ids, n = enc.ids.to(self.lm.device), enc.n_tokens
        size = n if chunk_tokens is None else max(1, int(chunk_tokens))
        past = None
        for a in range(0, n, size):
            cache = {} if past is None else {self._cache_arg: past}
            out = self.lm.model(input_ids=ids[:, a:a + size], use_cache=True, logits_to_keep=1, **cache)
            past = kv_cache(out)
            if a + size < n:
                yield None
        yield Prefill(n, p, False, guard_ms, out.logits[0, -1], past)

    def _guarded_forward(self, enc: Encoded, piece) -> Prefill:
        """The prefill with the guard's hooks: pool the piece's span as the reader does, score at the deepest
        safety-neuron layer, and in block mode stop there when flagged."""
        g, plan = self.guard, self.guard.reader.plan
        deepest, mean = plan.layers[-1], g.pooling == "mean"
        pooled: dict[int, torch.Tensor] = {}
        verdict = {"p": float("nan"), "s": 0.0}

        def read(layer: int, t: torch.Tensor) -> None:
            t0 = time.perf_counter()
            idx = plan.index[layer]
            rows = t[:, piece.start:piece.end] if mean else t[:, len(piece.ids) - 1:]
            rows = rows if idx is None else rows.index_select(-1, idx.to(t.device))
            pooled[layer] = rows.float().sum(1) / rows.shape[1]
            if layer == deepest:
                x = torch.cat([pooled[i].to(t.device) for i in plan.layers], -1)
                verdict["p"] = float(g.probability(x.cpu().numpy(), [piece])[0])
            verdict["s"] += time.perf_counter() - t0
            if layer == deepest and self.mode == "block" and _flags(verdict["p"], g.threshold):
                raise EarlyExit  # stop the prefill here: later layers and the LM head never run

        try:
            with attached_hooks(self.lm.model, g.hook_point, read, plan.layers):
                out = self.lm.model(input_ids=enc.ids.to(self.lm.device), use_cache=True, logits_to_keep=1)
        except EarlyExit:
            return Prefill(enc.n_tokens, verdict["p"], True, verdict["s"] * 1000.0)
        return Prefill(enc.n_tokens, verdict["p"], False, verdict["s"] * 1000.0, out.logits[0, -1], kv_cache(out))

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
            cut = _first_stop(text, settings.stop, sent)
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
            logits, past = out.logits[0, -1], kv_cache(out)
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
