"""Layer budget of the guard: an earlier exit, chosen on validation data when asked for.

The guard runs the model only up to its deepest safety neuron (early exit). By default it reads the safety set as
it is (no budget: the validation split cannot see what an earlier exit costs on other sources, see
docs/guard_quality.md). A **layer budget** L keeps the same
number of safety neurons but picks them among layers 0..L only (:func:`safetyneurons.probes.variants.select_variant`
with ``max_layer``), so the guard stops after layer L. :func:`budget_curve` fits the guard's classifier on the
training store for every budget and scores the validation store; :func:`choose_budget` takes the **smallest
budget whose validation AUROC is within ``tolerance`` (0.005) of the best budget's** (the unconstrained set is one
of the candidates). Test and held-out data are never looked at, so the test and held-out figures of the chosen
guard stay honest. ``benchmarks/bench_quality.py --curve`` draws the same curve on test and held-out data, with
latency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from safetyneurons.errors import UserError
from safetyneurons.probes.metrics import auroc
from safetyneurons.probes.probe import Probe

if TYPE_CHECKING:
    from safetyneurons.neurons.selection import NeuronSet
    from safetyneurons.activations.store import Store

DEFAULT_TOLERANCE = 0.005
AUTO = "auto"
RULE = ("smallest layer budget whose validation AUROC is within {tol:g} of the best budget's (the unconstrained "
        "set included); the guard's classifier fitted on the training split for each budget")


def check_guard_max_layer(value: str | int | None, num_layers: int | None = None) -> str | int | None:
    """``auto``, ``None`` (no budget) or a layer index (``none``/``auto`` as text from the CLI)."""
    if value is None or value == AUTO:
        return value
    if isinstance(value, str):
        if value.strip().lower() == "none":
            return None
        if value.strip().lower() == AUTO:
            return AUTO
        try:
            value = int(value)
        except ValueError:
            raise UserError(f"--guard-max-layer must be auto, none or a layer index, got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"--guard-max-layer must be auto, none or a layer index >= 0, got {value!r}.")
    if num_layers is not None and value >= num_layers:
        raise UserError(f"--guard-max-layer {value} is past the model's last layer ({num_layers - 1}).")
    return value


def budget_curve(select_at: Callable[[int | None], "NeuronSet"], train: "Store", val: "Store", classifier: str,
                 seed: int = 0, budgets: list[int] | None = None) -> list[dict]:
    """Validation AUROC of the guard's probe for each layer budget (``select_at(L)`` gives the set; ``None``: no
    budget). Budgets default to every layer below the unconstrained set's deepest layer; budgets whose layers hold
    too few neurons for the count are left out. Rows: max_layer (None = unconstrained), deepest_layer, neurons,
    val_auroc."""
    full = select_at(None)
    if budgets is None:
        budgets = list(range(full.deepest_layer))
    y_train, y_val = np.asarray(train.labels), np.asarray(val.labels)
    rows = []
    for budget in [*sorted(b for b in budgets if b < full.deepest_layer), None]:
        try:
            ns = full if budget is None else select_at(budget)
        except UserError:  # layers 0..budget hold fewer neurons than the count
            continue
        probe = Probe(classifier, seed=seed).fit(train.select(ns), y_train)
        rows.append({"max_layer": budget, "deepest_layer": int(ns.deepest_layer), "neurons": len(ns),
                     "val_auroc": float(auroc(y_val, probe.unsafe_probability(val.select(ns))))})
    return rows


def choose_budget(curve: list[dict], tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """The row of the smallest budget whose validation AUROC is >= the best row's minus ``tolerance``."""
    if not curve:
        raise UserError("No layer budget could be scored: the validation split is empty or too small.")
    best = max(r["val_auroc"] for r in curve)
    ok = [r for r in curve if r["val_auroc"] >= best - tolerance]
    return min(ok, key=lambda r: r["deepest_layer"])


def guard_neuron_set(select_at: Callable[[int | None], "NeuronSet"], setting: str | int | None, train: "Store",
                     val: "Store | None", classifier: str, seed: int = 0,
                     tolerance: float = DEFAULT_TOLERANCE) -> tuple["NeuronSet", dict]:
    """The guard's neuron set under ``setting`` (``auto``: :func:`choose_budget` on the validation split; a layer
    index; ``None``: no budget) and a JSON-ready record of how it was chosen."""
    setting = check_guard_max_layer(setting)
    if setting is None or (setting == AUTO and val is None):
        why = "no budget asked for" if setting is None else "no validation split to choose a budget on"
        ns = select_at(None)
        return ns, {"setting": setting, "max_layer": None, "deepest_layer": int(ns.deepest_layer),
                    "neurons": len(ns), "rule": why}
    if setting != AUTO:
        ns = select_at(setting)
        return ns, {"setting": setting, "max_layer": setting, "deepest_layer": int(ns.deepest_layer),
                    "rule": "given"}
    curve = budget_curve(select_at, train, val, classifier, seed)
    pick = choose_budget(curve, tolerance)
    ns = select_at(pick["max_layer"])
    return ns, {"setting": AUTO, "max_layer": pick["max_layer"], "deepest_layer": pick["deepest_layer"],
                "rule": RULE.format(tol=tolerance), "tolerance": tolerance, "classifier": classifier,
                "validation_prompts": len(val), "curve": curve}
