"""The guard: score a prompt as unsafe before the LLM answers, from its safety neurons only.

A guard is a directory that anyone can load without running foreign code (no pickle anywhere)::

    guard.json            what the guard reads and how: model ref + sha256 fingerprint, hook point,
                          pooling, token limit, the neuron set, feature-set name, classifier, threshold
                          (and how it was chosen), test metrics, data hashes, library versions, the sha256
                          of every other file, and ``integrity``: the sha256 of guard.json's own canonical
                          content (sorted keys, no whitespace) without the ``integrity`` field.
    probe.json            the probe's settings (:class:`safetyneurons.probes.probe.Probe`)
    probe.safetensors     the probe's arrays (scaler, SVM support vectors / LR weights, ...)
    categories.json       optional category heads on the same neurons (:mod:`safetyneurons.probes.categories`)
    categories.safetensors
    words.json            optional words: a TF-IDF probe on each piece's text, its logit summed with the probe's
    words.safetensors     (:mod:`safetyneurons.guard.words`; guard.json's ``words``)

Loading (:meth:`Guard.load`) refuses, with a :class:`~safetyneurons.errors.UserError`, a guard whose
guard.json was edited (integrity hash), whose other files changed, went missing or were added (file
hashes), whose probe does not read the neuron set's number of features (shapes), or whose model weights
differ from the ones it was trained on (model fingerprint). The hashes catch corruption and edits; to
know a guard is *the* guard you meant (authenticity), pin its id (the integrity hash, shown by
``safetyneurons guard`` and ``GET /v1/guard``) with ``expected_sha256`` / ``--guard-sha256``.

An input (a prompt, or a conversation whose every message is read) is read by the activation reader
(:mod:`safetyneurons.activations.reader`): each message whole when it fits the token limit and, when it holds more
than 32 content tokens, also in 32-token windows and, when guard.json's ``reading`` says so, sentence by sentence,
each piece with the chat template; its score is its most unsafe piece (a piece that is not a whole message less
guard.json's ``piece_margin`` in the logit), and a score that is not a finite number flags. Nothing is silently cut
off.

Scoring runs the decoder only up to the deepest layer holding a safety neuron (early exit: later layers and the
LM head never run), pools the safety neurons' activations and applies the probe (with words, also to each piece's
text). The thresholds are the guard's
operating points (:mod:`safetyneurons.guard.calibrate`): ``strict`` (the default) and ``loose``, set on the
validation split read as the guard reads it; a guard exported without a validation split has its probe's threshold
(the rule guard.json records). A caller may pick a stricter point, never a looser one.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from safetyneurons._io import sha256_json
from safetyneurons.guard.calibrate import DEFAULT_POINT, check_operating_point
from safetyneurons.guard.artifact import (GUARD_FILE, GUARD_FORMAT, check_model_ref, check_probe_arrays,  # noqa: F401
                                          check_model_identity, content_sha256, export_guard, export_run_guard, neuron_set_from_meta,
                                          public_metadata, read_guard_meta)
from safetyneurons.checks import check_batch_size, check_max_length, check_piece_margin, check_threshold
from safetyneurons.probes.categories import CategoryHeads, moderation_categories
from safetyneurons.errors import UserError
from safetyneurons.activations.features import FeatureSpec
from safetyneurons.model.hooks import hook_width, num_layers
from safetyneurons.neurons.selection import NeuronSet, check_neuron_set_matches
from safetyneurons.model.pair import LoadedModel, load_model
from safetyneurons.probes.probe import Probe
from safetyneurons.activations.reader import ActivationReader, Piece, max_per_input, reading_options
from safetyneurons.guard.words import Words, piece_probability


__all__ = ["GUARD_FILE", "GUARD_FORMAT", "Guard", "GuardResult", "content_sha256", "export_guard",
           "export_run_guard", "public_metadata", "read_guard_meta"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardResult:
    """The guard's verdict on one prompt."""

    unsafe_probability: float
    flagged: bool
    categories: dict | None = None  # moderation schema: {"unsafe": bool, hazard: bool, ...} with category heads
    category_scores: dict | None = None  # {"unsafe": p, hazard: p * P(hazard | harmful), ...}

    def to_dict(self) -> dict:
        out = {"unsafe_probability": self.unsafe_probability, "flagged": self.flagged}
        if self.categories is not None:
            out.update(categories=self.categories, category_scores=self.category_scores)
        return out


# -------------------------------------------------------------------------------------------- guard
class Guard:
    """A loaded guard: a model (run up to the deepest safety neuron) plus a probe on the safety neurons."""

    def __init__(self, path: Path, meta: dict, lm: LoadedModel, probe: Probe, neuron_set: NeuronSet | None,
                 threshold: float, batch_size: int = 16, category_heads: CategoryHeads | None = None,
                 words: Words | None = None):
        self.path = Path(path)
        self.category_heads = category_heads
        self.words = words
        self.meta = meta
        self.lm = lm
        self.probe = probe
        self.neuron_set = neuron_set
        spec = FeatureSpec.from_meta(meta, source=str(self.path / GUARD_FILE), neuron_set=neuron_set)
        self.hook_point: str = spec.hook_point
        self.pooling: str = spec.pooling
        self.max_length: int | None = spec.max_length
        self.threshold = check_threshold(threshold)
        # what a window or a sentence must beat a whole message by, in the logit, to decide alone (guard.json's
        # piece_margin, set with the thresholds; 0 for a guard that records none); no caller changes it
        self.piece_margin: float = check_piece_margin(meta.get("piece_margin", 0.0))
        self.batch_size = check_batch_size(batch_size)
        self.operating_point: str | None = DEFAULT_POINT  # the operator's (None: an explicit threshold)
        self._reader: tuple[tuple, ActivationReader] | None = None

    @property
    def reader(self) -> ActivationReader:
        """The activation reader of what the guard reads now: whole, in windows (every part of a long input is
        read) and, for a guard whose guard.json records it, sentence by sentence (``reading``)."""
        key = (self.hook_point, self.pooling, self.max_length, id(self.neuron_set), self.batch_size, id(self.lm))
        if self._reader is None or self._reader[0] != key:
            self._reader = (key, ActivationReader(self.lm, self.spec, batch_size=self.batch_size,
                                                  **reading_options(self.meta.get("reading"))))
        return self._reader[1]

    @property
    def spec(self) -> FeatureSpec:
        """What the guard reads (from its current hook point, pooling, max length and neuron set)."""
        return FeatureSpec(self.hook_point, self.pooling, self.max_length, self.neuron_set,
                           model=self.meta.get("model") or {})

    # ---- identity
    @property
    def id(self) -> str:
        """The guard's content hash (sha256 of guard.json's canonical content); pin it to detect swaps."""
        return self.meta["integrity"]["content_sha256"]

    @property
    def name(self) -> str:
        return f"safetyneurons-guard-{self.id[:12]}"

    @property
    def thresholds(self) -> dict[str, float]:
        """Threshold of each operating point calibrated on validation (``strict``, ``loose``); a guard without
        them has its one threshold as ``strict``. The threshold in use is :attr:`threshold`."""
        points = ((self.meta.get("calibration") or {}).get("operating_points") or {})
        out = {name: float(fig["threshold"]) for name, fig in points.items()}
        return out or {DEFAULT_POINT: self.default_threshold}

    def threshold_for(self, operating_point: str | None) -> float:
        """The threshold a caller gets: the one in use, or that of a stricter operating point it asks for
        (never a looser one; UserError)."""
        if operating_point is None:
            return self.threshold
        point = check_operating_point(operating_point, DEFAULT_POINT if self.operating_point not in self.thresholds
                                      else self.operating_point, self.thresholds)
        return min(self.thresholds[point], self.threshold)

    @property
    def default_threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def layers_run(self) -> int:
        """Decoder layers a scoring pass runs (deepest safety-neuron layer + 1, or all without a set)."""
        if self.neuron_set is not None:
            return self.neuron_set.deepest_layer + 1
        return int(self.lm.info["num_layers"])

    # ---- loading
    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", *, lm: LoadedModel | None = None,
             threshold: float | None = None, model_ref: str | None = None, dtype: str = "float32",
             operating_point: str | None = None,
             batch_size: int = 16, expected_sha256: str | None = None,
             verify_model: bool = True) -> "Guard":
        """Load and verify a guard directory.

        The model is loaded with :func:`safetyneurons.model.pair.load_model` from the ref guard.json records
        (``model_ref`` overrides the ref, e.g. when the model lives elsewhere on this machine), unless an
        already-loaded ``lm`` is passed. Either way its weights' sha256 must match the guard's; an ``lm``
        without a fingerprint (built in memory) is accepted only with ``verify_model=False``.
        ``threshold`` overrides the guard's default threshold (a probability in [0, 1]).
        """
        path = Path(path)
        meta = read_guard_meta(path, expected_sha256=expected_sha256)
        if lm is None and isinstance(meta.get("model"), dict) and isinstance(meta["model"].get("ref"), str):
            check_model_ref(model_ref or meta["model"]["ref"], path, from_guard=model_ref is None)
        try:
            check_max_length(meta["max_length"])
            spec = FeatureSpec.from_meta(meta, source=str(path / GUARD_FILE), neuron_set=neuron_set_from_meta(meta, path))
            want_fp = meta["model"]["sha256"]
            ref = model_ref or meta["model"]["ref"]
            n_features = int(meta["n_features"])
            default_threshold = check_threshold(meta["threshold"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path / GUARD_FILE}: malformed guard ({type(e).__name__}: {e}). Re-export it.") from None
        try:
            check_piece_margin(meta.get("piece_margin", 0.0))
        except UserError as e:
            raise UserError(f"{path / GUARD_FILE}: {e} Re-export the guard.") from None
        ns = spec.neuron_set

        probe = Probe.load(path)
        if probe.classifier != meta.get("classifier"):
            raise UserError(f"{path}: guard.json says classifier {meta.get('classifier')!r} but the probe is "
                            f"{probe.classifier!r}. Re-export the guard.")
        if probe.n_features != n_features or (ns is not None and len(ns) != n_features):
            raise UserError(f"{path}: shape mismatch: guard.json expects {n_features} features"
                            f"{f', the neuron set holds {len(ns)}' if ns is not None else ''}, the probe reads "
                            f"{probe.n_features}. Re-export the guard.")
        check_probe_arrays(probe, path)
        heads = None
        if meta.get("categories"):
            heads = CategoryHeads.load(path)  # its files' sha256 were checked above
            if heads.n_features != n_features or heads.names != list(meta["categories"].get("names", [])):
                raise UserError(f"{path}: the category heads do not match guard.json (features or names). "
                                f"Re-export the guard.")

        words = Words.load(path, meta["words"]) if meta.get("words") is not None else None  # files checked above

        want_tok = meta["model"].get("tokenizer_sha256") or ""
        if lm is None:
            # the weights and tokenizer hashes are checked on the local files before the model is loaded
            lm = load_model(ref, dtype=dtype, device=device,
                            expected={"sha256": want_fp, "tokenizer_sha256": want_tok} if verify_model else None)
        have_fp = check_model_identity(lm, meta, path) if verify_model else ""
        n_layers, width = num_layers(lm.model), hook_width(lm.model, meta["hook_point"])
        if ns is not None:
            check_neuron_set_matches(ns, hook_point=meta["hook_point"], num_layers=n_layers, width=width,
                                     fingerprint=have_fp, what="model")
        elif n_features != n_layers * width:
            raise UserError(f"Shape mismatch: the guard reads every neuron at {meta['hook_point']} "
                            f"({n_features} features) but the model has {n_layers} x {width} = {n_layers * width}. "
                            f"Use the guard's own model.")
        g = cls(path, meta, lm, probe, ns, default_threshold, batch_size=batch_size, category_heads=heads,
                words=words)
        if operating_point is not None:
            g.operating_point = check_operating_point(operating_point, operating_point, g.thresholds)
            g.threshold = g.thresholds[g.operating_point]
        if threshold is not None:
            g.threshold = check_threshold(threshold)
            g.operating_point = None  # an explicit threshold, not a calibrated point
        return g

    # ---- scoring
    def features(self, prompts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Pooled safety-neuron activations ``[n, d]``, one row per prompt read whole (a prompt over the token
        limit: its head), as an activation store holds them; :meth:`score` reads windows too."""
        return ActivationReader(self.lm, self.spec, batch_size=self.batch_size).features(prompts, progress=progress)

    def read_cost(self, inputs: Sequence[Any] | str) -> list[int]:
        """Tokens the guard's forward passes read for each input, over all its pieces (tokenisation only)."""
        return self.reader.cost(_check_inputs(inputs))

    def unsafe_probability(self, inputs: Sequence[Any] | str, progress: bool = False) -> np.ndarray:
        """Probability that each input (a prompt, or a conversation) is unsafe, float64 ``[n]``: its most
        unsafe piece (:mod:`safetyneurons.activations.reader`); NaN when the probe gives one."""
        inputs = _check_inputs(inputs)
        if not inputs:
            return np.zeros(0, dtype=np.float64)
        p_piece, _, owner = self._read(inputs, progress)
        return max_per_input(p_piece, owner, len(inputs))

    def _read(self, inputs: list[Any], progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every piece of ``inputs`` read: (its unsafe probability, its features, the input it belongs to)."""
        pieces = self.reader.pieces(inputs)
        X, owner = self.reader.read_pieces(pieces, progress)
        return self.probability(X, pieces), X, owner

    def probability(self, features: np.ndarray, pieces: Sequence[Piece] | None = None) -> np.ndarray:
        """Unsafe probability of pieces from their pooled features ``[n, d]`` (as :meth:`ActivationReader.read_pieces
        <safetyneurons.activations.reader.ActivationReader.read_pieces>` gives them), float64 ``[n]``: the probe's,
        or with words (:mod:`safetyneurons.guard.words`) the sum with the TF-IDF logit of each piece's text, for
        which ``pieces`` (the reader's, in the same order) are needed. A piece that is not a whole message loses the
        guard's :attr:`piece_margin` from its logit (a guard with a margin needs ``pieces`` too)."""
        texts = self.reader.piece_texts(pieces) if self.words is not None and pieces is not None else None
        whole = None if pieces is None else [p.whole for p in pieces]
        return piece_probability(self.probe, self.words, features, texts, whole, self.piece_margin)

    def score(self, inputs: Sequence[Any] | str, threshold: float | None = None,
              progress: bool = False, operating_point: str | None = None) -> list[GuardResult]:
        """Score inputs in batches: ``GuardResult(unsafe_probability, flagged)`` per input, in order.

        An input is a prompt (str, one user message) or a conversation (a list of ``{"role", "content"}``
        messages, every one of them read). Flagged means ``unsafe_probability >= threshold`` (default: the
        guard's threshold, or that of a stricter ``operating_point``), or a probability that is not a finite number
        (fail closed).
        """
        t = self.threshold_for(operating_point) if threshold is None else check_threshold(threshold)
        inputs = _check_inputs(inputs)
        if not inputs:
            return []
        p_piece, X, owner = self._read(inputs, progress)
        return [self.result(float(p_piece[b]), X[b], t) for b in _best_piece(p_piece, owner, len(inputs))]

    def result(self, p: float, x: np.ndarray, threshold: float | None = None) -> GuardResult:
        """An input's verdict from its most unsafe piece: probability ``p`` and that piece's features ``x``
        (for the category heads). Flagged at or over ``threshold`` (default: the one in use) or when ``p`` is not
        a finite number."""
        t = self.threshold if threshold is None else threshold
        flagged = bool(not np.isfinite(p) or p >= t)
        if self.category_heads is None:
            return GuardResult(float(p), flagged)
        row = self.category_heads.head_probabilities(np.asarray(x)[None, :])[0]
        cats, scores = moderation_categories(float(p), flagged, self.category_heads.names, row)
        return GuardResult(float(p), flagged, cats, scores)

    # ---- description
    def metadata(self) -> dict:
        """guard.json with the neuron list summarised, plus the threshold in use (for GET /v1/guard)."""
        meta = copy.deepcopy(self.meta)
        ns = meta.pop("neuron_set", None)
        if self.neuron_set is not None:
            meta["neuron_set"] = {"count": len(self.neuron_set), "hook_point": self.neuron_set.hook_point,
                                  "num_layers": self.neuron_set.num_layers, "width": self.neuron_set.width,
                                  "deepest_layer": self.neuron_set.deepest_layer,
                                  "per_layer_counts": self.neuron_set.per_layer_counts().tolist(),
                                  "sha256": sha256_json(ns), "settings": self.neuron_set.settings}
        else:
            meta["neuron_set"] = None
        meta["id"] = self.id
        meta["name"] = self.name
        meta["threshold_in_use"] = self.threshold
        meta["operating_point"] = self.operating_point
        meta["thresholds"] = self.thresholds
        meta["layers_run"] = self.layers_run
        meta["num_layers"] = int(self.lm.info["num_layers"])
        return meta


def _check_inputs(inputs: Any) -> list[Any]:
    """A prompt, or a list of prompts and conversations (checked item by item by the reader)."""
    if isinstance(inputs, str):
        return [inputs]
    if not isinstance(inputs, (list, tuple)):
        raise UserError(f"Prompts must be a string or a list of strings or conversations, got {type(inputs).__name__}.")
    return list(inputs)


def _best_piece(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Row index of each input's most unsafe piece (a NaN piece counts as the most unsafe; first on ties)."""
    v = np.where(np.isnan(values), np.inf, values)
    order = np.lexsort((-v, owner))
    first = np.ones(len(order), dtype=bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    return order[first]
