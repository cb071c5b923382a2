"""The activation reader: the one path from text to pooled safety-neuron features.

Every part that turns text into a probe's input reads it here: activation stores (:func:`~safetyneurons.
activations.store.extract`), the guard (:meth:`~safetyneurons.guard.guard.Guard.score`, every HTTP route), the
guarded chat's prefill, the layer budget and a probe's live features. So the same text gets the same features,
whichever way it comes in. :class:`ActivationReader` owns each step:

1. **Normalisation**: every message's text in the form training data is stored in
   (:func:`safetyneurons.checks.normalise_text`: NFKC, no zero-width or other format characters, trimmed).
2. **Chat formatting and one tokenisation per text** (:class:`safetyneurons.model.positions.ChatTemplate`):
   template markers inside a message are read as plain text, never as control tokens.
3. **Pieces**: what the model reads for an input. An input is a prompt (one user message) or a conversation
   (every message, whatever its role, is read as a user message in its own template; the conversation's
   verdict is its most unsafe piece). A message that fits in ``max_length`` tokens is one piece, read whole.
   With ``windows`` (the guard) a message whose content is longer than ``window_tokens`` (32) tokens is also
   read in overlapping windows of that many content tokens (stride half a window), each with the chat template
   around it, so a request hidden inside benign text fills a good part of some window instead of being averaged
   away by mean pooling, at any length; a message over the limit is read in windows only. With ``sentences``
   too (guards that record it, :data:`GUARD_READING`), a message of several sentences also reads each sentence
   alone as its own piece (guards that record ``sentence_min_words`` above 1 widen a shorter sentence with its
   neighbouring words; :func:`sentences`), so a request written as its own sentence is read alone, whatever
   text surrounds it and wherever the windows fall. Without ``windows`` (activation stores: one vector per
   prompt) a message over the limit is cut to its head that fits.
4. **Hooks with early exit** (:func:`safetyneurons.model.hooks.forward_with_hooks`): only the layers holding
   neurons are hooked and the pass stops after the deepest of them.
5. **Pooling**: the mean over the piece's content tokens (``mean``) or its last token, the end of the
   generation prompt (``last``). :meth:`ActivationReader.read_token_rows` gives the per-token rows instead (the
   content tokens and the template tokens after them), from which any other readout is pooled (the readout
   comparison, :mod:`safetyneurons.probes.readouts`).

Pieces are batched longest first; results come back in input order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from safetyneurons._io import progress_bar
from safetyneurons.activations.features import FeatureSpec
from safetyneurons.activations.writer import HostBatch, to_host
from safetyneurons.checks import check_batch_size, check_positive_int, check_prompts, check_text, normalise_text
from safetyneurons.data.compose import SENTENCE_MIN_WORDS, sentences
from safetyneurons.errors import UserError
from safetyneurons.model.hooks import forward_with_hooks, hook_width, num_layers
from safetyneurons.model.positions import EncodedConversation
from safetyneurons.neurons.selection import check_neuron_set_matches

if TYPE_CHECKING:
    from tqdm import tqdm

    from safetyneurons.model.pair import LoadedModel
    from safetyneurons.neurons.selection import NeuronSet

WINDOW_TOKENS = 32  # content tokens per window (stride: half of it); see the module docstring
MIN_WINDOW_TOKENS = 8  # a limit that leaves fewer content tokens than this next to the template is refused
ROLES = ("system", "user", "assistant", "tool")
#: how a guard exported now reads (recorded in guard.json as ``reading``; a guard without it reads whole and
#: in windows only, as it was calibrated)
GUARD_READING = {"window_tokens": WINDOW_TOKENS, "sentences": True, "sentence_min_words": SENTENCE_MIN_WORDS}


def guard_reading(sentence_min_words: int = SENTENCE_MIN_WORDS) -> dict:
    """:data:`GUARD_READING` with sentence pieces of at least ``sentence_min_words`` words (1: each sentence alone)."""
    return {**GUARD_READING, "sentence_min_words": check_positive_int(sentence_min_words, "sentence_min_words")}


def reading_options(reading: Any) -> dict:
    """:class:`ActivationReader` keywords of a guard's reading (guard.json's ``reading``, e.g.
    :data:`GUARD_READING`): windows, and sentence pieces when it says so; a guard that records none (None) reads
    whole and in windows only."""
    reading = reading if isinstance(reading, dict) else {}
    return {"windows": True, "sentences": bool(reading.get("sentences", False)),
            "window_tokens": check_positive_int(reading.get("window_tokens", WINDOW_TOKENS), "window_tokens"),
            "sentence_min_words": check_positive_int(reading.get("sentence_min_words", SENTENCE_MIN_WORDS),
                                                     "sentence_min_words")}


class LayerPlan(NamedTuple):
    """Which layers to hook and which of their neurons to keep; ``d`` is the feature width."""

    layers: list[int]
    index: dict[int, Any]  # layer -> index tensor, or None for every neuron
    d: int
    num_layers: int
    width: int


def plan_layers(lm: LoadedModel, hook_point: str, neuron_set: NeuronSet | None) -> LayerPlan:
    import torch

    n_layers, width = num_layers(lm.model), hook_width(lm.model, hook_point)
    if neuron_set is None:
        return LayerPlan(list(range(n_layers)), {i: None for i in range(n_layers)}, n_layers * width, n_layers, width)
    check_neuron_set_matches(neuron_set, hook_point=hook_point, num_layers=n_layers, width=width,
                             fingerprint=getattr(lm, "fingerprint", "") or "", what="model")
    device = lm.device
    by_layer = {l: torch.as_tensor(idx, dtype=torch.long, device=device) for l, idx in neuron_set.by_layer().items()}
    return LayerPlan(sorted(by_layer), by_layer, len(neuron_set), n_layers, width)


class TokenRows(NamedTuple):
    """Per-token activations of pieces (:meth:`ActivationReader.read_token_rows`): piece ``i`` owns rows
    ``offsets[i]:offsets[i + 1]``, its first ``content[i]`` rows its content tokens, the rest the template
    tokens after the content; ``owner[i]`` is the input it belongs to."""

    rows: np.ndarray
    offsets: np.ndarray
    content: np.ndarray
    owner: np.ndarray


@dataclass(frozen=True)
class Piece:
    """One sequence the model reads: token ids, the pooled content span ``[start, end)``, the input it belongs to,
    and whether it is a whole message (False: a window or a sentence of one, or the head of a message cut to the
    token limit)."""

    owner: int
    ids: list[int]
    start: int
    end: int
    whole: bool = True

    def encoded(self) -> EncodedConversation:
        return EncodedConversation(self.ids, [(self.start, self.end)])


def as_conversation(item: Any, where: str) -> list[dict]:
    """A prompt (str) or a conversation (list of ``{"role", "content": str}``) as normalised messages."""
    if isinstance(item, str):
        messages = [{"role": "user", "content": item}]
    elif isinstance(item, (list, tuple)) and item and all(isinstance(m, dict) for m in item):
        messages = list(item)
    else:
        raise UserError(f"{where} must be a string or a non-empty list of {{\"role\", \"content\"}} messages.")
    out = []
    for k, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise UserError(f"{where}, message {k}: needs a role ({', '.join(ROLES)}) and text content.")
        check_text(content, f"{where}, message {k}")
        out.append({"role": role, "content": normalise_text(content)})
    if not any(m["content"] for m in out):
        raise UserError(f"{where} has no text to read (empty, or only invisible characters); give some text.")
    return [m for m in out if m["content"]]


class ActivationReader:
    """Reads pooled features of texts with one model, as ``spec`` says (see the module docstring).

    ``windows``: read long messages also in windows of ``window_tokens`` content tokens (the guard); without,
    one piece per prompt (stores). ``sentences`` (with ``windows`` only): each sentence of a message of several
    is also a piece of its own (see :func:`sentences`)."""

    def __init__(self, lm: LoadedModel, spec: FeatureSpec, *, batch_size: int = 16, windows: bool = False,
                 window_tokens: int = WINDOW_TOKENS, sentences: bool = False,
                 sentence_min_words: int = SENTENCE_MIN_WORDS):
        self.lm, self.spec = lm, spec
        self.batch_size = check_batch_size(batch_size)
        self.windows = bool(windows)
        if sentences and not self.windows:
            raise UserError("Sentence pieces belong to the guard's reading; they need windows=True.")
        self.sentences = bool(sentences)
        self.sentence_min_words = check_positive_int(sentence_min_words, "sentence_min_words")
        self.window_tokens = check_positive_int(window_tokens, "window tokens")
        self.plan = plan_layers(lm, spec.hook_point, spec.neuron_set)
        overhead = lm.template.overhead()
        self.room = None if spec.max_length is None else int(spec.max_length) - overhead
        if self.room is not None and self.room < MIN_WINDOW_TOKENS:
            raise UserError(f"The token limit ({spec.max_length}) leaves {max(self.room, 0)} tokens for the prompt "
                            f"next to the chat template's {overhead}; raise --max-length to at least "
                            f"{overhead + MIN_WINDOW_TOKENS}.")

    # ---- what the model reads
    def pieces(self, inputs: Sequence[Any]) -> list[Piece]:
        """The pieces of every input (each message tokenised once), in input order."""
        convs = [as_conversation(x, f"Input {k}") for k, x in enumerate(inputs)]
        flat = [(k, m) for k, conv in enumerate(convs) for m in conv]
        encoded = self.lm.template.encode_prompts([m["content"] for _, m in flat])  # each as a user message
        parts = [self._sentences(m["content"]) for _, m in flat]
        encoded_parts = iter(self.lm.template.encode_prompts([x for p in parts for x in p]))
        out: list[Piece] = []
        for (owner, _), enc, p in zip(flat, encoded, parts):
            out += self._split(owner, enc)
            for part in (next(encoded_parts) for _ in p):
                (a, b), = part.spans
                if self.room is None or b - a <= self.room:  # a longer sentence: the message's windows read it
                    out.append(Piece(owner, part.ids, a, b, whole=False))
        return out

    def _sentences(self, text: str) -> list[str]:
        """The sentence pieces' texts of one message (none when its one sentence is the message itself)."""
        if not self.sentences:
            return []
        found = sentences(text, self.sentence_min_words)
        return found if len(found) > 1 or (found and found[0] != text) else []

    def _split(self, owner: int, enc: EncodedConversation) -> list[Piece]:
        (a, b), = enc.spans
        n = b - a
        fits = self.room is None or n <= self.room
        if not self.windows:
            if not fits:
                enc = self.lm.template.head(enc, self.spec.max_length)
                (a, b), = enc.spans
            return [Piece(owner, enc.ids, a, b, whole=fits)]
        size = self.window_tokens if self.room is None else min(self.window_tokens, self.room)
        out = [Piece(owner, enc.ids, a, b)] if fits else []
        if n > size:
            pre, post = enc.ids[:a], enc.ids[b:]
            for s, e in window_ranges(n, size):
                out.append(Piece(owner, pre + enc.ids[a + s:a + e] + post, len(pre), len(pre) + e - s, whole=False))
        return out

    def piece_texts(self, pieces: Sequence[Piece]) -> list[str]:
        """The text of each piece's content tokens, as the model reads it (decoded; a guard with words reads it)."""
        tok = self.lm.tokenizer
        return [tok.decode(list(p.ids[p.start:p.end])) for p in pieces]

    def cost(self, inputs: Sequence[Any]) -> list[int]:
        """Tokens the forward passes read for each input (over all its pieces); tokenisation only."""
        out = [0] * len(inputs)
        for p in self.pieces(inputs):
            out[p.owner] += len(p.ids)
        return out

    # ---- reading
    def read(self, inputs: Sequence[Any], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Features of every piece, float32 ``[pieces, d]``, and the input each piece belongs to (int64)."""
        return self.read_pieces(self.pieces(inputs), progress)

    def read_pieces(self, pieces: Sequence[Piece], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`read` of pieces already made by :meth:`pieces` (nothing is tokenised again)."""
        with progress_bar(len(pieces), "pooled activations", "piece", progress, smoothing=0.1) as bar:
            feats = assemble(self.batches(pieces, bar), len(pieces), self.plan.d)
        return feats, np.asarray([p.owner for p in pieces], dtype=np.int64)

    def features(self, prompts: Sequence[str], progress: bool = False) -> np.ndarray:
        """One feature row per prompt, float32 ``[n, d]`` (a reader without windows: one piece per prompt)."""
        if self.windows:
            raise UserError("features() gives one row per prompt; read() gives the windows of a windowed reader.")
        feats, owner = self.read(check_prompts(prompts), progress)
        return feats

    def batches(self, pieces: Sequence[Piece], bar: tqdm | None = None) -> list[tuple[np.ndarray, HostBatch]]:
        """``[(piece indices, pooled batch)]`` covering ``pieces``, batched longest first."""
        order = np.argsort(-np.asarray([len(p.ids) for p in pieces], dtype=np.int64), kind="stable")
        out = []
        for start in range(0, len(order), self.batch_size):
            sel = order[start:start + self.batch_size]
            out.append((sel, self._pool([pieces[i] for i in sel])))
            if bar is not None:
                bar.update(len(sel))
        return out

    def read_token_rows(self, pieces: Sequence[Piece], progress: bool = False) -> TokenRows:
        """Per-token activations of every piece's content tokens and the template tokens after them (the
        post-instruction tokens: end of the message, the assistant's generation prompt), one forward pass per
        piece, float16 on the host. Every pooled readout (mean over content, last content token, the
        post-instruction tokens, rolling means of k content tokens) derives from these rows."""
        order = np.argsort(-np.asarray([len(p.ids) for p in pieces], dtype=np.int64), kind="stable")
        chunks: list[np.ndarray | None] = [None] * len(pieces)
        with progress_bar(len(pieces), "token activations", "piece", progress, smoothing=0.1) as bar:
            for start in range(0, len(order), self.batch_size):
                sel = order[start:start + self.batch_size]
                for i, rows in zip(sel, self._token_batch([pieces[i] for i in sel])):
                    chunks[i] = rows
                bar.update(len(sel))
        lengths = np.asarray([len(c) for c in chunks], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        rows = np.concatenate(chunks) if chunks else np.zeros((0, self.plan.d), dtype=np.float16)
        return TokenRows(rows, offsets, np.asarray([p.end - p.start for p in pieces], dtype=np.int64),
                         np.asarray([p.owner for p in pieces], dtype=np.int64))

    def _token_batch(self, pieces: Sequence[Piece]) -> list[np.ndarray]:
        """Rows ``[start, len(ids))`` of each piece (content, then the template after it), float16 on the host."""
        import torch

        from safetyneurons.model.positions import pad_batch

        pad = self.lm.tokenizer.pad_token_id if self.lm.tokenizer.pad_token_id is not None else 0
        enc = pad_batch([p.encoded() for p in pieces], pad, "right")
        out: dict[int, torch.Tensor] = {}
        plan = self.plan

        def callback(layer: int, t: torch.Tensor) -> None:
            idx = plan.index[layer]
            out[layer] = (t if idx is None else t.index_select(-1, idx.to(t.device))).to("cpu", torch.float16)

        forward_with_hooks(self.lm.model, enc["input_ids"], enc["attention_mask"], self.spec.hook_point, callback,
                           layers=plan.layers, early_exit=True)
        full = torch.cat([out[l] for l in plan.layers], dim=2).numpy()
        return [full[k, p.start:len(p.ids)] for k, p in enumerate(pieces)]

    def _pool(self, pieces: Sequence[Piece]) -> HostBatch:
        """Pooled features of one batch, float32 ``[len(pieces), d]``, column blocks in layer order, on their way
        to host memory (the copy does not block on CUDA; see :mod:`safetyneurons.activations.writer`)."""
        import torch

        from safetyneurons.model.positions import pad_batch

        pad = self.lm.tokenizer.pad_token_id if self.lm.tokenizer.pad_token_id is not None else 0
        enc = pad_batch([p.encoded() for p in pieces], pad, "right")
        if self.spec.pooling == "mean" and int(enc["content_mask"].sum(1).min()) == 0:
            raise UserError("A prompt keeps none of its own tokens; remove empty prompts from the data.")
        device = self.lm.device
        mask = (enc["content_mask"] if self.spec.pooling == "mean" else enc["attention_mask"].bool()).to(device)
        counts = mask.sum(1, keepdim=True).float()
        last = torch.as_tensor([len(p.ids) - 1 for p in pieces], device=device)
        rows = torch.arange(len(pieces), device=device)
        pieces_out: dict[int, torch.Tensor] = {}
        plan, mean = self.plan, self.spec.pooling == "mean"

        def callback(layer: int, t: torch.Tensor) -> None:
            idx = plan.index[layer]
            if idx is not None:
                t = t.index_select(-1, idx.to(t.device))  # this layer's neurons only, before any pooling work
            if mean:
                m = mask.to(t.device)
                masked = torch.where(m.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))
                pieces_out[layer] = masked.float().sum(1) / counts.to(t.device)
            else:
                pieces_out[layer] = t[rows.to(t.device), last.to(t.device)].float()

        forward_with_hooks(self.lm.model, enc["input_ids"], enc["attention_mask"], self.spec.hook_point, callback,
                           layers=plan.layers, early_exit=True)
        first = pieces_out[plan.layers[0]].device  # layers may sit on several devices (device_map="auto")
        return to_host(torch.cat([pieces_out[l].to(first) for l in plan.layers], dim=1))


def window_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) of overlapping windows of ``size`` tokens (stride size // 2) covering all n tokens."""
    stride = max(1, size // 2)
    out, a = [], 0
    while True:
        b = min(a + size, n)
        out.append((a, b))
        if b >= n:
            return out
        a += stride


def assemble(batches: list[tuple[np.ndarray, HostBatch]], n: int, d: int) -> np.ndarray:
    """float32 ``[n, d]`` from :meth:`ActivationReader.batches` output (waits for pending device-to-host copies)."""
    feats = np.empty((n, d), dtype=np.float32)
    for sel, batch in batches:
        feats[sel] = batch.numpy()
    return feats


def max_per_input(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """The highest value per input over its pieces (float64 ``[n]``); a NaN piece makes its input NaN."""
    out = np.full(n, -np.inf)
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        np.maximum.at(out, np.asarray(owner, dtype=np.int64), values)  # np.maximum propagates NaN
    if np.isneginf(out).any():
        raise ValueError("every input needs at least one piece")
    return out


def pooled_features(lm: LoadedModel, prompts: Sequence[str], hook_point: str, pooling: str = "mean",
                    neuron_set: NeuronSet | None = None, batch_size: int = 16, max_length: int | None = 256,
                    progress: bool = False) -> np.ndarray:
    """Pooled activations of ``prompts`` (in memory): float32 ``[len(prompts), d]``.

    ``d`` is ``num_layers * width`` (layer-major) without a neuron set, else ``len(neuron_set)`` with columns in
    the set's (layer, index) order. With a neuron set only its layers are hooked and the forward pass stops after
    its deepest layer. A prompt over ``max_length`` tokens is cut to its head that fits (with the template).
    """
    spec = FeatureSpec(hook_point, pooling, max_length, neuron_set, model=lm.describe())
    return ActivationReader(lm, spec, batch_size=batch_size).features(prompts, progress=progress)


def token_counts(lm: LoadedModel, prompts: Sequence[str], max_length: int | None = 256) -> np.ndarray:
    """Tokens each prompt is read with (formatted, cut to ``max_length``): the length baseline's feature."""
    encoded = lm.template.encode_prompts([normalise_text(p) for p in prompts])
    lengths = [len(e) if max_length is None else min(len(e), int(max_length)) for e in encoded]
    return np.asarray(lengths, dtype=np.int64)
