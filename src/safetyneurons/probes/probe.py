"""Probes: classifiers that read pooled activations (safety neurons and controls) and predict unsafe prompts.

Classifiers (scikit-learn for fitting, standardisation in the pipeline):

- ``svm``: RBF-kernel SVM (the reference student project), ``gamma="scale"``;
- ``logreg``: L2 logistic regression (the paper).

Optionally PCA keeping a share of variance sits between the scaler and the classifier. After fitting,
everything the decision function needs (scaler mean/scale, PCA mean/components, SVM support vectors, dual
coefficients, intercept and gamma, or LR weights) is copied into float64 numpy arrays, and prediction runs
in numpy from those arrays. Saved probes are one ``probe.safetensors`` plus one ``probe.json``, no pickle,
so a loaded probe predicts bit-for-bit like the fitted one.

Probability of unsafe: logistic regression uses its own sigmoid; the SVM a Platt-style sigmoid (a 1-D
logistic regression) fitted on out-of-fold decision values from stratified k-fold cross-validation on the
training split. Default threshold: the Youden-optimal cut (max TPR - FPR) on those cross-validated
training probabilities, taken in the middle of the optimal plateau; 0.5 when the training split is too
small for cross-validation.

Feature sets are compared on one split, next to their controls and baselines, in
:mod:`safetyneurons.probes.compare`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from safetyneurons._io import atomic_dir, atomic_write_json, read_json, sha256_bytes, versions
from safetyneurons.constants import CLASSIFIERS
from safetyneurons.errors import UserError
from safetyneurons.probes.kernels import pca_fit, rbf
from safetyneurons.activations.features import PROBE_MODEL_KEYS, FeatureSpec

from safetyneurons.neurons.selection import NeuronSet
from safetyneurons.activations.store import Store

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


PROBE_FORMAT = "safetyneurons.probe/2"  # 2: trained on content-only mean pooling (store format 2)
REPORT_FORMAT = "safetyneurons.probe_report/1"
TEXT_CLASSIFIER = "tfidf-logreg"
_CHUNK = 2048


def check_labels(y: np.ndarray, what: str = "training split") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) == 0:
        raise UserError(f"The {what} is empty: a probe needs labelled examples of both classes.")
    if not np.isin(y, (0, 1)).all():
        raise UserError(f"The {what} has labels other than 0 (safe) and 1 (unsafe).")
    if y.min() == y.max():
        only = "unsafe (1)" if y[0] == 1 else "safe (0)"
        raise UserError(f"The {what} holds a single class (all {len(y)} prompts are {only}); a classifier needs "
                        f"both safe and unsafe prompts. Use a split with both labels.")
    return y.astype(np.int64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Cut on ``p`` maximising TPR - FPR; the middle of the optimal plateau of cut points."""
    y = np.asarray(y).astype(bool)
    u = np.unique(np.asarray(p, dtype=np.float64))
    cuts = np.concatenate([[u[0] - 1e-9], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-9]]) if len(u) > 1 else np.array([u[0]])
    pred = p[None, :] >= cuts[:, None]
    tpr = (pred & y).sum(1) / max(y.sum(), 1)
    fpr = (pred & ~y).sum(1) / max((~y).sum(), 1)
    j = tpr - fpr
    best = np.flatnonzero(j >= j.max() - 1e-12)
    return float(cuts[best[len(best) // 2]])


class _Thresholded:
    """Shared probability / threshold / prediction logic."""

    threshold: float
    platt: tuple[float, float]
    arrays: dict[str, np.ndarray]

    def decision_function(self, X: ArrayLike) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_json(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, path_dir: str | os.PathLike) -> Path:
        """Write ``probe.json`` + ``probe.safetensors`` into a new directory (atomically)."""
        return _save(path_dir, self.to_json(), self.arrays)

    def unsafe_probability(self, X: ArrayLike) -> np.ndarray:
        """Probability that each input is unsafe (class 1), shape [n]: ``predict_proba(X)[:, 1]``."""
        a, b = self.platt
        return _sigmoid(a * self.decision_function(X) + b)

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities like scikit-learn, shape [n, 2]: column 0 safe, column 1 unsafe.

        For the 1-D probability of unsafe use :meth:`unsafe_probability`.
        """
        p = self.unsafe_probability(X)
        return np.column_stack([1.0 - p, p])

    def predict(self, X: ArrayLike, threshold: float | None = None) -> np.ndarray:
        """1 (unsafe) where the probability of unsafe is >= ``threshold`` (default: ``self.threshold``)."""
        t = self.threshold if threshold is None else float(threshold)
        return (self.unsafe_probability(X) >= t).astype(np.int64)

    def _calibrate(self, oof: np.ndarray | None, train_inputs, y: np.ndarray, platt: bool) -> None:
        from sklearn.linear_model import LogisticRegression

        dec = oof if oof is not None else self.decision_function(train_inputs)
        if platt:
            lr = LogisticRegression(C=1.0).fit(dec.reshape(-1, 1), y)
            self.platt = (float(lr.coef_[0, 0]), float(lr.intercept_[0]))
        else:
            self.platt = (1.0, 0.0)
        if oof is None:
            self.threshold, self.threshold_rule = 0.5, "0.5 on the probability (training split too small for CV)"
        else:
            a, b = self.platt
            self.threshold = youden_threshold(y, _sigmoid(a * oof + b))
            self.threshold_rule = f"Youden-optimal on {self.cv_folds}-fold cross-validated training probabilities"


def _cv_folds(y: np.ndarray, cv: int) -> int:
    return int(min(cv, np.bincount(y, minlength=2).min())) if cv and cv >= 2 else 0


class Probe(_Thresholded):
    """A standardised (optionally PCA'd) SVM-RBF or logistic-regression probe on activation features."""

    def __init__(self, classifier: str = "svm", *, C: float = 1.0, pca_variance: float | None = None,
                 seed: int = 0, cv: int = 5, max_iter: int = 5000, meta: dict | None = None):
        if classifier not in CLASSIFIERS:
            raise UserError(f"Unknown classifier {classifier!r}. Choose from: {', '.join(CLASSIFIERS)}.")
        if pca_variance is not None and not 0 < pca_variance <= 1:
            raise UserError(f"PCA variance share must be in (0, 1] (got {pca_variance}).")
        self.classifier, self.C, self.pca_variance = classifier, float(C), pca_variance
        self.seed, self.cv, self.max_iter = int(seed), int(cv), int(max_iter)
        self.meta: dict = dict(meta or {})
        self.arrays: dict[str, np.ndarray] = {}
        self.gamma: float | None = None
        self.threshold = 0.5
        self.threshold_rule = ""
        self.platt = (1.0, 0.0)
        self.cv_folds = 0
        self.n_features = 0

    # ---- fitting
    def _pipeline(self):
        """The equivalent scikit-learn pipeline (``SVC(kernel="rbf", gamma="scale")``), for reference and tests."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        steps = [("scale", StandardScaler())]
        if self.pca_variance is not None:
            steps.append(("pca", PCA(n_components=self.pca_variance if self.pca_variance < 1 else None,
                                     svd_solver="full", random_state=self.seed)))
        if self.classifier == "svm":
            clf = SVC(kernel="rbf", C=self.C, gamma="scale", random_state=self.seed)
        else:
            clf = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        steps.append(("clf", clf))
        return Pipeline(steps)

    def fit(self, X: ArrayLike, y: ArrayLike) -> "Probe":
        """Fit on features ``X`` [n, d] and labels ``y`` (1 = unsafe); sets probability map and threshold."""
        from sklearn.model_selection import StratifiedKFold

        X = np.asarray(X, dtype=np.float64)
        y = check_labels(y)
        if X.ndim != 2 or X.shape[0] != len(y):
            raise UserError(f"Features have shape {X.shape} but there are {len(y)} labels.")
        if not np.isfinite(X).all():
            raise UserError("Features contain NaN or infinite values; re-extract the store (float32 if float16 "
                            "overflowed).")
        self._fit_core(X, y)
        self.cv_folds = _cv_folds(y, self.cv)
        oof = None
        if self.cv_folds >= 2:  # out-of-fold decision values: each fold refits the whole pipeline
            oof = np.empty(len(y), dtype=np.float64)
            folds = StratifiedKFold(n_splits=self.cv_folds, shuffle=True, random_state=self.seed)
            for tr, te in folds.split(X, y):
                sub = Probe(self.classifier, C=self.C, pca_variance=self.pca_variance, seed=self.seed,
                            max_iter=self.max_iter)
                sub._fit_core(X[tr], y[tr])
                oof[te] = sub.decision_function(X[te])
        self._calibrate(oof, X, y, platt=self.classifier == "svm")
        return self

    def _fit_core(self, X: np.ndarray, y: np.ndarray) -> None:
        """Scaler (+ PCA) and classifier on (X, y); exports the arrays the numpy decision function reads.

        The SVM is scikit-learn's ``SVC`` on a precomputed RBF Gram matrix (computed with BLAS, much faster
        than libsvm's own kernel loops on thousands of features) with gamma = 1 / (n_features * Var(Z)),
        exactly what ``gamma="scale"`` computes, so it solves the same problem as ``SVC(kernel="rbf")``.
        """
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        self.n_features = int(X.shape[1])
        scaler = StandardScaler().fit(X)
        a = {"scaler_mean": scaler.mean_.astype(np.float64), "scaler_scale": scaler.scale_.astype(np.float64)}
        if self.pca_variance is not None:
            a["pca_mean"], a["pca_components"] = pca_fit((X - a["scaler_mean"]) / a["scaler_scale"],
                                                         self.pca_variance)
        self.arrays = a
        Z = self.transform(X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.classifier == "svm":
                var = float(Z.var())
                self.gamma = 1.0 / (Z.shape[1] * var) if var > 0 else 1.0
                clf = SVC(kernel="precomputed", C=self.C, random_state=self.seed).fit(rbf(Z, Z, self.gamma), y)
                # sklearn's public dual_coef_/intercept_ give a decision value > 0 for classes_[1] (unsafe)
                a["support_vectors"] = np.ascontiguousarray(Z[clf.support_], dtype=np.float64)
                a["dual_coef"] = clf.dual_coef_[0].astype(np.float64)
            else:
                clf = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed).fit(Z, y)
                a["coef"] = clf.coef_[0].astype(np.float64)
        if list(clf.classes_) != [0, 1]:  # pragma: no cover - guarded by check_labels
            raise UserError("Probe classes must be 0 and 1.")
        a["intercept"] = np.asarray(clf.intercept_, dtype=np.float64).reshape(1)

    # ---- prediction (numpy only)
    def transform(self, X: ArrayLike) -> np.ndarray:
        """Scaled (and PCA-projected) features, float64."""
        if not self.arrays:
            raise UserError("The probe is not fitted yet.")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise UserError(f"The probe reads {self.n_features} features but got input of shape {X.shape}. "
                            f"Extract features with the probe's neuron set / hook point.")
        Z = (X - self.arrays["scaler_mean"]) / self.arrays["scaler_scale"]
        if "pca_components" in self.arrays:
            Z = (Z - self.arrays["pca_mean"]) @ self.arrays["pca_components"].T
        return Z

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """Signed score, > 0 leaning unsafe (SVM: kernel expansion; LR: logit)."""
        Z = self.transform(X)
        a = self.arrays
        if self.classifier == "logreg":
            return Z @ a["coef"] + a["intercept"][0]
        out = np.empty(len(Z), dtype=np.float64)
        for st in range(0, len(Z), _CHUNK):
            out[st:st + _CHUNK] = rbf(Z[st:st + _CHUNK], a["support_vectors"], self.gamma) @ a["dual_coef"]
        return out + a["intercept"][0]

    # ---- io
    def to_json(self) -> dict:
        return {"format": PROBE_FORMAT, "kind": "features", "classifier": self.classifier, "C": self.C,
                "pca_variance": self.pca_variance, "seed": self.seed, "cv": self.cv, "cv_folds": self.cv_folds,
                "max_iter": self.max_iter, "gamma": self.gamma, "platt": list(self.platt),
                "threshold": self.threshold, "threshold_rule": self.threshold_rule, "n_features": self.n_features,
                "arrays": sorted(self.arrays), "meta": self.meta, "versions": versions()}

    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> "Probe":
        obj, arrays = _load(path_dir, kind="features")
        p = cls(obj["classifier"], C=obj["C"], pca_variance=obj["pca_variance"], seed=obj["seed"], cv=obj["cv"],
                max_iter=obj["max_iter"], meta=obj.get("meta", {}))
        p.arrays, p.gamma = arrays, obj["gamma"]
        p.platt = tuple(float(v) for v in obj["platt"])
        p.threshold, p.threshold_rule = float(obj["threshold"]), obj["threshold_rule"]
        p.cv_folds, p.n_features = int(obj["cv_folds"]), int(obj["n_features"])
        return p

    @property
    def name(self) -> str:
        return self.classifier


class TextProbe(_Thresholded):
    """Text-only baseline: TF-IDF (word 1-2 grams, sublinear tf) + logistic regression on raw prompts."""

    classifier = TEXT_CLASSIFIER
    VECTORIZER = {"lowercase": True, "ngram_range": [1, 2], "sublinear_tf": True, "min_df": 1, "norm": "l2",
                  "smooth_idf": True}

    #: ``stop_words``: None (every word) or "english" (content words only: scikit-learn's English stop-word list
    #: is left out before the n-grams are formed)
    STOP_WORDS = (None, "english")

    def __init__(self, *, C: float = 10.0, seed: int = 0, cv: int = 5, meta: dict | None = None,
                 stop_words: str | None = None):
        if stop_words not in self.STOP_WORDS:
            raise UserError(f"A text probe's stop words are one of {self.STOP_WORDS}, not {stop_words!r}.")
        self.C, self.seed, self.cv = float(C), int(seed), int(cv)
        self.vectorizer = {**self.VECTORIZER, **({"stop_words": stop_words, "stop_words_sha256": _stop_words_sha256()}
                                                 if stop_words else {})}
        self.meta: dict = dict(meta or {})
        self.vocabulary: list[str] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.threshold, self.threshold_rule, self.platt, self.cv_folds = 0.5, "", (1.0, 0.0), 0
        self._vec = None

    def _vectorizer(self, vocabulary=None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        kw = {k: v for k, v in self.vectorizer.items() if k != "stop_words_sha256"}
        kw["ngram_range"] = tuple(kw["ngram_range"])
        return TfidfVectorizer(vocabulary=vocabulary, dtype=np.float64, **kw)

    def _pipeline(self):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline

        return Pipeline([("tfidf", self._vectorizer()),
                          ("clf", LogisticRegression(C=self.C, max_iter=5000, random_state=self.seed))])

    def fit(self, prompts: Sequence[str], y: ArrayLike) -> "TextProbe":
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        prompts = list(prompts)
        y = check_labels(y)
        pipe = self._pipeline().fit(prompts, y)
        vec, clf = pipe.named_steps["tfidf"], pipe.named_steps["clf"]
        terms = sorted(vec.vocabulary_, key=vec.vocabulary_.get)
        self.vocabulary = terms
        self.arrays = {"idf": vec.idf_.astype(np.float64), "coef": clf.coef_[0].astype(np.float64),
                       "intercept": np.asarray(clf.intercept_, dtype=np.float64).reshape(1)}
        self._vec = None
        self.cv_folds = _cv_folds(y, self.cv)
        oof = None
        if self.cv_folds >= 2:
            folds = StratifiedKFold(n_splits=self.cv_folds, shuffle=True, random_state=self.seed)
            oof = cross_val_predict(self._pipeline(), np.array(prompts, dtype=object), y, cv=folds,
                                    method="decision_function")
        self._calibrate(oof, prompts, y, platt=False)
        return self

    def decision_function(self, prompts: Sequence[str]) -> np.ndarray:
        if not self.arrays:
            raise UserError("The text probe is not fitted yet.")
        if self._vec is None:
            vec = self._vectorizer(vocabulary={t: i for i, t in enumerate(self.vocabulary)})
            vec.idf_ = self.arrays["idf"]
            self._vec = vec
        M = self._vec.transform(list(prompts))
        return np.asarray(M @ self.arrays["coef"]).reshape(-1) + self.arrays["intercept"][0]

    def to_json(self) -> dict:
        return {"format": PROBE_FORMAT, "kind": "text", "classifier": self.classifier, "C": self.C,
                "seed": self.seed, "cv": self.cv, "cv_folds": self.cv_folds, "vectorizer": self.vectorizer,
                "vocabulary": self.vocabulary, "platt": list(self.platt), "threshold": self.threshold,
                "threshold_rule": self.threshold_rule, "n_features": len(self.vocabulary),
                "arrays": sorted(self.arrays), "meta": self.meta, "versions": versions()}

    @property
    def n_features(self) -> int:
        return len(self.vocabulary)

    @classmethod
    def load(cls, path_dir: str | os.PathLike, stem: str = "probe") -> "TextProbe":
        """A saved text probe (``<stem>.json`` / ``<stem>.safetensors`` in ``path_dir``)."""
        obj, arrays = _load(path_dir, kind="text", stem=stem)
        vec = obj.get("vectorizer")
        stop = vec.get("stop_words") if isinstance(vec, dict) else None
        if not isinstance(vec, dict) or stop not in cls.STOP_WORDS \
                or {k: v for k, v in vec.items() if not k.startswith("stop_words")} != cls.VECTORIZER:
            raise UserError(f"{path_dir}: {stem}.json's vectorizer is not one this version reads; retrain the probe.")
        if stop is not None and vec.get("stop_words_sha256") != _stop_words_sha256():
            raise UserError(f"{path_dir}: {stem}.json was trained with another stop-word list than this scikit-learn's "
                            f"{stop!r} list; retrain the probe with this version.")
        p = cls(C=obj["C"], seed=obj["seed"], cv=obj["cv"], meta=obj.get("meta", {}), stop_words=stop)
        p.vocabulary, p.arrays = list(obj["vocabulary"]), arrays
        p.platt = tuple(float(v) for v in obj["platt"])
        p.threshold, p.threshold_rule, p.cv_folds = float(obj["threshold"]), obj["threshold_rule"], int(obj["cv_folds"])
        return p

    @property
    def name(self) -> str:
        return self.classifier


def _stop_words_sha256() -> str:
    """sha256 of scikit-learn's English stop-word list (sorted, one a line): a content-word text probe records it,
    and loading refuses a list that differs (the n-grams would change without an error)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return hashlib.sha256("\n".join(sorted(ENGLISH_STOP_WORDS)).encode()).hexdigest()


def write_probe_files(directory: Path, obj: dict, arrays: dict[str, np.ndarray], stem: str = "probe") -> None:
    """``<stem>.json`` + ``<stem>.safetensors`` of a probe into an existing directory (:func:`_save` makes one
    atomically; a guard export writes its words' probe into its own temporary directory)."""
    from safetensors.numpy import save

    if not arrays:
        raise UserError("Cannot save a probe that is not fitted.")
    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                metadata={"safetyneurons": json.dumps({"format": PROBE_FORMAT}, sort_keys=True)})
    (Path(directory) / f"{stem}.safetensors").write_bytes(data)
    atomic_write_json(Path(directory) / f"{stem}.json", {**obj, "arrays_sha256": sha256_bytes(data)})


def _save(path_dir, obj: dict, arrays: dict[str, np.ndarray]) -> Path:
    if not arrays:
        raise UserError("Cannot save a probe that is not fitted.")
    with atomic_dir(path_dir) as tmp:
        write_probe_files(tmp, obj, arrays)
    return Path(path_dir)


def _load(path_dir, kind: str | None = None, stem: str = "probe") -> tuple[dict, dict[str, np.ndarray]]:
    """A saved probe's settings and arrays (checksum verified) from ``<stem>.json`` / ``<stem>.safetensors``;
    ``kind`` (features / text) must match if given."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path_dir)
    if not (path / f"{stem}.json").is_file():
        raise UserError(f"{path} is not a saved probe (no {stem}.json). Train one with `safetyneurons train`.")
    obj = read_json(path / f"{stem}.json")
    if isinstance(obj, dict) and obj.get("format") == "safetyneurons.probe/1":
        raise UserError(f"{path}/{stem}.json: a probe of format 1, trained on features that also pooled chat-template "
                        f"tokens; this version pools the user's message only. Retrain it (`safetyneurons train`).")
    if not isinstance(obj, dict) or obj.get("format") != PROBE_FORMAT:
        raise UserError(f"{path}/{stem}.json: not a safetyneurons probe (expected format {PROBE_FORMAT}).")
    if kind is not None and obj.get("kind") != kind:
        what = "a text probe" if obj.get("kind") == "text" else "an activation probe"
        raise UserError(f"{path_dir} holds {what}; load it with safetyneurons.probes.probe.load_probe.")
    spath = path / f"{stem}.safetensors"
    if not spath.is_file():
        raise UserError(f"{path}: {stem}.safetensors is missing; retrain the probe.")
    data = spath.read_bytes()
    if obj.get("arrays_sha256") and sha256_bytes(data) != obj["arrays_sha256"]:
        raise UserError(f"{spath}: checksum mismatch (corrupted file). Retrain or restore the probe.")
    try:
        arrays = {k: np.asarray(v) for k, v in load(data).items()}
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{spath}: cannot be read ({e}).") from None
    return obj, arrays


def load_probe(path_dir: str | os.PathLike) -> Probe | TextProbe:
    """Load a saved activation probe or text probe."""
    obj, _ = _load(path_dir)
    return TextProbe.load(path_dir) if obj.get("kind") == "text" else Probe.load(path_dir)


# -------------------------------------------------------------------------------------- comparison
def parse_list(value: str | Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    items = [v for v in items if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UserError(f"Unknown {what}: {', '.join(bad) or '(none given)'}. Choose from: {', '.join(allowed)}.")
    return list(dict.fromkeys(items))


def probe_meta(store: Store, feature_set: str, neuron_set: NeuronSet | None, draw: int | None = None) -> dict:
    """What a probe needs to recompute its features on new prompts (its :class:`FeatureSpec`) and provenance."""
    m = store.manifest
    spec = FeatureSpec(m["hook_point"], m["pooling"], m["max_length"], neuron_set, model=m["model"])
    return {"feature_set": feature_set, "draw": draw, **spec.fields(model_keys=PROBE_MODEL_KEYS),
            "train_store": {"path": str(store.path), "records_sha256": m["records_sha256"], "n": m["n"],
                            "data": m.get("data", {})}}
