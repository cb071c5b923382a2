"""The neuron sets a patching run patches: the top k% by change score, checked against the model, and random controls."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from safetyneurons.errors import UserError
from safetyneurons.model.hooks import check_hook_point, hook_width, num_layers
from safetyneurons.model.pair import LoadedModel
from safetyneurons.neurons.contrast import ChangeScores
from safetyneurons.neurons.controls import random_layer_matched
from safetyneurons.neurons.selection import NeuronSet, check_neuron_set_matches, count_for_percent, select

MAX_K = 50.0  # a control set of the same size that avoids the safety set must exist


# ------------------------------------------------------------------------------------ neuron sets
def check_neuron_set(neuron_set: NeuronSet, lm: LoadedModel, hook_point: str | None = None,
                     same_weights: bool = True) -> None:
    """The set must fit ``lm`` at the hook point (and, with ``same_weights``, come from its weights when known)."""
    hook_point = hook_point or neuron_set.hook_point
    check_hook_point(hook_point)
    check_neuron_set_matches(neuron_set, hook_point=hook_point, num_layers=num_layers(lm.model),
                             width=hook_width(lm.model, hook_point),
                             fingerprint=lm.fingerprint if same_weights else "", what=f"model {lm.ref}")


def check_k(k: Sequence[float] | float) -> tuple[float, ...]:
    values = (k,) if isinstance(k, (int, float)) else tuple(k)
    if not values:
        raise UserError("Give at least one k (percent of neurons), e.g. --k 5.")
    out = []
    for v in values:
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise UserError(f"k must be a percentage of the neurons, got {v!r}.") from None
        if not (0.0 < v <= MAX_K):
            raise UserError(f"k = {v:g}% is out of range: give a percentage in (0, {MAX_K:g}] (a random control "
                            f"set of the same size must fit outside the safety set).")
        out.append(v)
    return tuple(sorted(set(out)))


def top_k_set(source: ChangeScores | NeuronSet, k: float) -> NeuronSet:
    """The top ``k``% of all neurons by change score, from change scores or from a (larger) neuron set."""
    if isinstance(source, NeuronSet):
        total = source.num_layers * source.width
        n = count_for_percent(k, total)
        if n > len(source):
            raise UserError(f"k = {k:g}% needs {n} neurons but the neuron set holds only {len(source)} "
                            f"({100 * len(source) / total:.3g}%). Give the change scores (--scores) for larger k.")
        order = np.lexsort((source.indices, source.layers, -source.scores))[:n]
        return NeuronSet(source.hook_point, source.num_layers, source.width, source.layers[order],
                         source.indices[order], source.scores[order], model=source.model,
                         settings={**source.settings, "top_percent": k, "selected": n})
    return select(source, top_percent=k)


def random_controls(safety: NeuronSet, draws: int, seed: int = 0) -> list[NeuronSet]:
    """``draws`` random layer-matched sets (same count per layer, never a safety neuron; see ``controls``)."""
    return [random_layer_matched(safety, d, seed, num_layers=safety.num_layers, width=safety.width)
            for d in range(draws)]
