"""Category heads: which hazard a harmful prompt belongs to, read from the same safety neurons as the guard.

One logistic regression per hazard of :mod:`safetyneurons.data.taxonomy` (one-vs-rest), trained on the harmful
training prompts whose source labels a hazard. A head answers P(hazard | harmful); the guard reports
``category_scores[hazard] = P(unsafe) * P(hazard | harmful)`` next to ``unsafe``, which stays the overall
flag. A hazard with fewer than ``min_examples`` labelled training prompts gets no head, and the skip is
recorded. The heads live inside the guard directory as ``categories.json`` + ``categories.safetensors``
(hashed in guard.json like every other file); no pickle. ``/v1/moderations`` reports the hazards under OpenAI's
category names by one table, :data:`OPENAI_CATEGORIES` (:func:`openai_categories`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from safetyneurons._io import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes
from safetyneurons.errors import UserError
from safetyneurons.data.taxonomy import HAZARDS, describe_taxonomy

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from safetyneurons.neurons.selection import NeuronSet
    from safetyneurons.activations.store import Store

CATEGORIES_FORMAT = "safetyneurons.categories/1"
CATEGORIES_JSON = "categories.json"
CATEGORIES_TENSORS = "categories.safetensors"
DEFAULT_MIN_EXAMPLES = 20


class CategoryHeads:
    """Per-hazard probes on one feature set (the guard's safety neurons)."""

    def __init__(self, names: Sequence[str], mean: np.ndarray, scale: np.ndarray, weights: np.ndarray,
                 bias: np.ndarray, info: dict | None = None):
        self.names = list(names)
        self.mean, self.scale = np.asarray(mean, np.float64), np.asarray(scale, np.float64)
        self.weights, self.bias = np.asarray(weights, np.float64), np.asarray(bias, np.float64)
        self.info = dict(info or {})
        d = self.mean.shape[0]
        if self.scale.shape != (d,) or self.weights.shape != (len(self.names), d) or \
                self.bias.shape != (len(self.names),):
            raise UserError("Category heads: inconsistent array shapes; re-export the guard.")
        unknown = [n for n in self.names if n not in HAZARDS]
        if unknown:
            raise UserError(f"Category heads name unknown hazards {unknown}; known: {', '.join(HAZARDS)}.")

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, X: ArrayLike, hazards: Sequence[str | None], *, min_examples: int = DEFAULT_MIN_EXAMPLES,
            C: float = 0.1, seed: int = 0) -> "CategoryHeads":
        """Fit one head per hazard with at least ``min_examples`` labelled rows. ``X`` [n, d] are features of
        harmful prompts; ``hazards[i]`` is row i's hazard or None (unlabelled rows are not used)."""
        from sklearn.linear_model import LogisticRegression

        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] != len(hazards):
            raise UserError(f"Category heads need one hazard (or None) per feature row: got {X.shape[0]} rows and "
                            f"{len(hazards)} labels.")
        labelled = np.array([h is not None for h in hazards])
        unknown = sorted({h for h in hazards if h is not None and h not in HAZARDS})
        if unknown:
            raise UserError(f"Unknown hazard label(s) {unknown}; use the taxonomy's names: {', '.join(HAZARDS)}.")
        counts = Counter(h for h in hazards if h is not None)
        names = [h for h in HAZARDS if counts.get(h, 0) >= min_examples]
        skipped = {h: int(counts.get(h, 0)) for h in HAZARDS if h not in names}
        if len(names) < 2:
            raise UserError(f"Category heads need at least two hazards with >= {min_examples} labelled harmful "
                            f"training prompts; got counts {dict(counts)}. Add labelled data or lower min_examples.")
        Xl = X[labelled]
        y = np.array([h for h in hazards if h is not None])
        mean = Xl.mean(axis=0)
        scale = Xl.std(axis=0)
        scale[scale < 1e-12] = 1.0
        Z = (Xl - mean) / scale
        W, b = [], []
        for name in names:
            lr = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
            lr.fit(Z, (y == name).astype(np.int64))
            W.append(lr.coef_[0])
            b.append(lr.intercept_[0])
        info = {"min_examples": int(min_examples), "C": float(C), "seed": int(seed),
                "trained_on": {n: int(counts[n]) for n in names}, "n_labelled": int(labelled.sum()),
                "skipped": skipped, "skip_rule": f"fewer than {min_examples} labelled harmful training prompts"}
        return cls(names, mean, scale, np.array(W), np.array(b), info)

    # ---------------------------------------------------------------- scoring
    def head_probabilities(self, X: ArrayLike) -> np.ndarray:
        """P(hazard | harmful) of every head: ``[n, len(names)]``, column ``j`` the hazard ``names[j]``.

        Each head is a one-vs-rest probe, so a row need not sum to 1. (This is not a two-class
        ``predict_proba``: the heads say which hazard, the guard's probe says whether unsafe.)
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise UserError(f"Category heads read {self.n_features} features, got an array of shape {X.shape}.")
        z = ((X - self.mean) / self.scale) @ self.weights.T + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))

    def top1_accuracy(self, X: ArrayLike, hazards: Sequence[str | None]) -> dict:
        """Top-1 accuracy on rows whose hazard has a head (for the report), with counts."""
        keep = [i for i, h in enumerate(hazards) if h in self.names]
        if not keep:
            return {"n": 0, "top1_accuracy": None}
        p = self.head_probabilities(np.asarray(X)[keep])
        pred = [self.names[j] for j in p.argmax(axis=1)]
        truth = [hazards[i] for i in keep]
        return {"n": len(keep), "top1_accuracy": float(np.mean([a == b for a, b in zip(pred, truth)])),
                "per_hazard_n": dict(sorted(Counter(truth).items()))}

    # ---------------------------------------------------------------- files
    def save(self, path_dir: str | os.PathLike) -> Path:
        """Write categories.json + categories.safetensors into an existing directory."""
        from safetensors.numpy import save

        path = Path(path_dir)
        data = save({"mean": self.mean, "scale": self.scale, "weights": np.ascontiguousarray(self.weights),
                     "bias": self.bias}, metadata={"format": CATEGORIES_FORMAT})
        atomic_write_bytes(path / CATEGORIES_TENSORS, data)
        atomic_write_json(path / CATEGORIES_JSON, {
            "format": CATEGORIES_FORMAT, "names": self.names, "n_features": self.n_features,
            "score": "category_scores[hazard] = P(unsafe) * P(hazard | harmful); categories[hazard] is true when "
                     "the prompt is flagged and P(hazard | harmful) >= 0.5",
            "taxonomy": describe_taxonomy(), "arrays_sha256": sha256_bytes(data), **self.info})
        return path

    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> "CategoryHeads":
        from safetensors import SafetensorError
        from safetensors.numpy import load

        path = Path(path_dir)
        obj = read_json(path / CATEGORIES_JSON)
        if not isinstance(obj, dict) or obj.get("format") != CATEGORIES_FORMAT:
            raise UserError(f"{path / CATEGORIES_JSON}: not safetyneurons category heads "
                            f"(expected format {CATEGORIES_FORMAT}).")
        tpath = path / CATEGORIES_TENSORS
        if not tpath.is_file():
            raise UserError(f"{path}: {CATEGORIES_TENSORS} is missing; re-export the guard.")
        data = tpath.read_bytes()
        if sha256_bytes(data) != obj.get("arrays_sha256"):
            raise UserError(f"{tpath}: checksum mismatch (corrupted or edited); re-export the guard.")
        try:
            a = load(data)
            heads = cls(obj["names"], a["mean"], a["scale"], a["weights"], a["bias"],
                        {k: v for k, v in obj.items() if k not in ("format", "names", "arrays_sha256", "n_features",
                                                                   "taxonomy", "score")})
        except (SafetensorError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: category heads cannot be read ({type(e).__name__}: {e}); re-export "
                            f"the guard.") from None
        if heads.n_features != obj.get("n_features"):
            raise UserError(f"{path / CATEGORIES_JSON}: n_features does not match the arrays; re-export the guard.")
        return heads

    def describe(self) -> dict:
        return {"names": self.names, **self.info}


def moderation_categories(unsafe_probability: float, flagged: bool, names: Sequence[str],
                          probs: Sequence[float] | None) -> tuple[dict, dict]:
    """(categories, category_scores) of one prompt in the moderation schema; ``unsafe`` is always there."""
    categories = {"unsafe": bool(flagged)}
    scores = {"unsafe": float(unsafe_probability)}
    if probs is not None:
        for name, p in zip(names, probs):
            categories[name] = bool(flagged and p >= 0.5)
            scores[name] = float(unsafe_probability * p)
    return categories, scores


#: OpenAI's moderation categories (the omni-moderation set) -> the guard's hazards that measure each one. A
#: category answers with its hazards' highest score; one that no hazard of the guard measures (an empty tuple, or
#: hazards without a head in this guard) answers 0.0, false and ``category_applied_input_types`` []. The
#: ``/threatening``, ``/intent``, ``/instructions``, ``/minors`` and ``/graphic`` refinements need a distinction
#: the taxonomy does not make, so no hazard measures them. Documented in docs/guard.md ("OpenAI categories").
OPENAI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "harassment": ("hate",),
    "harassment/threatening": (),
    "hate": ("hate",),
    "hate/threatening": (),
    "illicit": ("nonviolent_crimes",),
    "illicit/violent": ("violent_crimes",),
    "self-harm": ("self_harm",),
    "self-harm/intent": (),
    "self-harm/instructions": (),
    "sexual": ("sexual_content",),
    "sexual/minors": (),
    "violence": ("violent_crimes",),
    "violence/graphic": (),
}
#: hazards that no OpenAI category covers: reported under their own names, next to ``unsafe``
UNMAPPED_HAZARDS: tuple[str, ...] = tuple(h for h in HAZARDS
                                          if not any(h in hs for hs in OPENAI_CATEGORIES.values()))


def openai_categories(flagged: bool, categories: dict | None, scores: dict | None, unsafe_probability: float
                      ) -> tuple[dict, dict, dict]:
    """(categories, category_scores, category_applied_input_types) in OpenAI's moderation shape, from a verdict
    whose ``categories`` / ``category_scores`` name the guard's hazards (as :func:`moderation_categories` gives).

    Every key of :data:`OPENAI_CATEGORIES` is present, then ``unsafe`` (the guard's own verdict), then each
    measured hazard of :data:`UNMAPPED_HAZARDS`. A category is true only when the input is flagged, so the
    categories never say more than ``flagged``, and ``flagged`` stays the guard's verdict whatever they say."""
    categories, scores = dict(categories or {}), dict(scores or {})
    measured = [h for h in HAZARDS if h in scores]
    cats, out, applied = {}, {}, {}
    for key, hazards in OPENAI_CATEGORIES.items():
        have = [h for h in hazards if h in measured]
        out[key] = max((float(scores[h]) for h in have), default=0.0)
        cats[key] = bool(flagged) and any(bool(categories.get(h)) for h in have)
        applied[key] = ["text"] if have else []
    cats["unsafe"], out["unsafe"], applied["unsafe"] = bool(flagged), float(unsafe_probability), ["text"]
    for h in UNMAPPED_HAZARDS:
        if h in measured:
            cats[h], out[h], applied[h] = bool(flagged) and bool(categories.get(h)), float(scores[h]), ["text"]
    return cats, out, applied


def fit_for_store(train_store: Store, records: Sequence[dict], neuron_set: NeuronSet, *,
                  min_examples: int = DEFAULT_MIN_EXAMPLES, seed: int = 0) -> CategoryHeads | None:
    """Heads on ``neuron_set``'s columns of ``train_store``, from the harmful records' ``hazard`` labels
    (matched by id). None when fewer than two hazards have enough examples (the run records why)."""
    hazard = {str(r["id"]): r.get("hazard") for r in records}
    rows = [i for i, (rid, y) in enumerate(zip(train_store.ids, train_store.labels)) if int(y) == 1]
    labels = [hazard.get(str(train_store.ids[i])) for i in rows]
    counts = Counter(h for h in labels if h is not None)
    if sum(n >= min_examples for n in counts.values()) < 2:
        return None
    X = train_store.select(neuron_set)[rows]
    return CategoryHeads.fit(X, labels, min_examples=min_examples, seed=seed)


def evaluate_on_store(heads: CategoryHeads, store: Store, records: Sequence[dict], neuron_set: NeuronSet) -> dict:
    """Top-1 accuracy of the heads on a store's harmful prompts whose hazard has a head."""
    hazard = {str(r["id"]): r.get("hazard") for r in records}
    rows = [i for i, (rid, y) in enumerate(zip(store.ids, store.labels)) if int(y) == 1]
    if not rows:
        return {"n": 0, "top1_accuracy": None}
    return heads.top1_accuracy(store.select(neuron_set)[rows], [hazard.get(str(store.ids[i])) for i in rows])


def render_categories(info: dict | None, evaluation: dict) -> str:
    """Markdown section of the report on the category heads."""
    lines = ["## Category heads", ""]
    if not info:
        return "\n".join(lines + ["No category heads: fewer than two hazards had enough labelled harmful training "
                                  "prompts.", ""])
    lines += ["Per-hazard logistic regressions on the guard's safety neurons (taxonomy: docs/guard.md), trained on "
              "the labelled harmful training prompts:", "",
              "| hazard | training prompts |", "|---|---:|"]
    lines += [f"| {n} | {c} |" for n, c in info["trained_on"].items()]
    if info.get("skipped"):
        lines += ["", "Skipped (" + info["skip_rule"] + "): "
                  + ", ".join(f"{n} ({c})" for n, c in info["skipped"].items()) + "."]
    lines += ["", "| evaluated on | harmful prompts with a labelled hazard | top-1 accuracy |", "|---|---:|---:|"]
    for where, m in evaluation.items():
        acc = "n/a" if m.get("top1_accuracy") is None else f"{m['top1_accuracy']:.3f}"
        lines.append(f"| {where} | {m['n']} | {acc} |")
    return "\n".join(lines) + "\n"
