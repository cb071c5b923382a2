"""Training data shaped like what the guard reads: benign windows and compositions, built from training prompts only.

The guard reads a long message whole *and* in 32-token windows (and sentence by sentence), and flags its most
unsafe piece (:mod:`safetyneurons.activations.reader`). In the default training split almost every harmful prompt
is short (median 14 tokens, 1% over 32) while a quarter of the benign ones are longer, so a probe trained on whole
prompts alone can learn length, and has never seen a fragment of benign text. :func:`augment_training` adds,
to the training split only (every piece comes from training prompts, so nothing crosses a split):

- **benign windows**: of each benign prompt longer than 32 tokens, its first and last 32-token window (the
  guard's windows start every 16 tokens; two per prompt keep the classes near balance), cut at the tokenizer's
  token boundaries, labelled benign (a fragment of a benign prompt is benign);
- **benign sentences**: of each benign prompt of several sentences, one of its sentence pieces (:func:`sentences`,
  the pieces a guard that records sentence reading scores alone), drawn with a seeded generator, labelled benign:
  the probe meets short benign fragments, so a benign sentence read alone is not flagged for being short;
- **compositions**: a harmful prompt placed before, inside or after a benign one (labelled harmful: the request
  is there, wherever it sits), and two benign prompts joined (benign), as many of each as ``share`` times the
  harmful prompts, drawn with a seeded generator.

Added records carry ``source`` ``"<source>+window"``, ``"<source>+sentence"`` or ``"<source>+composed"`` and
ids ``<id>#w<k>`` / ``<id>#s<k>`` / ``compose:<k>``, so reports can tell them apart. Nothing here reaches
validation, test or held-out data.
"""

from __future__ import annotations

import bisect
import re
from typing import Any, Sequence

import numpy as np

from safetyneurons.constants import SENTENCE_MIN_WORDS
from safetyneurons.data.records import check_records

WINDOW_TOKENS = 32
# . ! ? ; : the ellipsis, the Devanagari danda and double danda, the Arabic question mark, semicolon and full stop
_END = ".!?;:\u2026\u0964\u0965\u061f\u061b\u06d4"
_WIDE_END = "\u3002\uff01\uff1f\uff1b\uff1a"  # the CJK / full-width ones, written without a space after
_UPPER = "A-Z\u00c0-\u00de\u0391-\u03a9\u0410-\u042f"  # Latin, Greek and Cyrillic capitals
_CLOSE = "\"'\u201d\u2019\u00bb)\\]}*_\u300d\u300f\uff09\u3011"  # closing quotes, brackets, emphasis after an end mark
# a sentence ends at an end mark (and the closing quotes or brackets right after it) with a space after it, or
# with a capital right after it ("fun.Then", not "E.coli" or "example.com"), after a CJK / full-width end mark, or
# at a line break (any of Unicode's)
_SENTENCE_BREAK = re.compile(rf"(?<=[{_END}{_WIDE_END}])([{_CLOSE}]*)\s+|(?<=[{_END}])(?=[{_UPPER}])"
                             rf"|(?<=[{_WIDE_END}])(?=\S)|[\n\r\v\f\u0085\u2028\u2029]+")
# a period after these (or after one capital: an initial) may not end a sentence ("Dr. Smith", "e.g. this"): the text
# is cut there and also read across it
_ABBREVIATIONS = frozenset("dr mr mrs ms prof sr jr st mt vs cf approx inc ltd co gen col capt lt sgt rev fig vol "
                           "ch e.g i.e a.m p.m u.s u.k".split())
_WORD_BEFORE = re.compile(r"([^\s\"'(\[{]+)\.$")


def _ends_sentence(text: str, m: re.Match) -> bool:
    """Whether the break ``m`` surely ends a sentence (not a period after an abbreviation or an initial)."""
    j = m.start()
    if text[j - 1:j] != ".":
        return True
    w = _WORD_BEFORE.search(text, max(0, j - 12), j)
    word = w.group(1) if w else ""
    return not (word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper()))


def _spans(text: str) -> tuple[list[re.Match], list[tuple[int, int]]]:
    """The breaks of ``text`` and the spans read as sentences: the text between two breaks, and across every run
    of breaks that may not end a sentence (after an abbreviation), the sentence they may be part of."""
    breaks = list(_SENTENCE_BREAK.finditer(text))
    cut = [(a, m.start() + len(m.group(1) or "")) for a, m in zip([0] + [m.end() for m in breaks], breaks)]
    spans = cut + [(breaks[-1].end() if breaks else 0, len(text))]  # the closing quotes stay with their sentence
    soft = [not _ends_sentence(text, m) for m in breaks]
    i = 0
    while i < len(spans):
        j = i
        while j < len(soft) and soft[j]:
            j += 1
        if j > i:
            spans.append((spans[i][0], spans[j][1]))
        i = j + 1
    return breaks, spans


def _words(text: str, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of non-space characters, cut at the positions ``cuts`` (sorted: where a
    sentence ends inside a run)."""
    words = []
    for m in re.finditer(r"\S+", text):
        a, b = m.span()
        i = bisect.bisect_right(cuts, a)
        while i < len(cuts) and cuts[i] < b:
            words.append((a, cuts[i]))
            a, i = cuts[i], i + 1
        words.append((a, b))
    return words


def sentence_breaks(text: str) -> int:
    """How many pieces beyond one :func:`sentences` may read of ``text`` (the service's cost estimate)."""
    return len(_spans(text)[1]) - 1


def sentences(text: str, min_words: int = SENTENCE_MIN_WORDS) -> list[str]:
    """One text per sentence of ``text`` (cut after ``. ! ? ; :``, an ellipsis, a danda or an Arabic end mark, and
    the closing quotes or brackets after it, before a space or a capital; after a CJK / full-width end mark; and at
    line breaks; after a known abbreviation or an initial, "Dr. Smith", both cut and read across). A sentence of
    fewer than ``min_words`` words is read with the words right after it (the last sentence: right before it) up
    to ``min_words``, so a short request
    stays the larger part of its piece (with ``min_words`` 1, the guard's default, every sentence is read alone).
    A sentence that the piece before holds whole is not read again, and a piece equal to an earlier one is read
    once (the same text gives the same reading), so the pieces hold at most as many tokens as the text plus one
    template per piece."""
    breaks, bounds = _spans(text)
    words = _words(text, [m.start() for m in breaks if m.start() == m.end()])
    starts, ends = [w[0] for w in words], [w[1] for w in words]
    out: list[str] = []
    seen: set[str] = set()
    covered = -1  # the last word the pieces so far read
    for a, b in bounds:
        first, last = bisect.bisect_left(starts, a), bisect.bisect_right(ends, b) - 1
        if first > last:  # no words
            continue
        if last - first + 1 < min_words:  # extend forwards, then backwards, to min_words words
            if last <= covered:  # read whole by a widened piece before
                continue
            last = min(len(words) - 1, first + min_words - 1)
            first = max(0, last - min_words + 1)
            covered = max(covered, last)
        piece = text[words[first][0]:words[last][1]]
        if piece not in seen:
            seen.add(piece)
            out.append(piece)
    return out


def benign_sentences(records: Sequence[dict], seed: int, per_prompt: int = 1,
                     min_words: int = SENTENCE_MIN_WORDS) -> list[dict]:
    """Up to ``per_prompt`` sentence pieces (:func:`sentences`, as the guard reads them) of each benign prompt of
    several sentences, drawn with a seeded generator, labelled benign."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        if int(r["label"]) != 0:
            continue
        found = sentences(r["prompt"], min_words)
        if len(found) < 2:
            continue
        for k in sorted(rng.choice(len(found), size=min(per_prompt, len(found)), replace=False).tolist()):
            out.append({"id": f"{r['id']}#s{k}", "prompt": found[k], "label": 0,
                        "source": f"{r.get('source', '')}+sentence"})
    return out


def benign_windows(records: Sequence[dict], tokenizer: Any, window_tokens: int = WINDOW_TOKENS) -> list[dict]:
    """The first and the last ``window_tokens``-token window of each benign prompt longer than that."""
    benign = [r for r in records if int(r["label"]) == 0]
    enc = tokenizer([r["prompt"] for r in benign], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for r, offsets in zip(benign, enc["offset_mapping"]):
        n = len(offsets)
        if n <= window_tokens:
            continue
        for k, a in enumerate((0, n - window_tokens)):
            text = r["prompt"][offsets[a][0]:offsets[a + window_tokens - 1][1]].strip()
            if text:
                out.append({"id": f"{r['id']}#w{k}", "prompt": text, "label": 0,
                            "source": f"{r.get('source', '')}+window"})
    return out


def compositions(records: Sequence[dict], share: float, seed: int, max_chars: int = 2000) -> list[dict]:
    """Harmful-in-benign (harmful) and benign+benign (benign) prompts, ``share`` x the harmful count of each."""
    harmful = [r for r in records if int(r["label"]) == 1]
    benign = [r for r in records if int(r["label"]) == 0]
    if not harmful or len(benign) < 2:
        return []
    rng = np.random.default_rng(seed)
    n = int(round(share * len(harmful)))
    out = []
    for k in range(n):
        h = harmful[int(rng.integers(len(harmful)))]
        b1, b2 = (benign[int(i)] for i in rng.choice(len(benign), 2, replace=False))
        text = _place(h["prompt"], b1["prompt"], int(rng.integers(3)))
        if len(text) <= max_chars:
            out.append({"id": f"compose:{2 * k}", "prompt": text, "label": 1,
                        "source": f"{h.get('source', '')}+composed"})
        text = f"{b1['prompt']} {b2['prompt']}"
        if len(text) <= max_chars:
            out.append({"id": f"compose:{2 * k + 1}", "prompt": text, "label": 0,
                        "source": f"{b1.get('source', '')}+composed"})
    return out


def _place(request: str, context: str, where: int) -> str:
    """``request`` before (0), inside (1: at a word boundary near the middle) or after (2) ``context``."""
    if where == 0:
        return f"{request} {context}"
    if where == 2:
        return f"{context} {request}"
    words = context.split()
    mid = len(words) // 2
    return " ".join(words[:mid] + [request] + words[mid:])


def augment_training(records: Sequence[dict], tokenizer: Any, seed: int, share: float = 0.25,
                     window_tokens: int = WINDOW_TOKENS, sentence_min_words: int = SENTENCE_MIN_WORDS) -> list[dict]:
    """``records`` followed by their benign windows, sentence pieces (read as a guard with ``sentence_min_words``
    reads them) and compositions (see the module docstring)."""
    records = check_records(records)
    added = (benign_windows(records, tokenizer, window_tokens)
             + benign_sentences(records, seed, min_words=sentence_min_words)
             + compositions(records, share, seed))
    return records + check_records(added)


def long_benign(records: Sequence[dict], n: int, seed: int, min_chars: int = 800,
                max_chars: int = 2000) -> list[dict]:
    """``n`` long benign prompts, each ordinary benign ``records`` joined until at least ``min_chars`` long
    (and at most ``max_chars``), drawn with a seeded generator; ids ``long:<k>``, source ``<source>+composed``.
    For a split that should hold long benign prompts built from its own records only."""
    benign = [r for r in records if int(r["label"]) == 0]
    if len(benign) < 2 or n <= 0:
        return []
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        parts: list[dict] = []
        text = ""
        for i in rng.permutation(len(benign)):
            candidate = f"{text}\n\n{benign[int(i)]['prompt']}" if text else benign[int(i)]["prompt"]
            if len(candidate) > max_chars:
                continue
            parts.append(benign[int(i)])
            text = candidate
            if len(text) >= min_chars:
                break
        if len(parts) >= 2 and len(text) >= min_chars:
            out.append({"id": f"long:{k}", "prompt": text, "label": 0,
                        "source": f"{parts[0].get('source', '')}+composed"})
    return out
