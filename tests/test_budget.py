"""The guard's layer budget (safetyneurons.probes.budget): chosen on validation data, with a planted early-layer signal."""

from __future__ import annotations

import numpy as np
import pytest

from safetyneurons.probes.budget import (AUTO, budget_curve, check_guard_max_layer, choose_budget, guard_neuron_set)
from safetyneurons.errors import UserError
from safetyneurons.neurons.selection import NeuronSet

LAYERS, WIDTH, K = 6, 10, 5
SIGNAL_LAYERS = (1, 2)  # only these layers' neurons carry the label


class _Store:
    """The two things a budget curve reads from a store: labels and the selected feature columns."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.labels = np.arange(n) % 2
        self.features = rng.normal(size=(n, LAYERS * WIDTH))
        for layer in SIGNAL_LAYERS:
            self.features[:, layer * WIDTH:(layer + 1) * WIDTH] += 2.5 * self.labels[:, None]

    def select(self, ns: NeuronSet) -> np.ndarray:
        return self.features[:, ns.flat_indices()]

    def __len__(self) -> int:
        return len(self.labels)


def select_at(max_layer):
    """The top K neurons among layers 0..max_layer by a score that grows with depth: the deepest layers win."""
    top = LAYERS - 1 if max_layer is None else max_layer
    if (top + 1) * WIDTH < K:
        raise UserError("too few neurons")
    idx = np.arange(K)
    return NeuronSet("mlp_out", LAYERS, WIDTH, np.full(K, top), idx, np.arange(K, 0, -1, dtype=float))


def test_the_budget_is_chosen_on_validation_and_finds_the_planted_early_layer():
    train, val = _Store(120, 0), _Store(80, 1)
    curve = budget_curve(select_at, train, val, "logreg", seed=0)
    assert [r["max_layer"] for r in curve] == [0, 1, 2, 3, 4, None]  # every budget below the full set's layer
    by = {r["max_layer"]: r["val_auroc"] for r in curve}
    assert by[1] > 0.95 and by[2] > 0.95 and by[None] < 0.75 and by[0] < 0.75  # the planted layers, not the rest
    pick = choose_budget(curve, tolerance=0.005)
    assert pick["max_layer"] == 1 and pick["deepest_layer"] == 1  # the smallest budget near the best
    ns, info = guard_neuron_set(select_at, AUTO, train, val, "logreg")
    assert ns.deepest_layer == 1 and info["max_layer"] == 1 and info["curve"] == curve
    assert "validation" in info["rule"]


def test_the_rule_takes_the_smallest_budget_within_the_tolerance_of_the_best():
    curve = [{"max_layer": 3, "deepest_layer": 3, "neurons": 5, "val_auroc": 0.90},
             {"max_layer": 5, "deepest_layer": 5, "neurons": 5, "val_auroc": 0.996},
             {"max_layer": 8, "deepest_layer": 8, "neurons": 5, "val_auroc": 0.999},
             {"max_layer": None, "deepest_layer": 9, "neurons": 5, "val_auroc": 0.98}]
    assert choose_budget(curve, 0.005)["max_layer"] == 5
    assert choose_budget(curve, 0.0)["max_layer"] == 8
    assert choose_budget(curve, 0.2)["max_layer"] == 3
    with pytest.raises(UserError):
        choose_budget([], 0.005)


def test_fixed_and_absent_budgets_and_bad_settings():
    train = _Store(40, 2)
    ns, info = guard_neuron_set(select_at, 3, train, None, "logreg")
    assert ns.deepest_layer == 3 and info["rule"] == "given"
    ns, info = guard_neuron_set(select_at, None, train, None, "logreg")
    assert ns.deepest_layer == LAYERS - 1 and info["max_layer"] is None
    ns, info = guard_neuron_set(select_at, AUTO, train, None, "logreg")  # no validation split: no budget
    assert ns.deepest_layer == LAYERS - 1 and "no validation split" in info["rule"]
    assert check_guard_max_layer("none") is None and check_guard_max_layer("AUTO") == AUTO
    assert check_guard_max_layer("7") == 7
    for bad in ("deep", -1, True, 2.5):
        with pytest.raises(UserError, match="guard-max-layer"):
            check_guard_max_layer(bad)
    with pytest.raises(UserError, match="past the model's last layer"):
        check_guard_max_layer(30, num_layers=30)


def test_budget_section_renders_figures_it_does_not_have():
    """Without a bootstrap (--bootstrap 0) the guard probe has no AUROC CI: the report says n/a, it does not crash."""
    from safetyneurons.probes.report import render_guard_budget

    md = render_guard_budget({"max_layer": 3, "deepest_layer": 3, "rule": "r", "curve": [],
                              "test_metrics": {"accuracy": 0.9, "auroc": 0.95, "auroc_ci": [None, None]}})
    assert "accuracy 0.900, AUROC 0.9500 [n/a, n/a]" in md
    md = render_guard_budget({"max_layer": 3, "deepest_layer": 3, "rule": "r", "test_metrics": {"accuracy": None}})
    assert "accuracy n/a, AUROC n/a [n/a, n/a]" in md
