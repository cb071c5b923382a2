"""Binary classification metrics for probes (label 1 = unsafe is the positive class).

Threshold metrics (accuracy, precision, recall, F1, confusion matrix, scikit-learn classification report)
use the probe's predictions; ranking metrics (AUROC, AUPRC = average precision, TPR at 1% FPR) use its
scores. Confidence intervals come from a seeded percentile bootstrap over test prompts; the difference
between two score sets on the same prompts (safety vs control neurons) from a paired bootstrap, which also
resamples the control's random draws. When the records carry a ``cluster`` field (near-duplicate cluster
ids from the splits), the bootstrap resamples whole clusters instead of prompts, since near-duplicates are
not independent evidence; without it, it resamples prompts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

TARGET_NAMES = ["safe", "unsafe"]


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney statistic (ties count one half). NaN if one class."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(s, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_columns(y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """AUROC of every column of ``S`` [n, k] against ``y`` (as :func:`auroc`, one ranking pass for all)."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(S.shape[1], np.nan)
    ranks = rankdata(np.asarray(S, dtype=np.float64), axis=0)
    return (ranks[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def tpr_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float = 0.01) -> float:
    """Highest true-positive rate reachable with a false-positive rate of at most ``fpr``."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y)
    if y.min() == y.max():
        return float("nan")
    f, t, _ = roc_curve(y, s)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def bootstrap_groups(records: Sequence[dict]) -> np.ndarray | None:
    """Resampling units for the bootstrap: each record's ``cluster`` (near-duplicate cluster id), or None
    when no record has one (then prompts are resampled). A record without a cluster is its own unit."""
    if not any("cluster" in r for r in records):
        return None
    return np.array([f"cluster:{r['cluster']}" if "cluster" in r else f"id:{r['id']}" for r in records])


def bootstrap_unit(groups: np.ndarray | None, n: int) -> dict:
    """What a bootstrap resamples, for reports: ``{"unit": "cluster"|"prompt", "n_units": k}``."""
    return {"unit": "prompt", "n_units": int(n)} if groups is None else \
        {"unit": "cluster", "n_units": int(len(np.unique(groups)))}


def _bootstrap_indices(n: int, y: np.ndarray, n_boot: int, seed: int, groups: np.ndarray | None = None):
    """Seeded bootstrap resamples of row indices: ``n`` rows with replacement, or, with ``groups``, as
    many whole groups (clusters) as there are, with replacement, each bringing all its rows."""
    rng = np.random.default_rng(seed)
    members = None
    if groups is not None:
        _, inv = np.unique(np.asarray(groups), return_inverse=True)
        order = np.argsort(inv, kind="stable")
        members = np.split(order, np.flatnonzero(np.diff(inv[order])) + 1)
    for _ in range(n_boot):
        if members is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([members[c] for c in rng.integers(0, len(members), len(members))])
        yb = y[idx]
        if yb.min() == yb.max():
            continue  # AUROC undefined on a one-class resample
        yield idx


def _score_matrix(scores) -> np.ndarray:
    """[n, k] float64: one column per score vector (a single vector, or one per draw)."""
    return np.asarray(scores, dtype=np.float64).reshape(1, -1).T if np.ndim(scores) == 1 else \
        np.stack([np.asarray(s, dtype=np.float64) for s in scores], axis=1)


def _draw_mean(aurocs: np.ndarray, rng) -> float:
    """Mean AUROC over a resample (with replacement) of the draws; the plain value for one draw."""
    return float(aurocs[0]) if len(aurocs) == 1 else float(aurocs[rng.integers(0, len(aurocs), len(aurocs))].mean())


def bootstrap_ci(y: np.ndarray, scores: Sequence[np.ndarray] | np.ndarray, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI of AUROC. ``scores`` may be several score vectors (random draws): then the
    statistic is the mean AUROC of a resample of the draws on each resample of the prompts (or clusters)."""
    y = np.asarray(y)
    M = _score_matrix(scores)
    draw_rng = np.random.default_rng([int(seed), 1])
    stats = [_draw_mean(auroc_columns(y[idx], M[idx]), draw_rng)
             for idx in _bootstrap_indices(len(y), y, n_boot, seed, groups)]
    if not stats:
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap_diff(y: np.ndarray, scores_a: np.ndarray, scores_b: Sequence[np.ndarray] | np.ndarray,
                          n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                          groups: np.ndarray | None = None) -> dict:
    """AUROC(a) - mean AUROC(b...) on the same prompts, with a paired percentile bootstrap CI.

    Each resample draws the prompts (whole clusters when ``groups`` is given) and, when ``scores_b`` holds
    several draws, the draws too, both with replacement. ``p_le_0`` is the share of resamples where the
    difference is <= 0 (a one-sided bootstrap p-value).
    """
    y = np.asarray(y)
    M = np.concatenate([_score_matrix(scores_a), _score_matrix(scores_b)], axis=1)  # column 0: a
    k = M.shape[1] - 1
    diff = auroc(y, M[:, 0]) - float(np.mean([auroc(y, M[:, j]) for j in range(1, k + 1)]))
    draw_rng = np.random.default_rng([int(seed), 1])
    stats = []
    for idx in _bootstrap_indices(len(y), y, n_boot, seed, groups):
        aucs = auroc_columns(y[idx], M[idx])
        stats.append(aucs[0] - _draw_mean(aucs[1:], draw_rng))
    stats = np.array(stats)
    unit = bootstrap_unit(groups, len(y))
    if len(stats) == 0:
        return {"diff": diff, "ci": [float("nan"), float("nan")], "p_le_0": float("nan"), "n_boot": 0, **unit}
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return {"diff": float(diff), "ci": [float(lo), float(hi)], "p_le_0": float((stats <= 0).mean()),
            "n_boot": int(len(stats)), "draws_resampled": k > 1, **unit}


def binary_metrics(y: np.ndarray, scores: np.ndarray, pred: np.ndarray, n_boot: int = 1000, seed: int = 0,
                   groups: np.ndarray | None = None) -> dict:
    """All metrics for one probe on one labelled set, JSON-ready.

    ``scores``: higher = more unsafe (decision values or probabilities); ``pred``: 0/1 predictions;
    ``groups``: bootstrap units (clusters), see :func:`bootstrap_groups`.
    """
    from sklearn.metrics import (accuracy_score, average_precision_score, classification_report,
                                 confusion_matrix, f1_score, precision_score, recall_score)

    y = np.asarray(y).astype(np.int64)
    pred = np.asarray(pred).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    two = y.min() != y.max()
    out = {
        "n": int(len(y)), "n_unsafe": int(y.sum()), "n_safe": int(len(y) - y.sum()),
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "auroc": auroc(y, scores),
        "auroc_ci": list(bootstrap_ci(y, scores, n_boot=n_boot, seed=seed, groups=groups)) if two and n_boot
        else [None, None],
        "auprc": float(average_precision_score(y, scores)) if two else float("nan"),
        "tpr_at_1pct_fpr": tpr_at_fpr(y, scores, 0.01),
        "classification_report": classification_report(y, pred, labels=[0, 1], target_names=TARGET_NAMES,
                                                       digits=4, zero_division=0),
    }
    return out


def mean_metrics(runs: list[dict]) -> dict:
    """Average numeric metrics over several runs (random draws); keeps per-draw values and std."""
    out: dict = {"draws": len(runs)}
    for key in ("accuracy", "precision", "recall", "f1", "auroc", "auprc", "tpr_at_1pct_fpr"):
        vals = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = float(np.nanmean(vals))
        out[f"{key}_std"] = float(np.nanstd(vals))
        out[f"{key}_per_draw"] = vals.tolist()
    out["confusion_matrix_per_draw"] = [r["confusion_matrix"] for r in runs]
    # a single draw's report/matrix, for the reference-style printout
    out["shown_draw"] = 1
    for key in ("n", "n_unsafe", "n_safe", "confusion_matrix", "classification_report"):
        out[key] = runs[0][key]
    return out
