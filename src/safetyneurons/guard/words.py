"""Words beside the neurons: a guard that also reads the text of every piece it scores.

A guard exported with words (guard.json ``words``) scores each piece it reads (the whole message, its windows, its
sentences; :mod:`safetyneurons.activations.reader`) by the sum of two standardised logits::

    p = sigmoid((text_logit - text_mean) / text_std + (neuron_logit - neuron_mean) / neuron_std)

``text_logit``: a TF-IDF probe (:class:`~safetyneurons.probes.probe.TextProbe`) on the piece's text, decoded from
the tokens the model reads; ``neuron_logit``: the guard's probe on the piece's safety-neuron activations. Both are
standardised on the training split, so neither dominates by scale. The sum is the ``safety+text`` variant of the
readout comparison (:mod:`safetyneurons.probes.readouts`); the rule that says when a guard should have words is in
docs/guard_quality.md. The TF-IDF probe lives in ``words.json`` / ``words.safetensors``, hashed in guard.json
like every other file. With guard.json's ``piece_margin`` (:func:`piece_probability`) a piece that is not a whole
message (a window, a sentence) has the margin taken from that sum before the most unsafe piece is taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from safetyneurons.checks import check_piece_margin
from safetyneurons.errors import UserError
from safetyneurons.probes.probe import TextProbe, write_probe_files
from safetyneurons.probes.readout_probes import sigmoid

STEM = "words"  # words.json / words.safetensors in the guard directory
COMBINE = "sigmoid((text_logit - text_mean) / text_std + (neuron_logit - neuron_mean) / neuron_std)"
_KEYS = ("text_mean", "text_std", "neuron_mean", "neuron_std")


@dataclass
class Words:
    """The TF-IDF probe and the training split's mean and standard deviation of both logits."""

    text: TextProbe
    text_mean: float
    text_std: float
    neuron_mean: float
    neuron_std: float

    @classmethod
    def fit(cls, texts: Sequence[str], y: Any, neuron_logit: Any, seed: int = 0,
            stop_words: str | None = None) -> "Words":
        """The TF-IDF probe trained on the training ``texts`` (labels ``y``), standardised with its logits on them
        and the guard probe's logits ``neuron_logit`` on the same texts; ``stop_words="english"`` reads content
        words only (:class:`~safetyneurons.probes.probe.TextProbe`)."""
        texts = list(texts)
        neuron_logit = np.asarray(neuron_logit, dtype=np.float64)
        if len(neuron_logit) != len(texts):
            raise UserError(f"Words need one neuron logit per training text: {len(neuron_logit)} for {len(texts)}.")
        if not np.all(np.isfinite(neuron_logit)):
            raise UserError("The guard probe gives a logit that is not a finite number on the training split; "
                            "words cannot be standardised against it. Retrain the probe.")
        text = TextProbe(seed=seed, cv=0, stop_words=stop_words).fit(texts, y)
        d = text.decision_function(texts)
        return cls(text, float(d.mean()), _spread(d), float(neuron_logit.mean()), _spread(neuron_logit))

    def logit(self, neuron_logit: Any, texts: Sequence[str]) -> np.ndarray:
        """The summed standardised logit of pieces from their neuron logits and texts, float64 ``[n]``."""
        neuron_logit = np.asarray(neuron_logit, dtype=np.float64).reshape(-1)
        if len(texts) != len(neuron_logit):
            raise UserError(f"Words need the text of every piece: {len(texts)} texts for {len(neuron_logit)} pieces.")
        return (self.text.decision_function(list(texts)) - self.text_mean) / self.text_std \
            + (neuron_logit - self.neuron_mean) / self.neuron_std

    def probability(self, neuron_logit: Any, texts: Sequence[str]) -> np.ndarray:
        """Unsafe probability of pieces from their neuron logits and texts, float64 ``[n]`` (NaN stays NaN)."""
        return sigmoid(self.logit(neuron_logit, texts))

    def describe(self) -> dict:
        """guard.json's ``words``: how the two logits combine and the standardisation."""
        return {"combine": COMBINE, "files": [f"{STEM}.json", f"{STEM}.safetensors"],
                "text_probe": self.text.classifier, "vocabulary": len(self.text.vocabulary),
                **{k: float(getattr(self, k)) for k in _KEYS}}

    def save(self, directory: str | Path) -> None:
        write_probe_files(Path(directory), self.text.to_json(), self.text.arrays, stem=STEM)

    @classmethod
    def load(cls, directory: str | Path, meta: Any) -> "Words":
        """The words of a guard directory, as its guard.json's ``words`` (``meta``) describes them."""
        where = Path(directory)
        if not isinstance(meta, dict) or meta.get("combine") != COMBINE:
            raise UserError(f"{where}: guard.json's 'words' is not one this version reads; re-export the guard.")
        values = {k: meta.get(k) for k in _KEYS}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in values.values()) or values["text_std"] <= 0 or values["neuron_std"] <= 0:
            raise UserError(f"{where}: guard.json's 'words' needs finite {', '.join(_KEYS)} (spreads above 0); "
                            f"re-export the guard.")
        try:
            text = TextProbe.load(where, stem=STEM)
            arrays = text.arrays
            n = len(text.vocabulary)
            if n != meta.get("vocabulary") or any(arrays[k].shape != (n,) for k in ("idf", "coef")) \
                    or arrays["intercept"].shape != (1,) \
                    or not all(np.all(np.isfinite(arrays[k])) for k in ("idf", "coef", "intercept")):
                raise ValueError("the vocabulary and the arrays do not match")
            text.decision_function([""])  # the vectoriser rebuilds from what was saved
        except (UserError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where}: the guard's words ({STEM}.json / {STEM}.safetensors) cannot be read "
                            f"({type(e).__name__}: {e}); re-export the guard.") from None
        return cls(text, **{k: float(v) for k, v in values.items()})


def _spread(x: np.ndarray) -> float:
    """The standard deviation that standardises ``x``: 1 when ``x`` is (to rounding) constant."""
    sd = float(np.std(x))
    return sd if sd > 1e-9 * max(1.0, float(np.abs(np.mean(x)))) else 1.0


def piece_probability(probe: Any, words: Words | None, features: Any, texts: Sequence[str] | None,
                      whole: Any = None, margin: float = 0.0) -> np.ndarray:
    """Unsafe probability of pieces, float64 ``[n]``: ``probe`` on their features, or with ``words`` the sum with
    the TF-IDF logit of their ``texts`` (then required). With a piece ``margin`` (guard.json's ``piece_margin``,
    docs/guard_quality.md) a piece that is not a whole message (``whole``: bool ``[n]``, the reader's
    :attr:`Piece.whole <safetyneurons.activations.reader.Piece.whole>`) loses ``margin`` from its logit, so a
    window or a sentence flags alone only when it is that much more unsafe. Every path that scores a guard's pieces
    goes through here (the readout comparison through its two parts, :func:`piece_logit` and
    :func:`less_margin`)."""
    margin = check_piece_margin(margin)
    if words is None and not margin:
        return np.asarray(probe.unsafe_probability(features), dtype=np.float64)
    return sigmoid(less_margin(piece_logit(probe, words, features, texts), whole, margin))


def piece_logit(probe: Any, words: Words | None, features: Any, texts: Sequence[str] | None) -> np.ndarray:
    """The logit of each piece before any margin, float64 ``[n]``: the probe's (its Platt map on the decision
    value), or with ``words`` the summed standardised logit (``texts`` then required)."""
    if words is None:
        a, b = probe.platt
        return a * np.asarray(probe.decision_function(features), dtype=np.float64) + b
    if texts is None:
        raise UserError("This guard reads the words of every piece too; give the pieces with their features.")
    return words.logit(probe.decision_function(features), texts)


def less_margin(logit: np.ndarray, whole: Any, margin: float) -> np.ndarray:
    """``logit`` with ``margin`` taken from every piece that is not a whole message (``whole``: bool ``[n]``)."""
    if not margin:
        return logit
    if whole is None or len(whole) != len(logit):
        raise UserError("A piece margin needs to know which pieces are whole messages; give the pieces.")
    return logit - margin * ~np.asarray(whole, dtype=bool)
