"""Selection variants: three ways to turn change scores into safety neurons, and how they compare.

- ``rms`` (the paper, Chen et al. 2025): rank by the change score RMS(a_base - a_aligned) on harmful prompts.
- ``relative``: rank by RMS(a_base - a_aligned) / RMS(a_base) over the same tokens, so a neuron that is simply
  large (a big activation that moves a little in absolute terms) does not win over one that alignment
  changed a lot relative to its own scale. The base RMS is floored at 1% of its median over all neurons, so
  neurons that are (almost) silent in the base model do not get an unbounded ratio.
- ``harmful_minus_benign``: contrast the benign part of the contrast split too, and keep only the neurons
  whose harmful change **clearly exceeds** their benign change: with ``m_p`` a prompt's mean squared change
  over its tokens, a one-sided Welch t-statistic of the harmful prompts' ``m_p`` against the benign prompts'
  ``m_p`` of at least ``CLEAR_T`` = 3.0 (about p < 0.002 per neuron under normality, before any correction
  for the number of neurons). Eligible neurons are ranked by RMS_harmful - RMS_benign. Neurons that change as
  much on benign prompts are generic fine-tuning drift, not safety. If fewer neurons are eligible than the
  requested count, the set holds only the eligible ones (the report says how many).

:func:`compare_variants` gives, for each variant, the per-layer counts and the Jaccard overlap with the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from safetyneurons.probes.compare import compare_feature_sets
from safetyneurons.errors import UserError
from safetyneurons.neurons.selection import NeuronSet, count_for_percent, select

if TYPE_CHECKING:
    from safetyneurons.neurons.contrast import ChangeScores
    from safetyneurons.activations.store import Store

VARIANTS: dict[str, str] = {
    "rms": "RMS of the activation change on harmful prompts (the paper)",
    "relative": "RMS(change) / RMS(base activation), base RMS floored at 1% of its median",
    "harmful_minus_benign": "RMS_harmful - RMS_benign among neurons whose harmful change clearly exceeds the benign "
                            "one (one-sided Welch t >= 3 on per-prompt mean squared change)",
}
CLEAR_T = 3.0
BASE_FLOOR = 0.01  # fraction of the median base RMS


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise UserError(f"Unknown selection variant {variant!r}. Choose one of: {', '.join(VARIANTS)}.")
    return variant


def _need(scores, attr: str, what: str) -> np.ndarray:
    value = getattr(scores, attr, None)
    if value is None:
        raise UserError(f"The {what} variant needs change scores that record {attr}; they were saved by an older "
                        f"safetyneurons. Re-run `safetyneurons contrast`.")
    return np.asarray(value, dtype=np.float64)


def relative_scores(harmful: ChangeScores) -> np.ndarray:
    """RMS(change) / max(RMS(base activation), 1% of its median), [num_layers, width]."""
    base_rms = np.sqrt(_need(harmful, "base_sum_sq", "relative") / max(harmful.token_count, 1))
    floor = BASE_FLOOR * float(np.median(base_rms))
    return harmful.scores / np.maximum(base_rms, floor if floor > 0 else np.finfo(float).tiny)


def welch_t(harmful: ChangeScores, benign: ChangeScores) -> np.ndarray:
    """One-sided Welch t-statistic, per neuron, of harmful vs benign per-prompt mean squared change."""
    stats = []
    for s, what in ((harmful, "harmful"), (benign, "benign")):
        n = int(getattr(s, "prompt_n", 0) or 0)
        if n < 2:
            raise UserError(f"The harmful_minus_benign variant needs at least 2 {what} prompts with tokens, got {n}.")
        total = _need(s, "prompt_ms_sum", "harmful_minus_benign")
        total_sq = _need(s, "prompt_ms_sumsq", "harmful_minus_benign")
        mean = total / n
        var = np.maximum(total_sq / n - mean ** 2, 0.0) * n / (n - 1)
        stats.append((mean, var, n))
    (mh, vh, nh), (mb, vb, nb) = stats
    se = np.sqrt(vh / nh + vb / nb)
    diff = mh - mb
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff > 0, np.inf, 0.0))
    return t


def variant_matrix(variant: str, harmful: ChangeScores,
                   benign: ChangeScores | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(ranking values [L, W], eligible mask or None) of a variant."""
    check_variant(variant)
    if variant == "rms":
        return harmful.scores, None
    if variant == "relative":
        return relative_scores(harmful), None
    if benign is None:
        raise UserError("The harmful_minus_benign variant needs change scores on benign prompts too (the benign part "
                        "of the contrast split).")
    if (benign.hook_point, benign.sum_sq.shape) != (harmful.hook_point, harmful.sum_sq.shape):
        raise UserError("Harmful and benign change scores must come from the same hook point and model.")
    return harmful.scores - benign.scores, welch_t(harmful, benign) >= CLEAR_T


def select_variant(variant: str, harmful: ChangeScores, benign: ChangeScores | None = None,
                   top_percent: float = 5.0, max_layer: int | None = None) -> NeuronSet:
    """The top ``top_percent``% neurons under ``variant`` (fewer for harmful_minus_benign when fewer are eligible);
    ``max_layer`` is the layer budget of :func:`safetyneurons.neurons.selection.select`."""
    if check_variant(variant) == "rms":  # exactly neurons.select, the paper's rule
        ns = select(harmful, top_percent=top_percent, max_layer=max_layer)
        ns.settings.update(variant=variant, variant_doc=VARIANTS[variant], requested=len(ns))
        return ns
    values, eligible = variant_matrix(variant, harmful, benign)
    k = count_for_percent(top_percent, values.size)
    if max_layer is not None and eligible is not None:
        eligible = eligible & (np.arange(values.shape[0]) <= max_layer)[:, None]
    info = {"variant": variant, "variant_doc": VARIANTS[variant], "requested": k}
    if eligible is not None:
        n_ok = int(eligible.sum())
        info.update(eligible=n_ok, clear_t=CLEAR_T)
        if n_ok == 0:
            raise UserError("No neuron's harmful change clearly exceeds its benign change (Welch t >= "
                            f"{CLEAR_T}); the harmful_minus_benign variant selects nothing on these scores.")
        k = min(k, n_ok)
        values = np.where(eligible, values, -np.inf)
    ns = select(np.where(np.isfinite(values), values, np.finfo(np.float64).min), top_n=k,
                hook_point=harmful.hook_point, max_layer=max_layer)
    ns.model = dict(harmful.meta.get("base", {}))
    ns.settings.update(info, scores_sha256=harmful.fingerprint(), positions=harmful.positions,
                       aligned=harmful.meta.get("aligned", {}), prompts_sha256=harmful.meta.get("prompts_sha256"))
    ns.scores = harmful.scores[ns.layers, ns.indices]  # the plain change scores, whatever ranked them
    return ns


def selection_variants(harmful: ChangeScores, benign: ChangeScores | None = None, top_percent: float = 5.0,
                       max_layer: int | None = None,
                       names: Sequence[str] = tuple(VARIANTS)) -> tuple[dict[str, NeuronSet], dict[str, str]]:
    """Every variant that can be selected on these scores: ``({name: set}, {name: why it was skipped})``."""
    sets, skipped = {}, {}
    for name in names:
        try:
            sets[name] = select_variant(name, harmful, benign, top_percent, max_layer)
        except UserError as e:
            skipped[name] = str(e)
    return sets, skipped


def jaccard(a: NeuronSet, b: NeuronSet) -> float:
    """|A & B| / |A | B| of two neuron sets (as (layer, index) pairs)."""
    sa = set(zip(a.layers.tolist(), a.indices.tolist()))
    sb = set(zip(b.layers.tolist(), b.indices.tolist()))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def compare_variants(sets: dict[str, NeuronSet]) -> dict:
    """Per-layer counts, the deepest layer and pairwise Jaccard overlaps of named neuron sets."""
    names = list(sets)
    return {
        "variants": {n: {"count": len(sets[n]), "per_layer": sets[n].per_layer_counts().tolist(),
                         "deepest_layer": sets[n].deepest_layer, "settings": {k: sets[n].settings.get(k) for k in
                                                                             ("variant", "requested", "eligible")}}
                     for n in names},
        "jaccard": {a: {b: round(jaccard(sets[a], sets[b]), 4) for b in names} for a in names},
    }


def variants_markdown(comparison: dict, layers_shown: Sequence[int] | None = None) -> str:
    """Two markdown tables: layer distribution per variant (default: the layers holding any selected neuron),
    and the Jaccard overlap matrix."""
    v = comparison["variants"]
    names = list(v)
    n_layers = len(next(iter(v.values()))["per_layer"])
    shown = list(layers_shown) if layers_shown is not None else [  # the layers holding any selected neuron
        l for l in range(n_layers) if any(v[n]["per_layer"][l] for n in names)]
    head = "| variant | neurons | deepest layer | " + " | ".join(f"L{l}" for l in shown) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(shown)]
    for n in names:
        lines.append(f"| {n} | {v[n]['count']} | {v[n]['deepest_layer']} | "
                     + " | ".join(str(v[n]["per_layer"][l]) for l in shown) + " |")
    lines += ["", "| Jaccard | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(f"{comparison['jaccard'][a][b]:.3f}" for b in names) + " |")
    return "\n".join(lines) + "\n"


def probe_variants(train: Store, test: Store, sets: dict[str, NeuronSet],
                   classifiers: Sequence[str] = ("svm", "logreg"), seed: int = 0, n_boot: int = 1000) -> list[dict]:
    """The safety probe of each variant's neuron set on the same train/test stores: one row per (variant,
    classifier) with the test metrics (AUROC with its bootstrap CI). The controls stay those of the main run."""
    rows = []
    for name, ns in sets.items():
        res = compare_feature_sets(train, test, ns, classifiers=",".join(classifiers), feature_sets="safety",
                                   seed=seed, n_boot=n_boot, progress=False)
        for clf in classifiers:
            rows.append({"variant": name, "classifier": clf, "n_features": len(ns),
                         "deepest_layer": ns.deepest_layer, "metrics": res.run("safety", clf).metrics})
    return rows


def probe_rows_markdown(rows: Sequence[dict]) -> str:
    """The per-variant safety-probe table (test split)."""
    lines = ["| variant | classifier | neurons | deepest layer | accuracy | AUROC [95% CI] |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        m = r["metrics"]
        ci = [c for c in (m.get("auroc_ci") or []) if c is not None]
        band = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if len(ci) == 2 else ""
        lines.append(f"| {r['variant']} | {r['classifier']} | {r['n_features']} | {r['deepest_layer']} | "
                     f"{m['accuracy']:.3f} | {m['auroc']:.4f}{band} |")
    return "\n".join(lines) + "\n"
