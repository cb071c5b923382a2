"""What a patching run measures per patched set, and how the safety set is compared with its controls.

Per set and prompt (:func:`outcomes`): the phrase judge's verdict, the refusal score at the first answer position
and the degenerate-text flag (:mod:`safetyneurons.causal.measures`). Per set (:func:`set_metrics`): refusal rate
(harmful), answer rate (benign), mean refusal score (harmful), degenerate share (all prompts), and the causal
effect of each rate. Per direction and k (:func:`summarise`): every control's mean metrics and the paired
bootstrap (:mod:`safetyneurons.causal.stats`) of (safety effect - control effect) on the harmful prompts, for the
judge's refusal and for the refusal score, oriented so that positive means "towards the donor".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from safetyneurons.causal.measures import is_degenerate
from safetyneurons.causal.report import MEASURES, MIN_GAP
from safetyneurons.causal.stats import declared, paired_bootstrap
from safetyneurons.model import judge
from safetyneurons.neurons.controls import rank_p_value as controls_p

#: sign of "towards the donor" on refusal: the aligned model refuses more than the base by design
TOWARDS_DONOR = {"sufficiency": 1.0, "necessity": -1.0}
#: the controls each safety set is tested against (single-set baselines are tests with one "draw")
CONTROL_NAMES = {"layer_matched": "layer-matched random", "change_matched": "change-matched random",
                 "change_scaled": "change-matched random, effect scaled by the change ratio",
                 "direction": "refusal direction", "mean": "mean patching", "zero": "zero ablation"}
TESTED = {"refusal": "the judge's refusal (harmful prompts)", "refusal_score": "the refusal score (harmful prompts)"}


def causal_effect(patched: float, receiver: float, donor: float, min_gap: float = MIN_GAP) -> float | None:
    """(patched - receiver) / (donor - receiver); None when the two models' rates differ by less than ``min_gap``
    (5 points by default: dividing by a gap of a few prompts turns noise into effects of 5 or 15)."""
    gap = donor - receiver
    return None if abs(gap) < max(min_gap, 1e-12) else (patched - receiver) / gap


def rank_p_value(safety: float | None, draws: Sequence[float | None]) -> float | None:
    """Empirical rank p-value of the safety set among the random draws (``controls.rank_p_value``; descriptive:
    it treats the safety set's effect as fixed); None when undefined."""
    if safety is None:
        return None
    p = controls_p(float(safety), [np.nan if v is None else v for v in draws])
    return float(p) if np.isfinite(p) else None


def outcomes(texts: Sequence[str], scores: Sequence[float], ppls: Sequence[float], replies: Sequence[Sequence[int]],
             labels: Sequence[int]) -> dict:
    """Per prompt: label, reply, verdict, refusal score, reply perplexity and degenerate flag."""
    return {"label": [int(v) for v in labels], "reply": list(texts), "verdict": [judge.judge(t) for t in texts],
            "refusal_score": [float(v) for v in scores], "reply_perplexity": [float(v) for v in ppls],
            "degenerate": [is_degenerate(list(r), float(p)) for r, p in zip(replies, ppls)]}


def set_metrics(o: dict) -> dict:
    """Rates and means of one set's per-prompt outcomes."""
    label = np.array(o["label"])
    verdict = np.array(o["verdict"])
    harmful, benign = label == 1, label == 0
    score = np.array(o["refusal_score"], dtype=np.float64)
    return {"refusal_rate": float((verdict[harmful] == "refusal").mean()) if harmful.any() else 0.0,
            "answer_rate": float((verdict[benign] == "answer").mean()) if benign.any() else 0.0,
            "refusal_score": float(np.nanmean(score[harmful])) if harmful.any() else None,
            "refusal_score_benign": float(np.nanmean(score[benign])) if benign.any() else None,
            "degenerate_rate": float(np.mean(o["degenerate"])), "n_harmful": int(harmful.sum()),
            "n_benign": int(benign.sum())}


def _per_prompt(o: dict, measure: str) -> np.ndarray:
    harmful = np.array(o["label"]) == 1
    if measure == "refusal":
        return (np.array(o["verdict"])[harmful] == "refusal").astype(np.float64)
    return np.array(o["refusal_score"], dtype=np.float64)[harmful]


def _tests(direction: str, safety: dict, matched: dict, receiver: dict, controls: dict, ratios: list[float],
           seed: int, n_boot: int) -> dict:
    """Paired bootstrap of (safety - control) per control and tested measure, towards the donor."""
    sign = TOWARDS_DONOR[direction]
    out: dict = {}
    for measure in TESTED:
        base = _per_prompt(receiver, measure)

        def effect(o):
            return sign * (_per_prompt(o, measure) - base)

        for name, sets in controls.items():
            if not sets:
                continue
            ref = matched if name in ("layer_matched", "change_matched") else safety
            effects = np.stack([effect(o) for o in sets])
            out.setdefault(name, {})[measure] = paired_bootstrap(effect(ref), effects, n_boot, seed)
            if name == "change_matched":
                scaled = effects / np.asarray(ratios, dtype=np.float64)[:, None]
                out.setdefault("change_scaled", {})[measure] = paired_bootstrap(effect(ref), scaled, n_boot, seed)
    for tests in out.values():
        for test in tests.values():
            test["declared"] = declared(test)
    return out


def survives(tests: dict) -> dict:
    """Per control and measure: is the safety effect declared beyond it? Against the change-matched control
    both the plain and the change-scaled test must declare it (the draws change a little less than the set)."""
    out = {}
    for name, by_measure in tests.items():
        if name == "change_scaled":
            continue
        out[name] = {m: bool(t["declared"] and (name != "change_matched" or tests["change_scaled"][m]["declared"]))
                     for m, t in by_measure.items()}
    return out


def _mean_metrics(metrics: list[dict]) -> dict:
    out = {}
    for key in metrics[0]:
        values = [m[key] for m in metrics if m[key] is not None]
        out[key] = float(np.mean(values)) if values else None
        if values and len(values) > 1:
            out[f"{key}_sd"] = float(np.std(values, ddof=1))
    return out


def summarise(direction: str, k: float, group: dict, per_set: dict, outs: dict, receiver: dict, seed: int,
              n_boot: int) -> dict:
    """The result of one direction and k: every set's metrics, the controls' means and the paired tests.

    ``per_set``: {patch name: metrics}; ``outs``: {patch name: outcomes}; ``receiver``: the unpatched receiver's
    outcomes; ``group``: the sets of this k (:func:`safetyneurons.causal.causal.neuron_sets`)."""
    layer_names = [f"layer{i}" for i in range(len(group["layer_matched"]))]
    change_names = [f"change{i}" for i in range(len(group["change_matched"]))]
    matched_name = "safety_matched" if "safety_matched" in per_set else "safety"
    controls = {"layer_matched": [outs[n] for n in layer_names], "change_matched": [outs[n] for n in change_names]}
    controls.update({name: [outs[name]] for name in ("direction", "mean", "zero") if name in outs})
    ratios = [float(s.settings["change_ratio"]) for s in group["change_matched"]]
    summary = {}
    for name, names in (("layer_matched", layer_names), ("change_matched", change_names)):
        if names:
            metrics = [per_set[n] for n in names]
            summary[name] = {"n_sets": len(names), **_mean_metrics(metrics),
                             "rank_p_value_effect_refusal": rank_p_value(per_set[matched_name]["effect_refusal_rate"],
                                                                         [m["effect_refusal_rate"] for m in metrics])}
    if ratios:
        summary["change_matched"]["change_ratio"] = ratios
    tests = _tests(direction, outs["safety"], outs[matched_name], receiver, controls, ratios, seed, n_boot)
    return {"direction": direction, "k": k, "n_neurons": len(group["safety"]), "n_matched": len(group["matched"]),
            "saturated_layers": group["saturated_layers"], "safety": per_set["safety"],
            "safety_matched": per_set.get("safety_matched"),
            "baselines": {n: per_set[n] for n in ("direction", "mean", "zero") if n in per_set},
            "controls": summary, "draws": {n: per_set[n] for n in layer_names + change_names},
            "tests": tests, "survives": survives(tests)}


def effects_of(metrics: dict, receiver: dict, donor: dict) -> dict:
    """``metrics`` with the causal effect of each rate added (see :func:`causal_effect`)."""
    for measure in MEASURES:
        metrics[f"effect_{measure}"] = causal_effect(metrics[measure], receiver[measure], donor[measure])
    return metrics
