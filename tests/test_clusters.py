"""Near-duplicate clusters: exact pair finding, whole-cluster split assignment, and the default splits."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from safetyneurons.data import clusters

from safetyneurons.data import splits as data

WORDS = ("how to make build write explain a the bomb poem sea weather city bank hack recipe story code "
         "python list sort tell me about history of rome paris cake bread car engine").split()


def brute_pairs(prompts, t):
    sets = [clusters.word_set(p) for p in prompts]
    return sorted((i, j) for i, j in itertools.combinations(range(len(sets)), 2)
                  if sets[i] and sets[j] and len(sets[i] & sets[j]) >= t * len(sets[i] | sets[j]) - 1e-9)


@pytest.mark.parametrize("threshold", [0.6, 0.5, 0.8, 1.0])
def test_pairs_equal_brute_force(threshold):
    rng = random.Random(1)
    base = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for _ in range(120)]
    # planted near-duplicates: one word swapped or added
    variants = [p + " " + rng.choice(WORDS) for p in base[:40]] + [p.replace("the", "a") for p in base[40:60]]
    prompts = base + variants + ["", "!!!"]
    got = sorted((i, j) for i, j, _ in clusters.near_duplicate_pairs(prompts, threshold))
    assert got == brute_pairs(prompts, threshold)
    assert len(got) > 20  # the planted pairs are there


def test_boundary_is_inclusive():
    a = "one two three four five"      # 5 words
    b = "one two three four six seven"  # 4 shared of 7 -> 0.571
    c = "one two three six"             # 3 shared of 6 -> 0.5
    d = "one two three five six"        # 4 shared of 6 -> 0.667
    e = "one two three four"            # 4 shared of 5 -> 0.8
    f = "one two three x"               # with "one two three four five": 3 of 6 = 0.5
    got = {(i, j) for i, j, _ in clusters.near_duplicate_pairs([a, b, c, d, e, f], 0.6)}
    assert (0, 3) in got and (0, 4) in got and (0, 1) not in got and (0, 2) not in got and (0, 5) not in got
    # Jaccard exactly 0.6 counts: 3 shared of 5
    assert clusters.near_duplicate_pairs(["a b c d", "a b c e"], 0.6) == [(0, 1, 0.6)]


def planted_pool(n_families=40, per_family=5, singletons=400, seed=0):
    """Records with planted near-duplicate families (entity swapped, like Do-Not-Answer templates)."""
    rng = random.Random(seed)
    records = []
    for f in range(n_families):
        label = f % 2
        stem = f"family{f} " + " ".join(rng.sample(WORDS, 6))
        for k in range(per_family):
            records.append({"id": f"fam{f}:{k}", "prompt": f"{stem} entity{k}", "label": label,
                            "source": "srcA" if label else "srcB"})
    for k in range(singletons):
        label = k % 2
        records.append({"id": f"single:{k}", "prompt": f"unique{k} word{k} token{k} item{k}", "label": label,
                        "source": ("srcA", "srcC")[k % 4 // 2] if label else "srcB"})
    return records


def test_planted_families_never_straddle_splits():
    pool, report = clusters.assign_clusters(planted_pool())
    assert report["merged_clusters"] == 40 and report["records_in_merged_clusters"] == 200
    assert report["largest_cluster"] == 5
    by_family = {r["id"].split(":")[0]: r["cluster"] for r in pool if r["id"].startswith("fam")}
    assert len(set(by_family.values())) == 40
    rng = np.random.default_rng(0)
    twin, contrast, train, test, info = clusters.assign_splits(pool, rng, n_twin=30, n_contrast=20,
                                                               n_contrast_benign=20, test_size=0.25)
    splits = {"twin": twin, "contrast": contrast, "train": train, "test": test}
    assert clusters.straddling(splits) == {}
    # independent oracle: no pair of near-duplicate prompts sits in two different splits
    where = {r["prompt"]: name for name, recs in splits.items() for r in recs}
    prompts = list(where)
    for i, j in brute_pairs(prompts, 0.6):
        assert where[prompts[i]] == where[prompts[j]], (prompts[i], prompts[j])
    # families really were spread across splits (the test would pass vacuously otherwise)
    fam_splits = {where[r["prompt"]] for r in pool if r["id"].startswith("fam")}
    assert len(fam_splits) >= 3
    assert info["quota_shortfall"] == {"twin": 0, "contrast": 0, "test": 0}
    assert sum(r["label"] for r in twin) == 30 and len(twin) == 60
    assert sum(r["label"] for r in contrast) == 20 and len(contrast) == 40
    assert sum(r["label"] for r in test) * 2 == len(test)
    assert sorted(r["id"] for recs in splits.values() for r in recs) == sorted(r["id"] for r in pool)


def test_assignment_is_deterministic():
    pool, _ = clusters.assign_clusters(planted_pool())
    a = clusters.assign_splits(pool, np.random.default_rng(3), 30, 20, 20, 0.25)
    b = clusters.assign_splits(pool, np.random.default_rng(3), 30, 20, 20, 0.25)
    assert a == b


# ------------------------------------------------------------------ the default splits (real data)
@pytest.fixture(scope="module")
def default_splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("splits") / "default"
    manifest = data.build_splits(out, seed=0, progress=False)
    return {name: data.read_records(out / f"{name}.jsonl") for name in data.SPLIT_NAMES}, manifest


def test_default_splits_have_no_near_duplicates_across_splits(default_splits):
    splits, manifest = default_splits
    main = data.SPLIT_NAMES
    records = [(name, r) for name in main for r in splits[name]]
    # every record names its cluster, but val's long benign prompts, joined from val's own prompts: a record
    # without one is its own cluster (its id)
    assert all("cluster" in r or (name == "val" and r["id"].startswith("long:")) for name, r in records)
    pairs = clusters.near_duplicate_pairs([r["prompt"] for _, r in records], 0.6)
    # our templates cross every family with the same phrasing frames ("I would like a detailed explanation of
    # how one might ..."), so two families share most words; for them a near-duplicate is judged on the family
    # text (the act or task), which is what split_own keeps on one side
    fam = [r.get("family") for _, r in records]
    same_frame_only = {(i, j) for i, j, _ in pairs if fam[i] and fam[j] and fam[i] != fam[j]}
    fam_pairs = {(a, b) for a, b, _ in clusters.near_duplicate_pairs(sorted({f for f in fam if f}), 0.6)}
    assert len(same_frame_only) > 10 and len(fam_pairs) >= 1  # both kinds exist, so the rule is exercised
    names = sorted({f for f in fam if f})
    near_fam = {frozenset((names[a], names[b])) for a, b in fam_pairs}
    across = [(records[i][1]["prompt"], records[j][1]["prompt"]) for i, j, _ in pairs
              if records[i][0] != records[j][0]
              and ((i, j) not in same_frame_only or frozenset((fam[i], fam[j])) in near_fam)]
    assert across == []
    fam_side = {}
    for name, r in records:
        if r.get("family"):
            fam_side.setdefault((r["source"], r["family"]), set()).add(name)
    assert all(len(v) == 1 for v in fam_side.values())
    assert len(pairs) > 100  # near-duplicates exist, inside splits
    c = manifest["clusters"]
    assert c["merged_clusters"] > 100 and c["threshold"] == 0.6
    assert manifest["splits"]["contrast"]["by_label"] == {"0": 100, "1": 100}
