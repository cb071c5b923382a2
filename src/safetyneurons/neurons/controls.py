"""Control neuron sets for the safety neurons, and the statistics that compare the safety set with them.

A control answers "would *any* neurons like these do as well?". Every control has exactly as many neurons
as the safety set and **never contains a safety neuron** (the overlap is recorded and must be 0):

- :func:`random_layer_matched`: uniform random neurons with the same count per layer as the safety set.
  A layer whose non-safety neurons cannot cover its count (the safety set fills most of it) keeps all of
  them and the rest *spills* to the nearest layers with room: by distance ``|layer - l|``, ties to the
  lower layer first, each taking as many as it can spare (several full layers: the lowest spills first). The spill depends only on the safety set's
  counts, so every draw has the same per-layer counts; they and the spill are recorded in the set's
  ``settings``.
- :func:`random_global`: uniform random neurons over every non-safety neuron at the hook point.
- :func:`change_matched`: random non-safety neurons with the same count per layer *and* about the same change
  score: in each layer they are drawn from the band of :data:`BAND` x count neurons ranked just below the
  safety neurons by change score. It separates "these neurons" from "neurons changed this much". A layer whose
  non-safety neurons cannot hold its count (:func:`saturated_layers`) cannot be matched: the control leaves it
  out and never spills, and it is compared with :func:`matched_part`, the safety set without those layers
  (its settings name the layers). The ratio of its summed change score to the matched part's is recorded
  (``change_ratio``; matched when at least ``1 - CHANGE_TOLERANCE``).
- :func:`magnitude_matched`: the non-safety neurons with the largest mean |activation|, with the same
  per-layer counts (and spill) as the layer-matched control. It separates "changed by alignment" from
  "large". The mean |activation| given to it comes from :func:`mean_abs_activation`: the mean over the
  training store's prompts of the absolute *pooled* activation (pooled as the store pools), read from the
  model the probes read (the base model by default).

Draws are seeded by ``(seed, draw)``: the same arguments give the same set on every machine.

Statistics: :func:`overlap` counts shared (layer, index) neurons; :func:`rank_p_value` is the empirical
rank p-value of the safety set's metric among the draws, ``(1 + #{draws >= safety}) / (1 + n_draws)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from safetyneurons._io import sha256_json
from safetyneurons.errors import UserError
from safetyneurons.neurons.selection import NeuronSet

if TYPE_CHECKING:
    from safetyneurons.activations.store import Store

CONTROLS = ("random", "random_global", "magnitude")  # feature-set names of the neuron controls
DRAWN_CONTROLS = ("random", "random_global", "change_matched")  # controls with seeded random draws
CHANGE_CONTROLS = ("change_matched",)  # controls that need every neuron's change score (control_sets(change=...))
BAND = 2.0  # change_matched: draw each layer's count from the next BAND x count neurons by change score
CHANGE_TOLERANCE = 0.25  # change_matched: matched when its summed change score is at least 75% of the set's
SATURATION_RULE = ("a layer is saturated when its non-safety neurons are fewer than its safety neurons (no "
                   "disjoint draw of the same count fits in it); the change-matched control leaves saturated "
                   "layers out (no spill) and is compared with the safety set without them")
SPILL_RULE = ("full layers from the lowest up; each spills to the nearest layer with room first (by |layer "
              "distance|), ties: the lower layer first")
MAGNITUDE_SOURCE = ("mean over the training prompts of |pooled activation| (the store's pooling) in the model the "
                    "probes read (the base model by default)")
_TAGS = {"random": 7919, "random_global": 104729, "change_matched": 1299709}


def _check_dims(neuron_set: NeuronSet, num_layers: int, width: int) -> None:
    if (int(num_layers), int(width)) != (neuron_set.num_layers, neuron_set.width):
        raise UserError(f"The control is asked for {num_layers} layers x {width} neurons, but the safety set was "
                        f"found on {neuron_set.num_layers} x {neuron_set.width}. Use the model and hook point the "
                        f"safety neurons come from.")
    total = neuron_set.num_layers * neuron_set.width
    if 2 * len(neuron_set) > total:
        raise UserError(f"The safety set holds {len(neuron_set)} of {total} neurons (more than half): no control of "
                        f"the same size can avoid it. Select fewer safety neurons (--top-percent).")


def layer_matched_counts(neuron_set: NeuronSet) -> tuple[np.ndarray, list[dict]]:
    """Per-layer counts of a control that matches ``neuron_set`` layer by layer without using its neurons.

    Returns (counts [num_layers], spill) where spill lists ``{"from_layer", "to_layer", "count"}`` for the
    neurons a full layer hands to its nearest layers (:data:`SPILL_RULE`).
    """
    _check_dims(neuron_set, neuron_set.num_layers, neuron_set.width)
    target = neuron_set.per_layer_counts()
    free = neuron_set.width - target  # non-safety neurons per layer
    counts = np.minimum(target, free)
    room = free - counts
    spill: list[dict] = []
    for layer in np.flatnonzero(target > free):
        need = int(target[layer] - free[layer])
        others = sorted((l for l in range(neuron_set.num_layers) if l != layer), key=lambda l: (abs(l - layer), l))
        for other in others:
            take = int(min(need, room[other]))
            if take:
                counts[other] += take
                room[other] -= take
                need -= take
                spill.append({"from_layer": int(layer), "to_layer": int(other), "count": take})
            if not need:
                break
    return counts.astype(np.int64), spill


def _control_set(neuron_set: NeuronSet, layers, indices, scores, settings: dict) -> NeuronSet:
    out = NeuronSet(hook_point=neuron_set.hook_point, num_layers=neuron_set.num_layers, width=neuron_set.width,
                    layers=layers, indices=indices, scores=scores, model=neuron_set.model)
    out.settings = {**settings, "control_of": sha256_json(neuron_set.to_json()),
                    "safety_per_layer_counts": neuron_set.per_layer_counts().tolist(),
                    "per_layer_counts": out.per_layer_counts().tolist(),
                    "overlap_with_safety": overlap(out, neuron_set)}
    if out.settings["overlap_with_safety"] or len(out) != len(neuron_set):  # pragma: no cover - by construction
        raise AssertionError("a control set must have the safety set's size and no safety neuron")
    return out


def _free_in_layer(neuron_set: NeuronSet, layer: int) -> np.ndarray:
    return np.setdiff1d(np.arange(neuron_set.width), neuron_set.indices[neuron_set.layers == layer])


def random_layer_matched(neuron_set: NeuronSet, draw: int, seed: int = 0, *, num_layers: int,
                         width: int) -> NeuronSet:
    """Random non-safety neurons with the safety set's per-layer counts (spilling to the nearest layers
    where a layer has too few non-safety neurons); draw ``draw`` of the seeded sequence ``seed``."""
    _check_dims(neuron_set, num_layers, width)
    counts, spill = layer_matched_counts(neuron_set)
    rng = np.random.default_rng([int(seed), int(draw), _TAGS["random"]])
    layers, indices = [], []
    for layer in np.flatnonzero(counts):
        chosen = rng.choice(_free_in_layer(neuron_set, int(layer)), size=int(counts[layer]), replace=False)
        layers += [int(layer)] * len(chosen)
        indices += chosen.tolist()
    return _control_set(neuron_set, layers, indices, np.zeros(len(layers)),
                        {"control": "random_layer_matched", "seed": int(seed), "draw": int(draw), "spill": spill,
                         "spill_rule": SPILL_RULE})


def random_global(neuron_set: NeuronSet, draw: int, seed: int = 0, *, num_layers: int, width: int) -> NeuronSet:
    """Uniform random neurons over every non-safety neuron at the hook point (same count as the set)."""
    _check_dims(neuron_set, num_layers, width)
    rng = np.random.default_rng([int(seed), int(draw), _TAGS["random_global"]])
    pool = np.setdiff1d(np.arange(num_layers * width), neuron_set.flat_indices())
    flat = rng.choice(pool, size=len(neuron_set), replace=False)
    return _control_set(neuron_set, flat // width, flat % width, np.zeros(len(flat)),
                        {"control": "random_global", "seed": int(seed), "draw": int(draw)})


def saturated_layers(neuron_set: NeuronSet) -> list[int]:
    """Layers whose non-safety neurons are fewer than the safety set's count there (:data:`SATURATION_RULE`)."""
    counts = neuron_set.per_layer_counts()
    return [int(layer) for layer in np.flatnonzero(counts > neuron_set.width - counts)]


def matched_part(neuron_set: NeuronSet) -> NeuronSet:
    """The safety set without its saturated layers: what a change-matched control is compared with.

    Its settings name the saturated layers and how many neurons left with them; the set itself when none is."""
    full = saturated_layers(neuron_set)
    if not full:
        return neuron_set
    keep = ~np.isin(neuron_set.layers, full)
    if not keep.any():
        raise UserError(f"Every layer of the safety set is saturated (layers {full}): no change-matched control "
                        f"exists. Select fewer safety neurons (a smaller k).")
    out = NeuronSet(neuron_set.hook_point, neuron_set.num_layers, neuron_set.width, neuron_set.layers[keep],
                    neuron_set.indices[keep], neuron_set.scores[keep], model=neuron_set.model)
    out.settings = {**neuron_set.settings, "matched_part_of": sha256_json(neuron_set.to_json()),
                    "saturated_layers": full, "left_out": int((~keep).sum()), "saturation_rule": SATURATION_RULE}
    return out


def _check_change(neuron_set: NeuronSet, change) -> np.ndarray:
    change = np.asarray(change, dtype=np.float64)
    if change.shape != (neuron_set.num_layers, neuron_set.width):
        raise UserError(f"Change scores have shape {change.shape}, expected [{neuron_set.num_layers}, "
                        f"{neuron_set.width}] (layers x neurons at {neuron_set.hook_point}). Give the change scores "
                        f"the safety set was selected from.")
    if not np.isfinite(change).all():
        raise UserError("Change scores contain NaN or infinite values; recompute them (safetyneurons contrast).")
    return change


def change_matched(neuron_set: NeuronSet, change: np.ndarray, draw: int, seed: int = 0, *,
                   band: float = BAND) -> NeuronSet:
    """Random non-safety neurons with the safety set's per-layer counts, each layer's drawn uniformly from the
    ``band`` x count non-safety neurons ranked just below it by change score (ties: the lower index first).

    Saturated layers (:func:`saturated_layers`) are left out, never spilled: the control matches
    :func:`matched_part` of the set, and its settings say so. Scores = change scores."""
    change = _check_change(neuron_set, change)
    part = matched_part(neuron_set)
    rng = np.random.default_rng([int(seed), int(draw), _TAGS["change_matched"]])
    layers, indices = [], []
    for layer, count in enumerate(part.per_layer_counts().tolist()):
        if not count:
            continue
        free = _free_in_layer(part, layer)
        ranked = free[np.argsort(-change[layer, free], kind="stable")]
        pool = ranked[:max(count, min(len(ranked), int(np.ceil(band * count))))]
        layers += [layer] * count
        indices += rng.choice(pool, size=count, replace=False).tolist()
    layers, indices = np.asarray(layers, dtype=np.int64), np.asarray(indices, dtype=np.int64)
    target = float(change[part.layers, part.indices].sum())
    got = float(change[layers, indices].sum())
    ratio = got / target if target > 0 else float("nan")
    out = _control_set(part, layers, indices, change[layers, indices],
                       {"control": "change_matched", "seed": int(seed), "draw": int(draw), "band": float(band),
                        "change_sum": got, "safety_change_sum": target, "change_ratio": ratio,
                        "change_matched": bool(np.isfinite(ratio) and ratio >= 1 - CHANGE_TOLERANCE),
                        "saturated_layers": saturated_layers(neuron_set), "saturation_rule": SATURATION_RULE})
    return out


def magnitude_matched(neuron_set: NeuronSet, mean_abs: np.ndarray) -> NeuronSet:
    """The non-safety neurons with the largest mean |activation| (``mean_abs`` [num_layers, width]), with
    the layer-matched control's per-layer counts. Ties: the lower index first. Scores = mean |activation|."""
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    if mean_abs.shape != (neuron_set.num_layers, neuron_set.width):
        raise UserError(f"Mean |activation| has shape {mean_abs.shape}, expected [{neuron_set.num_layers}, "
                        f"{neuron_set.width}] (layers x neurons at {neuron_set.hook_point}).")
    if not np.isfinite(mean_abs).all():
        raise UserError("Mean |activation| contains NaN or infinite values; re-extract the store.")
    counts, spill = layer_matched_counts(neuron_set)
    layers, indices = [], []
    for layer in np.flatnonzero(counts):
        free = _free_in_layer(neuron_set, int(layer))
        top = free[np.argsort(-mean_abs[layer, free], kind="stable")[: int(counts[layer])]]
        layers += [int(layer)] * len(top)
        indices += top.tolist()
    layers, indices = np.asarray(layers, dtype=np.int64), np.asarray(indices, dtype=np.int64)
    return _control_set(neuron_set, layers, indices, mean_abs[layers, indices],
                        {"control": "magnitude_matched", "spill": spill, "spill_rule": SPILL_RULE,
                         "excludes_safety_neurons": True, "magnitude": MAGNITUDE_SOURCE})


def mean_abs_activation(store: Store) -> np.ndarray:
    """Mean over the store's prompts of the absolute pooled activation, as [num_layers, width] float64.

    Needs an all-neurons store (extracted without ``--neurons``)."""
    if store.layout != "all":
        raise UserError(f"The magnitude control needs every neuron's activation, but store {store.path} was "
                        f"extracted with a neuron set. Re-extract without --neurons.")
    total = np.zeros(store.features.shape[1], dtype=np.float64)
    for start in range(0, len(store.features), 256):  # float64 sums without a full float64 copy
        total += np.abs(store.features[start:start + 256], dtype=np.float64).sum(0)
    return (total / max(len(store.features), 1)).reshape(store.num_layers, store.width)


def control_sets(kind: str, neuron_set: NeuronSet, draws: int, seed: int = 0,
                 mean_abs: np.ndarray | None = None, change: np.ndarray | None = None) -> list[NeuronSet]:
    """The neuron sets of one control: ``draws`` seeded draws, or the single magnitude-matched set.

    ``change_matched`` needs ``change`` (every neuron's change score, [num_layers, width]); its draws match
    :func:`matched_part` of the set (saturated layers left out, named in each draw's settings)."""
    if kind == "change_matched":
        if change is None:
            raise UserError("The change-matched control needs every neuron's change score (the contrast output).")
        return [change_matched(neuron_set, change, d, seed) for d in range(int(draws))]
    if kind == "magnitude":
        if mean_abs is None:
            raise UserError("The magnitude control needs the mean |activation| of every neuron.")
        return [magnitude_matched(neuron_set, mean_abs)]
    make = {"random": random_layer_matched, "random_global": random_global}.get(kind)
    if make is None:
        raise UserError(f"Unknown control {kind!r}. Choose from: {', '.join(CONTROLS + CHANGE_CONTROLS)}.")
    return [make(neuron_set, d, seed, num_layers=neuron_set.num_layers, width=neuron_set.width)
            for d in range(int(draws))]


def describe_control(kind: str, sets: Sequence[NeuronSet]) -> dict:
    """Report entry of one control: draw count, per-layer counts (mean over draws), spill, overlaps."""
    counts = np.array([s.per_layer_counts() for s in sets], dtype=np.float64)
    first = sets[0].settings
    out = {"control": kind, "draws": len(sets) if kind in DRAWN_CONTROLS else 0, "count": len(sets[0]),
           "per_layer_counts": counts.mean(0).tolist(), "safety_per_layer_counts": first["safety_per_layer_counts"],
           "overlap_with_safety": [int(s.settings["overlap_with_safety"]) for s in sets]}
    out["max_overlap_with_safety"] = max(out["overlap_with_safety"])
    if "spill" in first:
        out["spill"], out["spill_rule"] = first["spill"], first["spill_rule"]
    if kind == "magnitude":
        out["magnitude"] = first["magnitude"]
    if kind == "change_matched":
        out["saturated_layers"], out["saturation_rule"] = first["saturated_layers"], first["saturation_rule"]
        out["change_ratio"] = [float(s.settings["change_ratio"]) for s in sets]
    return out


def overlap(a: NeuronSet, b: NeuronSet) -> int:
    """Number of neurons (same layer and index) that two sets share."""
    pa = set(zip(a.layers.tolist(), a.indices.tolist()))
    return len(pa.intersection(zip(b.layers.tolist(), b.indices.tolist())))


def rank_p_value(safety: float, draws: Sequence[float]) -> float:
    """Empirical rank p-value of ``safety`` among control ``draws``: ``(1 + #{draw >= safety}) / (1 + n)``.

    NaN draws are left out (n counts the finite ones); NaN when ``safety`` is NaN or there are no draws.
    """
    d = np.asarray(draws, dtype=np.float64)
    d = d[np.isfinite(d)]
    if not np.isfinite(safety) or len(d) == 0:
        return float("nan")
    return float((1 + int((d >= safety).sum())) / (1 + len(d)))
