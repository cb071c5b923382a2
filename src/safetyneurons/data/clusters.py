"""Near-duplicate clusters of prompts, so that near-duplicates never straddle two splits.

Two prompts are **near-duplicates** when the Jaccard similarity of their word sets is at least
``threshold`` (0.6 by default): ``|A & B| / |A | B| >= 0.6``, where a prompt's word set is its NFKC,
case-folded ``\\w+`` words. This catches the template families of the default data (Do-Not-Answer prompts
with the entity swapped, AdvBench paraphrases) that the near-exact key of :func:`safetyneurons.data.splits.clean`
lets through. Clusters are the connected components of the near-duplicate graph (single link).

The pairs are found exactly, without hashing approximations, by *prefix filtering*: with the words of every
set sorted rarest first, two sets with Jaccard >= t must share a word among the first
``|x| - ceil(t |x|) + 1`` words of each (a pair overlapping in ``o`` words has ``o >= ceil(t max(|x|, |y|))``).
An inverted index over those prefixes yields the candidate pairs, and each candidate is checked exactly. At
the ~8k prompts of the default data this takes about a second, so no approximate library (MinHash) is needed.

:func:`assign_clusters` writes a ``cluster`` field into each record (the smallest record id of its cluster),
:func:`take_clusters` fills a split from whole clusters, within per-stratum quotas.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Sequence

from safetyneurons.data.datasets import normalise_text

if TYPE_CHECKING:
    import numpy as np

THRESHOLD = 0.6
_WORD = re.compile(r"\w+")


def word_set(prompt: str) -> frozenset[str]:
    """The set of NFKC, case-folded words of a prompt."""
    return frozenset(_WORD.findall(normalise_text(prompt).casefold()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _min_overlap(n: int, threshold: float) -> int:
    return max(1, math.ceil(threshold * n - 1e-9))


def near_duplicate_pairs(prompts: Sequence[str], threshold: float = THRESHOLD) -> list[tuple[int, int, float]]:
    """Every pair ``(i, j, jaccard)`` with ``i < j`` whose word sets have Jaccard >= ``threshold`` (exact)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    sets = [word_set(p) for p in prompts]
    freq = Counter(w for s in sets for w in s)
    rank = {w: k for k, w in enumerate(sorted(freq, key=lambda w: (freq[w], w)))}
    ordered = [sorted(s, key=rank.__getitem__) for s in sets]
    index: dict[str, list[int]] = defaultdict(list)
    pairs = []
    # shortest first: every candidate j already indexed has |j| <= |i|, so the length filter is one-sided
    for i in sorted(range(len(sets)), key=lambda k: (len(sets[k]), k)):
        words = ordered[i]
        if not words:
            continue
        n = len(words)
        prefix = words[:n - _min_overlap(n, threshold) + 1]
        seen: set[int] = set()
        for w in prefix:
            for j in index[w]:
                if j in seen or len(sets[j]) < threshold * n - 1e-9:
                    continue
                seen.add(j)
                inter = len(sets[i] & sets[j])
                union = n + len(sets[j]) - inter
                if inter >= threshold * union - 1e-9:
                    pairs.append((min(i, j), max(i, j), inter / union))
            index[w].append(i)
    return sorted(pairs)


def components(n: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Connected component of each of ``n`` items joined by ``pairs``, named by its smallest item."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(n)]


def cluster_labels(prompts: Sequence[str], threshold: float = THRESHOLD) -> list[int]:
    """Cluster number of each prompt (connected components of the near-duplicate graph); numbered by the
    position of each cluster's first prompt, so singletons and clusters are numbered in input order."""
    return components(len(prompts), ((i, j) for i, j, _ in near_duplicate_pairs(prompts, threshold)))


def assign_clusters(records: Sequence[dict], threshold: float = THRESHOLD) -> tuple[list[dict], dict]:
    """Copies of ``records`` with ``"cluster"`` = the smallest record id in the record's near-duplicate
    cluster, and a report: cluster counts, how many clusters were merged (more than one record), the largest
    cluster and a few examples. Input records are not modified."""
    records = list(records)
    labels = cluster_labels([r["prompt"] for r in records], threshold)
    members: dict[int, list[int]] = defaultdict(list)
    for k, c in enumerate(labels):
        members[c].append(k)
    name = {c: min(str(records[k]["id"]) for k in ks) for c, ks in members.items()}
    out = [{**r, "cluster": name[labels[k]]} for k, r in enumerate(records)]
    merged = sorted((ks for ks in members.values() if len(ks) > 1), key=lambda ks: (-len(ks), ks[0]))
    report = {
        "threshold": threshold,
        "similarity": "Jaccard of NFKC case-folded word sets",
        "records": len(records),
        "clusters": len(members),
        "merged_clusters": len(merged),
        "records_in_merged_clusters": sum(len(ks) for ks in merged),
        "largest_cluster": max((len(ks) for ks in members.values()), default=0),
        "mixed_label_clusters": sum(1 for ks in merged if len({records[k].get("label") for k in ks}) > 1),
        "examples": [[records[k]["prompt"][:120] for k in ks[:3]] for ks in merged[:3]],
    }
    return out, report


def near_duplicates_joined(records: Sequence[dict], clustered: Sequence[dict],
                           threshold: float = THRESHOLD) -> list[dict]:
    """Copies of ``records`` with ``"cluster"``: the (smallest) cluster of a ``clustered`` record each is a
    near-duplicate of, else the record's own id. ``clustered`` keeps its clusters: ``records`` are attached to
    them, never merge them."""
    records, clustered = list(records), list(clustered)
    labels = cluster_labels([r["prompt"] for r in clustered] + [r["prompt"] for r in records], threshold)
    names: dict[int, str] = {}
    for r, c in zip(clustered, labels):
        names[c] = min(names.get(c, r["cluster"]), r["cluster"])
    own = labels[len(clustered):]
    return [{**r, "cluster": names.get(c, str(r["id"]))} for r, c in zip(records, own)]


def group_by_cluster(records: Iterable[dict]) -> list[list[dict]]:
    """Records grouped by their ``cluster`` field, groups in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r.get("cluster", r["id"])), []).append(r)
    return list(groups.values())


def take_clusters(groups: Sequence[list[dict]], quota: dict[Hashable, int],
                  stratum: Callable[[dict], Hashable]) -> tuple[list[list[dict]], list[list[dict]]]:
    """Walk ``groups`` (whole clusters) in order and take each one that fits in what is left of ``quota``
    (records per stratum); return ``(taken, rest)``, both in the given order. A cluster with a record of a
    stratum not in ``quota`` is never taken. Quotas are filled exactly whenever enough small clusters are
    left, which the default data has (most clusters are single prompts)."""
    left = dict(quota)
    taken, rest = [], []
    for g in groups:
        need = Counter(stratum(r) for r in g)
        if all(left.get(s, 0) >= n for s, n in need.items()):
            for s, n in need.items():
                left[s] -= n
            taken.append(g)
        else:
            rest.append(g)
    return taken, rest


def proportional_quota(records: Sequence[dict], fraction: float, by: Callable[[dict], Hashable],
                       within: Callable[[dict], Hashable]) -> dict[Hashable, int]:
    """Records per stratum ``by(r)`` for a ``fraction`` of ``records``: ``round(fraction * n)`` for each group
    ``within(r)`` (e.g. the label, so both classes get the same count when they are the same size), spread
    over the group's strata by largest remainder. Deterministic."""
    groups: dict[Hashable, Counter] = defaultdict(Counter)
    for r in records:
        groups[within(r)][by(r)] += 1
    quota: dict[Hashable, int] = {}
    for g, counts in groups.items():
        total = round(fraction * sum(counts.values()))
        exact = {s: fraction * n for s, n in counts.items()}
        base = {s: math.floor(v) for s, v in exact.items()}
        extra = total - sum(base.values())
        for s in sorted(counts, key=lambda s: (-(exact[s] - base[s]), str(s)))[:max(extra, 0)]:
            base[s] += 1
        quota.update(base)
    return quota


def straddling(splits: dict[str, Sequence[dict]]) -> dict[str, list[str]]:
    """Clusters found in more than one of ``splits`` (name -> records): ``{cluster: [split names]}``."""
    where: dict[str, set[str]] = defaultdict(set)
    for name, recs in splits.items():
        for r in recs:
            where[str(r.get("cluster", r["id"]))].add(name)
    return {c: sorted(s) for c, s in where.items() if len(s) > 1}


def assign_splits(pool: list[dict], rng: np.random.Generator, n_twin: int, n_contrast: int, n_contrast_benign: int,
                   test_size: float) -> tuple[list[dict], list[dict], list[dict], list[dict], dict]:
    """twin, contrast, train, test from whole near-duplicate clusters of ``pool`` (seeded cluster order).

    twin takes ``n_twin`` per class, contrast ``n_contrast`` harmful + ``n_contrast_benign`` benign, test a
    ``test_size`` share of the rest per class, spread over sources (stratified); train keeps the rest.
    """
    groups = group_by_cluster(pool)
    groups = [groups[i] for i in rng.permutation(len(groups))]
    label = lambda r: r["label"]  # noqa: E731
    twin_g, groups = take_clusters(groups, {1: n_twin, 0: n_twin}, label)
    contrast_g, groups = take_clusters(groups, {1: n_contrast, 0: n_contrast_benign}, label)
    rest = [r for g in groups for r in g]
    stratum = lambda r: (r["label"], r["source"])  # noqa: E731
    test_quota = proportional_quota(rest, test_size, stratum, label)
    test_g, train_g = take_clusters(groups, test_quota, stratum)
    flat = lambda gs: sorted((r for g in gs for r in g), key=lambda r: str(r["id"]))  # noqa: E731
    twin, contrast, train, test = flat(twin_g), flat(contrast_g), flat(train_g), flat(test_g)
    twin, contrast, train, test = ([recs[i] for i in rng.permutation(len(recs))]
                                   for recs in (twin, contrast, train, test))
    short = {"twin": 2 * n_twin - len(twin), "contrast": n_contrast + n_contrast_benign - len(contrast),
             "test": sum(test_quota.values()) - len(test)}
    return twin, contrast, train, test, {"rule": "clusters assigned whole, in seeded order, to twin, contrast, "
                                                 "test (stratified quota), then train",
                                         "quota_shortfall": short}
