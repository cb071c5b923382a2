"""Probes trained for their readout, and how each scores a text (:mod:`safetyneurons.probes.readouts`).

A **variant** is a neuron set (columns of a :func:`~safetyneurons.probes.readout_cache.layer_block`) and a
readout:

- ``mean_windows``: logistic regression on the mean over content tokens; a text scores its most unsafe piece
  (the whole message, its 32-token windows and the sentence pieces its guard records, as the guard serves);
- ``mean``: the same probe on the whole message only;
- ``last``: a probe trained on the last content token;
- ``post``: a probe trained on the mean over the post-instruction template tokens;
- ``agree``: a token-level probe; a text scores the max over rolling means of k consecutive content-token
  scores. It is trained for that aggregation (multiple-instance): every harmful training text contributes
  its top-scoring k-token window (found by the ``mean`` probe, then by the token probe itself), every benign
  text a few of its k-token windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from safetyneurons.activations.reader import max_per_input
from safetyneurons.probes.probe import Probe
from safetyneurons.probes.readout_cache import LAST, MEAN, POST, TextSet

POOLED = {"mean": MEAN, "mean_windows": MEAN, "last": LAST, "post": POST}
READOUTS = ("mean_windows", "mean", "last", "post", "agree")
BENIGN_WINDOWS = 4  # k-token windows drawn per benign training text
MIL_ROUNDS = 2


def fit_logreg(X: np.ndarray, y: np.ndarray, seed: int = 0) -> Probe:
    return Probe("logreg", C=1.0, seed=seed, cv=0).fit(X, y)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The probability of logits ``z``, float64, clipped at +-60 (NaN stays NaN)."""
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, dtype=np.float64), -60.0, 60.0)))


@dataclass
class Variant:
    """A trained readout on one neuron set: ``cols`` index the layer block, ``token_cols`` the per-token rows."""

    name: str
    features: str
    readout: str
    cols: np.ndarray
    probe: Probe
    token_cols: np.ndarray | None = None
    k: int = 0
    info: dict = field(default_factory=dict)

    def score(self, ts: TextSet) -> np.ndarray:
        """Unsafe probability of every text of ``ts`` under this variant."""
        if self.readout == "agree":
            return sigmoid(agreement_logits(self.probe, ts, self.token_cols, self.k))
        if self.readout == "mean_windows":
            if ts.windows is None:
                raise ValueError("this text set was read without the guard's windows")
            p = self.probe.unsafe_probability(ts.windows[:, self.cols])
            return max_per_input(p, ts.window_owner, len(ts))
        return self.probe.unsafe_probability(ts.pooled[:, POOLED[self.readout]][:, self.cols])


def token_logits(probe: Probe, rows: np.ndarray) -> np.ndarray:
    """The logistic-regression probe's logit of every row (float64); linear, so the logit of a window's mean is
    the mean of its tokens' logits."""
    a = probe.arrays
    w = a["coef"] / a["scaler_scale"]
    b = float(a["intercept"][0] - (a["scaler_mean"] * w).sum())
    out = np.empty(len(rows), dtype=np.float64)
    for s in range(0, len(rows), 65536):
        out[s:s + 65536] = rows[s:s + 65536].astype(np.float32) @ w.astype(np.float32) + b
    return out


def rolling_max(z: np.ndarray, k: int) -> tuple[float, int]:
    """(max over the means of k consecutive values of z, start of that window); the whole z when shorter."""
    if len(z) <= k:
        return float(z.mean()), 0
    c = np.concatenate([[0.0], np.cumsum(z)])
    means = (c[k:] - c[:-k]) / k
    s = int(np.argmax(means))
    return float(means[s]), s


def agreement_logits(probe: Probe, ts: TextSet, token_cols: np.ndarray, k: int) -> np.ndarray:
    z = token_logits(probe, ts.rows[:, token_cols])
    return np.asarray([rolling_max(z[ts.offsets[i]:ts.offsets[i + 1]], k)[0] for i in range(len(ts))])


def _window_mean(rows: np.ndarray, s: int, k: int) -> np.ndarray:
    return rows[s:s + k].astype(np.float32).mean(0)


def fit_agreement(train: TextSet, y: np.ndarray, token_cols: np.ndarray, k: int, start: Probe,
                  seed: int = 0) -> Probe:
    """Token-level probe for the max over rolling means of ``k`` tokens (multiple-instance training, see the
    module docstring); ``start`` finds the harmful texts' windows in the first round."""
    rng = np.random.default_rng(seed)
    benign_rows = []
    for i in np.flatnonzero(y == 0):
        rows = train.token_rows(int(i))[:, token_cols]
        n = len(rows)
        starts = [0] if n <= k else rng.choice(n - k + 1, size=min(BENIGN_WINDOWS, n - k + 1), replace=False)
        benign_rows += [_window_mean(rows, int(s), k) for s in starts]
    harmful = np.flatnonzero(y == 1)
    probe = start
    for _ in range(MIL_ROUNDS):
        tops = []
        for i in harmful:
            rows = train.token_rows(int(i))[:, token_cols]
            _, s = rolling_max(token_logits(probe, rows), k)
            tops.append(_window_mean(rows, s, k))
        X = np.vstack(benign_rows + tops)
        labels = np.concatenate([np.zeros(len(benign_rows)), np.ones(len(tops))]).astype(np.int64)
        probe = fit_logreg(X, labels, seed)
    return probe


def train_pooled(train: TextSet, y: np.ndarray, features: str, cols: np.ndarray, seed: int = 0
                 ) -> dict[str, Variant]:
    """The ``mean_windows``, ``mean``, ``last`` and ``post`` variants of one neuron set (``mean_windows`` and
    ``mean`` share the probe trained on the mean over content tokens)."""
    out = {}
    for readout in ("mean", "last", "post"):
        probe = fit_logreg(train.pooled[:, POOLED[readout]][:, cols], y, seed)
        out[readout] = Variant(f"{features}/{readout}", features, readout, cols, probe)
    mean = out["mean"]
    out["mean_windows"] = Variant(f"{features}/mean_windows", features, "mean_windows", cols, mean.probe)
    return out


def train_agreement(train: TextSet, y: np.ndarray, features: str, cols: np.ndarray, token_cols: np.ndarray,
                    start: Probe, ks: Sequence[int], seed: int = 0) -> dict[int, Variant]:
    """One ``agree`` variant per k (k is chosen on validation by the caller)."""
    return {k: Variant(f"{features}/agree", features, "agree", cols,
                       fit_agreement(train, y, token_cols, k, start, seed), token_cols=token_cols, k=k)
            for k in ks}
