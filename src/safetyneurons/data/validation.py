"""The validation split (where the guard's threshold is calibrated) and train-only sources.

* :func:`carve_validation` moves a seeded, (label, source)-stratified share of the training split into
  ``val``. It moves whole near-duplicate clusters (the ``cluster`` field, when records have one), so no
  cluster straddles train and val. Every source of the main mix, hard negatives included, lands in val.
* :func:`split_own` divides the records of our own sources (the templates: hard negatives, ordinary tasks and
  chat turns, harmful counterparts) between train and val: whole groups at a time, a group being every
  phrasing of one family joined with its near-duplicates, by a seeded hash, so a template never has a
  rephrasing on the other side. They never reach test or held-out data.
* :func:`add_own` appends such records to a split, dropping any whose cluster already lies in another split.
* :func:`threshold_for_fpr` is the calibration rule: the lowest threshold whose false-positive rate on the
  benign prompts of the validation split is at most the target.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Sequence

import numpy as np

from safetyneurons.data.clusters import cluster_labels, components
from safetyneurons.errors import UserError

DEFAULT_TARGET_FPR = 0.05


def _cluster(rec: dict) -> str:
    return str(rec.get("cluster") or rec["id"])


def carve_validation(train: Sequence[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split ``train`` into (train, val): about ``val_size`` of every (label, source) stratum goes to val,
    whole clusters at a time. Order within each output follows the input; seeded and deterministic."""
    if not 0.0 <= val_size < 1.0:
        raise UserError(f"--val-size must be in [0, 1), got {val_size}.")
    if val_size == 0 or not train:
        return list(train), []
    clusters: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(train):
        clusters[_cluster(r)].append(i)
    strata: dict[str, list[str]] = defaultdict(list)
    for key, idx in clusters.items():
        first = train[idx[0]]
        strata[f"{first['label']}:{first['source']}"].append(key)
    rng = np.random.default_rng(seed)
    to_val: set[int] = set()
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])
        size = sum(len(clusters[k]) for k in keys)
        want = int(round(val_size * size))
        taken = 0
        for j in rng.permutation(len(keys)):
            if taken >= want:
                break
            to_val.update(clusters[keys[j]])
            taken += len(clusters[keys[j]])
    return ([r for i, r in enumerate(train) if i not in to_val], [r for i, r in enumerate(train) if i in to_val])


def add_own(split: list[dict], others: Sequence[Sequence[dict]],
            records: Sequence[dict]) -> tuple[list[dict], int]:
    """``split`` plus the ``records`` whose cluster is in no other split; returns (split, dropped)."""
    taken = {_cluster(r) for other in others for r in other}
    keep = [r for r in records if _cluster(r) not in taken]
    return list(split) + keep, len(records) - len(keep)


def split_own(records: Sequence[dict], seed: int, val_share: float,
              threshold: float) -> tuple[list[dict], list[dict]]:
    """``(train, val)``: about ``val_share`` of the groups of ``records`` go to val. A group joins records that
    share a ``family`` (per source), a ``cluster`` or near-duplicate family texts (word-set Jaccard >=
    ``threshold``); it is placed by a hash of the seed and its smallest record id, so the placement of a group does
    not depend on the others."""
    records = list(records)
    first: dict[tuple, int] = {}
    # near-duplicates among families are found on the family text: the phrasing frames ("Tell me how to ...,
    # step by step.") are shared by every family and would join them all
    inner = cluster_labels([str(r.get("family", r["prompt"])) for r in records], threshold)
    links = [(first.setdefault(key, i), i) for i, r in enumerate(records)
             for key in (("family", r["source"], r.get("family", r["id"])), ("cluster", _cluster(r)),
                         ("inner", inner[i]))]
    group = components(len(records), links)
    name: dict[int, str] = {}  # a group's name: its smallest record id
    for g, r in zip(group, records):
        name[g] = min(name.get(g, str(r["id"])), str(r["id"]))
    in_val = {g: int.from_bytes(hashlib.sha256(f"{seed}:{n}".encode()).digest()[:8], "big") / 2 ** 64 < val_share
              for g, n in name.items()}
    return ([r for g, r in zip(group, records) if not in_val[g]], [r for g, r in zip(group, records) if in_val[g]])


def threshold_for_fpr(y: Sequence[int], proba: Sequence[float], target_fpr: float = DEFAULT_TARGET_FPR) -> float:
    """The lowest threshold t (flag when p >= t) whose false-positive rate on the benign (y == 0) scores is
    at most ``target_fpr``. Ties never push the rate over the target: all benign scores equal to the cut are
    counted. Needs at least one benign example."""
    if not 0.0 <= float(target_fpr) < 1.0:
        raise UserError(f"--target-fpr must be in [0, 1), got {target_fpr}.")
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    benign = np.sort(p[y == 0])[::-1]
    if benign.size == 0:
        raise UserError("The validation split has no benign prompts, so no false-positive rate can be set; "
                        "rebuild the splits with a validation share (--val-size).")
    allowed = int(np.floor(float(target_fpr) * benign.size + 1e-9))  # benign prompts we may flag
    if allowed >= benign.size:
        return 0.0
    # flag only scores strictly above the (allowed)-th highest benign score
    cut = benign[allowed]
    t = float(np.nextafter(cut, np.inf))
    return min(t, 1.0)


def calibration_figures(y: Sequence[int], proba: Sequence[float], sources: Sequence[str], threshold: float,
                        target_fpr: float, hard_sources: Sequence[str] = ()) -> dict:
    """What guard.json records about the calibration: the rule and the validation figures."""
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    src = np.asarray(list(sources))
    flag = p >= threshold
    hard = np.isin(src, list(hard_sources)) & (y == 0)
    ordinary = (~np.isin(src, list(hard_sources))) & (y == 0)

    def rate(mask):
        return float(flag[mask].mean()) if mask.any() else None

    return {
        "rule": f"lowest threshold with false-positive rate <= {target_fpr:g} on the benign prompts of the "
                f"validation split",
        "target_fpr": float(target_fpr), "threshold": float(threshold),
        "validation": {
            "n": int(len(y)), "n_harmful": int((y == 1).sum()), "n_benign": int((y == 0).sum()),
            "n_hard_negative": int(hard.sum()),
            "fpr_benign": rate(y == 0), "flag_rate_ordinary_benign": rate(ordinary),
            "flag_rate_hard_negative": rate(hard), "recall_harmful": rate(y == 1),
            "per_source": {s: {"n": int((src == s).sum()), "label": int(y[src == s][0]),
                               "flag_rate": float(flag[src == s].mean())} for s in sorted(set(src.tolist()))},
        },
    }
