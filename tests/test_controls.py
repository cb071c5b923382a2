"""Control neuron sets (layer-matched with spill, global, magnitude), the rank p-value, and the bootstrap
that resamples near-duplicate clusters and control draws."""

from __future__ import annotations

import numpy as np
import pytest

from safetyneurons.neurons.controls import (layer_matched_counts, magnitude_matched, overlap, random_global,
                                    random_layer_matched, rank_p_value)
from safetyneurons.errors import UserError
from safetyneurons.probes.metrics import _bootstrap_indices, auroc, bootstrap_ci, bootstrap_groups, paired_bootstrap_diff
from safetyneurons.neurons.selection import NeuronSet


def full_layer_set() -> NeuronSet:
    """4 layers x 8 neurons: layer 1 entirely safety neurons, layer 2 holds 5 of 8, layer 0 one."""
    layers = [0] + [1] * 8 + [2] * 5
    indices = [3] + list(range(8)) + [0, 2, 4, 6, 7]
    return NeuronSet(hook_point="mlp_neurons", num_layers=4, width=8, layers=layers, indices=indices,
                     scores=np.arange(len(layers), dtype=float), model={"ref": "m"})


def pairs(ns: NeuronSet) -> set:
    return set(zip(ns.layers.tolist(), ns.indices.tolist()))


def test_spill_goes_to_the_nearest_layers_with_room_lower_layer_first_on_ties():
    counts, spill = layer_matched_counts(full_layer_set())
    # layer 1 (8 needed, 0 free): layer 0 and 2 are both at distance 1 -> layer 0 first (7 free, 1 own -> 6),
    # layer 2 has no room (3 free, 5 own), then layer 3 takes the last 2; layer 2 (5 needed, 3 free) -> layer 3
    assert counts.tolist() == [7, 0, 3, 4]
    assert spill == [{"from_layer": 1, "to_layer": 0, "count": 6}, {"from_layer": 1, "to_layer": 3, "count": 2},
                     {"from_layer": 2, "to_layer": 3, "count": 2}]


def test_layer_matched_draws_never_overlap_even_with_a_full_layer():
    ns = full_layer_set()
    draws = [random_layer_matched(ns, d, seed=5, num_layers=4, width=8) for d in range(30)]
    for r in draws:
        assert len(r) == len(ns) and overlap(r, ns) == 0 and not pairs(r) & pairs(ns)
        assert r.per_layer_counts().tolist() == [7, 0, 3, 4]
        assert r.settings["overlap_with_safety"] == 0 and r.settings["per_layer_counts"] == [7, 0, 3, 4]
        assert r.settings["safety_per_layer_counts"] == [1, 8, 5, 0] and len(r.settings["spill"]) == 3
        assert r.hook_point == ns.hook_point and r.model == ns.model
    assert len({tuple(r.flat_indices()) for r in draws}) > 20  # draws differ
    again = random_layer_matched(ns, 7, seed=5, num_layers=4, width=8)
    assert np.array_equal(again.flat_indices(), draws[7].flat_indices())  # seeded
    other = random_layer_matched(ns, 7, seed=6, num_layers=4, width=8)
    assert not np.array_equal(other.flat_indices(), draws[7].flat_indices())


def test_layer_matched_keeps_counts_where_layers_have_room():
    ns = NeuronSet(hook_point="mlp_out", num_layers=6, width=50, layers=[0, 0, 0, 2, 5, 5],
                   indices=[1, 2, 3, 10, 0, 49], scores=np.ones(6))
    for d in range(5):
        r = random_layer_matched(ns, d, num_layers=6, width=50)
        assert np.array_equal(r.per_layer_counts(), ns.per_layer_counts()) and overlap(r, ns) == 0
        assert r.settings["spill"] == []


def test_global_draws_are_uniform_over_non_safety_neurons():
    ns = full_layer_set()
    seen = np.zeros(32, dtype=int)
    for d in range(400):
        r = random_global(ns, d, seed=1, num_layers=4, width=8)
        assert len(r) == len(ns) and overlap(r, ns) == 0
        seen[r.flat_indices()] += 1
    assert seen[ns.flat_indices()].sum() == 0
    free = np.setdiff1d(np.arange(32), ns.flat_indices())
    expected = 400 * len(ns) / len(free)  # 311 per free neuron
    assert np.all(np.abs(seen[free] - expected) < 5 * np.sqrt(expected))


def test_magnitude_control_takes_the_largest_non_safety_neurons_per_layer():
    ns = full_layer_set()
    mean_abs = np.arange(32, dtype=float).reshape(4, 8) % 8  # larger index = larger magnitude
    mean_abs[0, 3] = mean_abs[2, 7] = 100.0  # safety neurons are the largest: they must still be excluded
    m = magnitude_matched(ns, mean_abs)
    assert overlap(m, ns) == 0 and m.per_layer_counts().tolist() == [7, 0, 3, 4]
    assert m.by_layer()[0].tolist() == [0, 1, 2, 4, 5, 6, 7]  # every free neuron of layer 0
    assert m.by_layer()[2].tolist() == [1, 3, 5]
    assert m.by_layer()[3].tolist() == [4, 5, 6, 7]  # the 4 largest of layer 3
    np.testing.assert_array_equal(m.scores, mean_abs[m.layers, m.indices])
    assert m.settings["excludes_safety_neurons"] and "mean" in m.settings["magnitude"]
    with pytest.raises(UserError, match="shape"):
        magnitude_matched(ns, np.ones((4, 7)))


def test_bad_control_requests_are_user_errors():
    ns = full_layer_set()
    with pytest.raises(UserError, match="4 x 8"):
        random_layer_matched(ns, 0, num_layers=5, width=8)
    big = NeuronSet(hook_point="mlp_out", num_layers=2, width=4, layers=[0, 0, 0, 1, 1], indices=[0, 1, 2, 0, 1],
                    scores=np.ones(5))
    with pytest.raises(UserError, match="more than half"):
        random_global(big, 0, num_layers=2, width=4)


def test_rank_p_value_on_a_fixed_example():
    assert rank_p_value(0.9, [0.5, 0.95, 0.9, 0.7]) == pytest.approx(3 / 5)  # 0.95 and the tie 0.9 count
    assert rank_p_value(0.99, np.linspace(0.5, 0.98, 19)) == pytest.approx(1 / 20)  # beats all 19: the minimum
    assert rank_p_value(0.1, [0.2] * 20) == pytest.approx(1.0)
    assert rank_p_value(0.9, [0.5, float("nan"), 0.95]) == pytest.approx(2 / 3)  # NaN draws left out
    assert np.isnan(rank_p_value(float("nan"), [0.5])) and np.isnan(rank_p_value(0.5, []))


def test_overlap_counts_shared_layer_index_pairs():
    a = NeuronSet(hook_point="h", num_layers=3, width=4, layers=[0, 1, 2], indices=[1, 1, 3], scores=np.ones(3))
    b = NeuronSet(hook_point="h", num_layers=3, width=4, layers=[0, 2, 2], indices=[1, 1, 3], scores=np.ones(3))
    assert overlap(a, b) == 2 and overlap(a, a) == 3


# ----------------------------------------------------------------------------------- cluster bootstrap
def test_bootstrap_groups_from_records():
    assert bootstrap_groups([{"id": "a"}, {"id": "b"}]) is None
    g = bootstrap_groups([{"id": "a", "cluster": 3}, {"id": "b", "cluster": 3}, {"id": "c"}])
    assert g[0] == g[1] != g[2]  # a record without a cluster is its own unit


def test_cluster_bootstrap_resamples_whole_clusters():
    y = np.repeat([0, 1, 0, 1, 1, 0, 1, 0], [3, 2, 1, 4, 1, 2, 3, 2])  # 8 clusters of sizes 3,2,1,4,1,2,3,2
    groups = np.repeat([f"c{i}" for i in range(8)], [3, 2, 1, 4, 1, 2, 3, 2])
    sizes = {g: int((groups == g).sum()) for g in set(groups)}
    n_seen = 0
    for idx in _bootstrap_indices(len(y), y, 200, seed=0, groups=groups):
        n_seen += 1
        picked = {}
        for i in idx:
            picked[groups[i]] = picked.get(groups[i], 0) + 1
        for g, c in picked.items():
            assert c % sizes[g] == 0  # every pick brings the whole cluster
        rows = np.bincount(idx, minlength=len(y))
        for g in picked:  # and each member of a cluster appears equally often
            assert len(set(rows[groups == g])) == 1
        assert sum(c // sizes[g] for g, c in picked.items()) == 8  # as many clusters as there are
    assert n_seen > 150


def test_cluster_bootstrap_widens_the_ci_of_duplicated_prompts():
    rng = np.random.default_rng(0)
    y0 = np.arange(30) % 2
    s0 = y0 + rng.normal(0, 0.8, 30)
    y, s = np.repeat(y0, 5), np.repeat(s0, 5)  # every prompt present 5 times (near-duplicates)
    groups = np.repeat(np.arange(30), 5)
    lo_p, hi_p = bootstrap_ci(y, s, n_boot=400, seed=0)
    lo_c, hi_c = bootstrap_ci(y, s, n_boot=400, seed=0, groups=groups)
    lo_u, hi_u = bootstrap_ci(y0, s0, n_boot=400, seed=0)
    assert hi_c - lo_c > 1.7 * (hi_p - lo_p)  # duplicates made the prompt bootstrap overconfident
    assert hi_c - lo_c == pytest.approx(hi_u - lo_u, rel=0.3)  # clusters recover the de-duplicated width
    d = paired_bootstrap_diff(y, s, s[::-1].copy(), n_boot=50, seed=0, groups=groups)
    assert d["unit"] == "cluster" and d["n_units"] == 30


def test_paired_bootstrap_resamples_the_control_draws():
    y = np.arange(40) % 2
    perfect = y.astype(float)
    draws = [perfect, 1.0 - perfect]  # AUROC 1 and 0 on every prompt resample
    d = paired_bootstrap_diff(y, perfect, draws, n_boot=300, seed=0)
    assert d["diff"] == pytest.approx(0.5) and d["draws_resampled"]
    assert d["ci"] == [0.0, 1.0]  # the mean over resampled draws ranges over {1, 0.5, 0}
    assert auroc(y, perfect) == 1.0
    one = paired_bootstrap_diff(y, perfect, [perfect * 0.5 + 0.25], n_boot=50, seed=0)
    assert one["ci"] == [0.0, 0.0] and not one["draws_resampled"]


# ------------------------------------------------------------------------------- change-matched control
def change_matrix(num_layers: int, width: int, seed: int = 0) -> np.ndarray:
    """Distinct change scores: a random permutation per layer, so every rank is a different neuron."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(width).astype(float) + 1.0 for _ in range(num_layers)])


def test_change_matched_draws_from_the_band_just_below_the_safety_set_in_each_layer():
    from safetyneurons.neurons.controls import BAND, change_matched, control_sets, describe_control
    from safetyneurons.neurons.selection import select

    change = change_matrix(3, 40)
    change[2] *= 0.1  # layer 2 changed little: the global top picks few or none there
    safety = select(change, top_n=12, hook_point="mlp_out")
    counts = safety.per_layer_counts()
    assert counts.sum() == 12
    draws = [change_matched(safety, change, d, seed=1) for d in range(25)]
    for r in draws:
        assert overlap(r, safety) == 0 and np.array_equal(r.per_layer_counts(), counts)
        for layer in np.flatnonzero(counts):
            order = np.argsort(-change[layer], kind="stable")  # every neuron of the layer by change score
            c = int(counts[layer])
            band = set(order[c:c + int(np.ceil(BAND * c))].tolist())  # the next BAND x c below the safety set
            assert set(r.indices[r.layers == layer].tolist()) <= band
        ratio = r.settings["change_ratio"]
        assert ratio == pytest.approx(change[r.layers, r.indices].sum() / change[safety.layers, safety.indices].sum())
        assert 0 < ratio < 1 and r.settings["saturated_layers"] == []
    assert len({tuple(r.flat_indices()) for r in draws}) > 10  # draws differ ...
    again = change_matched(safety, change, 3, seed=1)
    assert np.array_equal(again.flat_indices(), draws[3].flat_indices())  # ... and are seeded
    # a uniform layer-matched draw changes far less than the band just below the safety set
    uniform = np.mean([change[r.layers, r.indices].sum() for r in
                       (random_layer_matched(safety, d, num_layers=3, width=40) for d in range(25))])
    assert np.mean([change[r.layers, r.indices].sum() for r in draws]) > 1.4 * uniform
    via = control_sets("change_matched", safety, 4, seed=1, change=change)
    assert [tuple(v.flat_indices()) for v in via] == [tuple(d.flat_indices()) for d in draws[:4]]
    info = describe_control("change_matched", via)
    assert info["draws"] == 4 and info["saturated_layers"] == [] and len(info["change_ratio"]) == 4
    with pytest.raises(UserError, match="change score"):
        control_sets("change_matched", safety, 2)


def test_change_matched_names_saturated_layers_and_never_spills():
    from safetyneurons.neurons.controls import change_matched, matched_part, saturated_layers

    ns = full_layer_set()  # layer 1 holds all 8 neurons, layer 2 holds 5 of 8: both saturated
    assert saturated_layers(ns) == [1, 2]
    part = matched_part(ns)
    assert part.per_layer_counts().tolist() == [1, 0, 0, 0]
    assert part.settings["saturated_layers"] == [1, 2] and part.settings["left_out"] == 13
    change = change_matrix(4, 8)
    for d in range(10):
        r = change_matched(ns, change, d)
        assert r.per_layer_counts().tolist() == [1, 0, 0, 0]  # no spill into layers 0 or 3
        assert r.settings["saturated_layers"] == [1, 2] and "saturated" in r.settings["saturation_rule"]
        assert overlap(r, ns) == 0
    unsaturated = NeuronSet(hook_point="mlp_out", num_layers=2, width=8, layers=[0, 0], indices=[1, 2],
                            scores=np.ones(2))
    assert matched_part(unsaturated) is unsaturated
    everything = NeuronSet(hook_point="mlp_out", num_layers=2, width=4, layers=[0, 0, 0, 0], indices=[0, 1, 2, 3],
                           scores=np.ones(4))
    with pytest.raises(UserError, match="saturated"):
        matched_part(everything)
    with pytest.raises(UserError, match="shape"):
        change_matched(ns, np.ones((3, 8)), 0)
