"""Causal validation of the safety neurons: dynamic activation patching against random controls.

:func:`run_patch` asks, for each k (top k% of neurons by change score) and direction (see
:data:`safetyneurons.causal.patch.DIRECTIONS`), how far patching the safety neurons moves the receiving model
towards the donor's behaviour, compared with layer-matched random neuron sets of the same size (never
overlapping the safety set), mean patching and zero ablation. Measures per patched set:

- refusal rate on harmful prompts and answer rate on benign prompts (the phrase judge of
  :mod:`safetyneurons.model.judge`, a heuristic);
- causal effect = (patched - receiver) / (donor - receiver) of each rate (sufficiency:
  (patched - base) / (aligned - base)); undefined (n/a) when the two models' rates differ by less than
  :data:`MIN_GAP` (5 points), where the ratio would only amplify noise;
- the empirical rank p-value of the safety set among the random sets, (1 + #{random >= safety}) / (1 + n),
  and a one-sample t-test of the random effects against the safety effect (the paper's test);
- perplexity of the patched receiver on benign reference text, relative to the base model (an
  alignment-tax proxy).

Outputs (:func:`write_outputs`): ``patch.json`` (every number, settings, versions, hashes), ``patch.png``
(causal effect vs k: the safety set as a line, the random sets as a band), ``patch.md`` and
``generations.jsonl`` (every reply with its verdict).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from safetyneurons.data import splits as data

from safetyneurons.model import judge
from safetyneurons._io import sha256_json, versions
from safetyneurons.neurons.contrast import ChangeScores, check_padding_side
from safetyneurons.neurons.controls import overlap
from safetyneurons.neurons.controls import rank_p_value as controls_p
from safetyneurons.errors import UserError
from safetyneurons.neurons.selection import NeuronSet
from safetyneurons.model.pair import LoadedModel, check_symmetry
from safetyneurons.model.generate import stop_token_ids
from safetyneurons.twin import sample_eval
from safetyneurons.checks import check_batch_size, check_positive_int
from safetyneurons.causal.report import JUDGE_NOTE, MEASURES, MIN_GAP, summary_lines, write_outputs
from safetyneurons.causal.patch import (DEFAULT_K, DIRECTIONS, Patch, decode_reply, generate_patched,
                                        mean_activation, perplexity_patched)
from safetyneurons.causal.sets import check_k, check_neuron_set, random_controls, top_k_set

if TYPE_CHECKING:
    import torch



@dataclass
class PatchSettings:
    """Settings of :func:`run_patch` (defaults: the README's default slice)."""

    k: Sequence[float] = DEFAULT_K  # percent of all neurons, by change score
    random_sets: int = 20  # layer-matched random control sets per k
    directions: Sequence[str] = ("sufficiency", "necessity")
    baselines: bool = True  # mean patching and zero ablation of the safety set
    per_class: int = 100  # held-out harmful and benign prompts
    max_new_tokens: int = 32
    batch_size: int = 8  # prompts per batch (each carries one row per patched set)
    padding_side: str = "left"
    max_length: int = 256
    reference_texts: int = 50  # benign reference texts for the perplexity (about 3,000 tokens on the default)
    stop_at_refusal: bool = True  # a reply stops once the judge has found a refusal phrase (verdict settled)
    seed: int = 0

    def validate(self) -> "PatchSettings":
        self.k = check_k(self.k)
        self.batch_size = check_batch_size(self.batch_size)
        self.max_length = check_positive_int(self.max_length, "max length (tokens)")
        for name in ("random_sets", "per_class", "max_new_tokens", "reference_texts"):
            setattr(self, name, check_positive_int(getattr(self, name), name.replace("_", " ")))
        if isinstance(self.directions, str):
            self.directions = [d.strip() for d in self.directions.split(",") if d.strip()]
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad or not self.directions:
            raise UserError(f"Unknown direction(s) {', '.join(bad) or '(none)'}; choose from {', '.join(DIRECTIONS)}.")
        self.directions = [d for d in DIRECTIONS if d in self.directions]
        check_padding_side(self.padding_side)
        return self


# ------------------------------------------------------------------------------------- statistics
def rates(lm: LoadedModel, replies: Sequence[Sequence[int]], labels: Sequence[int]) -> tuple[dict, list[dict]]:
    """Refusal rate (harmful) and answer rate (benign) of generated replies, and each reply's verdict."""
    stops = stop_token_ids(lm)
    rows = []
    for ids, label in zip(replies, labels):
        text = decode_reply(lm, ids, stops)
        rows.append({"label": int(label), "reply": text, "verdict": judge.judge(text)})
    harmful = [r for r in rows if r["label"] == 1]
    benign = [r for r in rows if r["label"] == 0]
    out = {"refusal_rate": sum(r["verdict"] == "refusal" for r in harmful) / max(len(harmful), 1),
           "answer_rate": sum(r["verdict"] == "answer" for r in benign) / max(len(benign), 1),
           "n_harmful": len(harmful), "n_benign": len(benign)}
    return out, rows


def refusal_settled(lm: LoadedModel) -> Callable[[Sequence[int]], bool]:
    """``settled(ids)`` for :func:`generate_patched`: True once the reply so far holds a refusal phrase within the
    judge's window. The judge would then call the whole reply a refusal however it goes on (a phrase inside the
    first ``judge.WINDOW`` characters of a prefix stays there), so generating the rest cannot change a rate."""
    stops = stop_token_ids(lm)
    return lambda ids: judge.matched_phrase(decode_reply(lm, ids, stops)) is not None




def causal_effect(patched: float, receiver: float, donor: float, min_gap: float = MIN_GAP) -> float | None:
    """(patched - receiver) / (donor - receiver); None when the two models' rates differ by less than ``min_gap``
    (5 points by default: dividing by a gap of a few prompts turns noise into effects of 5 or 15)."""
    gap = donor - receiver
    return None if abs(gap) < max(min_gap, 1e-12) else (patched - receiver) / gap


def rank_p_value(safety: float | None, draws: Sequence[float | None]) -> float | None:
    """Empirical rank p-value of the safety set among the random draws (``controls.rank_p_value``); None when
    undefined (no effect measured)."""

    if safety is None:
        return None
    p = controls_p(float(safety), [np.nan if v is None else v for v in draws])
    return float(p) if np.isfinite(p) else None


def t_test_p(safety: float | None, draws: Sequence[float | None]) -> float | None:
    """Two-sided one-sample t-test: is the random sets' mean effect equal to the safety set's?"""
    d = np.array([v for v in draws if v is not None], dtype=np.float64)
    if safety is None or len(d) < 2 or float(d.std()) == 0.0:
        return None
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(d, float(safety)).pvalue)


def _summary(values: Sequence[float | None]) -> dict:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {"n": int(len(v)), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


# ------------------------------------------------------------------------------------- experiment
def _set_info(ns: NeuronSet) -> dict:
    return {"count": len(ns), "per_layer_count": ns.per_layer_counts().tolist(), "sha256": sha256_json(ns.to_json())}


def _check_pair(base: LoadedModel, aligned: LoadedModel) -> None:
    check_symmetry(base, aligned)
    if base.tokenizer.get_vocab() != aligned.tokenizer.get_vocab():
        raise UserError(f"The tokenizers of base {base.ref} and aligned {aligned.ref} map tokens to different ids; "
                        f"patching needs both models to read the same token ids.")


def _check_neurons(neurons: ChangeScores | NeuronSet, base: LoadedModel, hook_point: str | None,
                   s: PatchSettings) -> str:
    """The hook point of ``neurons``, which must fit ``base`` (and equal ``hook_point`` when given)."""
    hp = neurons.hook_point
    if hook_point is not None and hook_point != hp:
        raise UserError(f"The neuron set / change scores are at hook point {hp}, not {hook_point}. Use a set "
                        f"selected at {hook_point}.")
    if isinstance(neurons, NeuronSet):
        check_neuron_set(neurons, base, hp)
    else:
        check_neuron_set(top_k_set(neurons, min(s.k)), base, hp)
    return hp


def _neuron_sets(neurons: ChangeScores | NeuronSet, s: PatchSettings) -> dict[float, dict]:
    """Per k: the safety set (top k% by change score) and its layer-matched random controls."""
    sets = {}
    for k in s.k:
        safety = top_k_set(neurons, k)
        randoms = random_controls(safety, s.random_sets, seed=s.seed)
        overlaps = [overlap(safety, r) for r in randoms]
        if any(overlaps):
            raise RuntimeError(f"a random control overlaps the safety set at k={k}")  # never: controls exclude it
        sets[k] = {"safety": safety, "randoms": randoms, "overlaps": overlaps}
    return sets


@dataclass
class _Experiment:
    """What every step of :func:`run_patch` shares: the pair, prompts, settings and the sets per k."""

    base: LoadedModel
    aligned: LoadedModel
    prompts: list[str]
    labels: list[int]
    texts: list[str]  # reference texts of the perplexity
    hook_point: str
    s: PatchSettings
    sets: dict[float, dict]
    mean: torch.Tensor | None  # the base model's mean activation (mean patching), None without baselines
    progress: bool

    @property
    def models(self) -> dict[str, LoadedModel]:
        return {"base": self.base, "aligned": self.aligned}

    def roles(self, direction: str) -> tuple[LoadedModel, LoadedModel, str, str]:
        """(receiver, donor, receiver name, donor name) of a direction."""
        if direction == "sufficiency":
            return self.base, self.aligned, "base", "aligned"
        return self.aligned, self.base, "aligned", "base"


def _generate_all(x: _Experiment, timings: dict) -> tuple[dict, dict]:
    """Greedy replies of every patched set, per direction and k, and of each model unpatched.

    Each direction's batches also carry an unpatched row ("none"): the receiver's own greedy generation,
    computed next to the patched rows at little extra cost; a model that receives in no direction generates on
    its own. Returns ({(direction, k): {set name: replies}}, {model name: replies}).
    """
    s = x.s
    opts = dict(hook_point=x.hook_point, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                padding_side=s.padding_side, max_length=s.max_length, progress=x.progress)
    settled = {who: refusal_settled(lm) if s.stop_at_refusal else None for who, lm in x.models.items()}
    patched: dict[tuple[str, float], dict[str, list[list[int]]]] = {}
    own: dict[str, list[list[int]]] = {}
    for direction in s.directions:
        receiver, donor, ref_name, _ = x.roles(direction)
        t1 = time.perf_counter()
        for k, group in x.sets.items():
            patches = _patches(group, s.baselines)
            if ref_name not in own:
                patches = [Patch("none", "none"), *patches]
            ids = generate_patched(receiver, donor, x.prompts, patches, mean=x.mean, settled=settled[ref_name],
                                   desc=f"patch {direction} k={k:g}%", **opts)
            own.setdefault(ref_name, ids.pop("none", None))
            patched[direction, k] = ids
        timings[f"{direction}_s"] = round(time.perf_counter() - t1, 2)
    for who, lm in x.models.items():
        if who not in own:
            own[who] = generate_patched(lm, None, x.prompts, [Patch("none", "none")], desc=f"generate {who}",
                                        settled=settled[who], **opts)["none"]
    return patched, own


def _perplexities(x: _Experiment) -> tuple[dict, dict]:
    """Perplexity of every patched receiver on the reference texts, and of each model unpatched (each
    direction's passes carry the receiver's unpatched row, as the generations do)."""
    s = x.s
    ppl_opts = dict(hook_point=x.hook_point, batch_size=s.batch_size, max_length=s.max_length)
    ppls: dict[tuple[str, float], dict[str, float]] = {}
    own_ppl: dict[str, float] = {}
    for direction in s.directions:
        receiver, donor, ref_name, _ = x.roles(direction)
        for k, group in x.sets.items():
            patches = _patches(group, s.baselines)
            if ref_name not in own_ppl:
                patches = [Patch("none", "none"), *patches]
            ppl = perplexity_patched(receiver, donor, x.texts, patches, mean=x.mean, **ppl_opts)
            if "none" in ppl:
                own_ppl[ref_name] = ppl.pop("none")
            ppls[direction, k] = ppl
    for who, lm in x.models.items():
        if who not in own_ppl:
            own_ppl[who] = perplexity_patched(lm, None, x.texts, [Patch("none", "none")], **ppl_opts)["none"]
    return ppls, own_ppl


def _unpatched(x: _Experiment, own: dict, own_ppl: dict) -> tuple[dict, list[dict]]:
    """Rates and perplexity of each model unpatched, and its replies with their verdicts."""
    generations: list[dict] = []
    plain = {}
    for who, lm in x.models.items():
        plain[who], rows = rates(lm, own[who], x.labels)
        plain[who]["perplexity"] = own_ppl[who]
        generations += [{"direction": None, "k": None, "set": who, "index": i, **r} for i, r in enumerate(rows)]
    base_ppl = plain["base"]["perplexity"]
    for who in x.models:
        plain[who]["perplexity_ratio_to_base"] = plain[who]["perplexity"] / base_ppl
    return plain, generations


def _effects(x: _Experiment, patched: dict, ppls: dict, plain: dict) -> tuple[list[dict], list[dict]]:
    """Per direction and k: each patched set's rates, causal effects and perplexity, summarised against the
    random sets (:func:`_summarise`); and every patched reply with its verdict."""
    s, base_ppl = x.s, plain["base"]["perplexity"]
    results, generations = [], []
    for direction in s.directions:
        receiver, _, ref_name, donor_name = x.roles(direction)
        ref, don = plain[ref_name], plain[donor_name]
        for k, group in x.sets.items():
            ppl = ppls[direction, k]
            per_set = {}
            for patch in _patches(group, s.baselines):
                m, rows = rates(receiver, patched[direction, k][patch.name], x.labels)
                for measure in MEASURES:
                    m[f"effect_{measure}"] = causal_effect(m[measure], ref[measure], don[measure])
                m["perplexity"] = ppl[patch.name]
                m["perplexity_ratio_to_base"] = ppl[patch.name] / base_ppl
                per_set[patch.name] = m
                generations += [{"direction": direction, "k": k, "set": patch.name, "index": i, **r}
                                for i, r in enumerate(rows)]
            results.append(_summarise(direction, k, group, per_set, s))
    return results, generations


def _result(x: _Experiment, neurons: ChangeScores | NeuronSet, plain: dict, results: list[dict],
            generations: list[dict], timings: dict) -> dict:
    """The JSON-ready record of the experiment: method, settings, pair, data, neuron sets, every number."""
    s, sets, first = x.s, x.sets, x.sets[x.s.k[0]]["safety"]
    return {
        "format": "safetyneurons.patch/1",
        "method": "dynamic activation patching (Chen et al. 2025, arXiv 2406.14144), lockstep greedy decoding "
                  "with KV caches; the receiving model picks every token",
        "directions": {d: DIRECTIONS[d] for d in s.directions},
        "measures": MEASURES,
        "causal_effect": "(patched - receiver) / (donor - receiver); sufficiency: (patched - base) / "
                         "(aligned - base); "
                         f"n/a when the two models' rates differ by less than {MIN_GAP:g}",
        "rank_p_value": "(1 + #{random sets with effect >= safety}) / (1 + n random sets)",
        "perplexity": "of the patched receiver on benign reference text (plain text, no chat template), "
                      "relative to the unpatched base model: an alignment-tax proxy",
        "judge": JUDGE_NOTE,
        "hook_point": x.hook_point,
        "settings": {**asdict(s), "k": list(s.k), "directions": list(s.directions),
                     "dtype": str(next(x.base.model.parameters()).dtype).removeprefix("torch."),
                     "device": str(x.base.device), "shared_prefix": "computed once per patched set"},
        "pair": {"base": x.base.describe(), "aligned": x.aligned.describe()},
        "data": {"harmful": sum(x.labels), "benign": len(x.labels) - sum(x.labels),
                 "prompts_sha256": sha256_json(x.prompts), "labels_sha256": sha256_json(x.labels),
                 "reference_texts": len(x.texts), "reference_sha256": sha256_json(x.texts)},
        "neurons": {"source": "change scores" if not isinstance(neurons, NeuronSet) else "neuron set",
                    "total": int(first.num_layers * first.width),
                    "per_k": {str(k): {"safety": _set_info(g["safety"]), "random_overlap_with_safety": g["overlaps"],
                                       "random_sha256": [sha256_json(r.to_json()) for r in g["randoms"]],
                                       "random_settings": g["randoms"][0].settings if g["randoms"] else {}}
                              for k, g in sets.items()}},
        "unpatched": plain,
        "results": results,
        "timings": timings,
        "versions": versions(),
        "generations": generations,  # moved to generations.jsonl by write_outputs
    }


def run_patch(base: LoadedModel, aligned: LoadedModel, neurons: ChangeScores | NeuronSet, harmful: Sequence[str],
              benign: Sequence[str], reference: Sequence[str] | None = None, settings: PatchSettings | None = None,
              hook_point: str | None = None, progress: bool = True) -> dict:
    """The causal validation experiment; returns the JSON-ready result (see module doc).

    ``neurons`` is a ``contrast.ChangeScores`` (any k) or a ``NeuronSet`` (k up to its own share). The
    perplexity is measured on ``reference`` texts (default: the benign prompts as plain text).
    """
    s = (settings or PatchSettings()).validate()
    harmful, benign = list(harmful)[:s.per_class], list(benign)[:s.per_class]
    if not harmful or not benign:
        raise UserError(f"Patching needs harmful and benign prompts; got {len(harmful)} harmful and {len(benign)} "
                        f"benign. Give a labelled prompt file with both.")
    _check_pair(base, aligned)
    hp = _check_neurons(neurons, base, hook_point, s)
    prompts = harmful + benign
    t0 = time.perf_counter()
    sets = _neuron_sets(neurons, s)
    mean = mean_activation(base, prompts, hp, batch_size=s.batch_size, max_length=s.max_length) if s.baselines else None
    x = _Experiment(base, aligned, prompts, [1] * len(harmful) + [0] * len(benign),
                    list(reference if reference is not None else benign)[:s.reference_texts], hp, s, sets, mean,
                    progress)
    timings = {"setup_s": round(time.perf_counter() - t0, 2)}
    patched, own = _generate_all(x, timings)
    t1 = time.perf_counter()
    ppls, own_ppl = _perplexities(x)
    timings["perplexity_s"] = round(time.perf_counter() - t1, 2)
    plain, generations = _unpatched(x, own, own_ppl)
    results, patched_generations = _effects(x, patched, ppls, plain)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    return _result(x, neurons, plain, results, generations + patched_generations, timings)


def _patches(group: dict, baselines: bool) -> list[Patch]:
    """The patched sets of one k: the safety set, its random controls and (optionally) mean and zero patching."""
    patches = [Patch("safety", "donor", group["safety"])]
    patches += [Patch(f"random{i}", "donor", r) for i, r in enumerate(group["randoms"])]
    if baselines:
        patches += [Patch("mean", "mean", group["safety"]), Patch("zero", "zero", group["safety"])]
    return patches


def _summarise(direction: str, k: float, group: dict, per_set: dict, s: PatchSettings) -> dict:
    safety = per_set["safety"]
    randoms = [per_set[f"random{i}"] for i in range(len(group["randoms"]))]
    out = {"direction": direction, "k": k, "n_neurons": len(group["safety"]), "safety": safety,
           "baselines": {name: per_set[name] for name in ("mean", "zero") if name in per_set},
           "random": {"n_sets": len(randoms), "sets": randoms}}
    for key in [f"effect_{m}" for m in MEASURES] + list(MEASURES) + ["perplexity_ratio_to_base"]:
        values = [r[key] for r in randoms]
        out["random"][key] = _summary(values)
        if key.startswith("effect_"):
            out["random"][key]["rank_p_value"] = rank_p_value(safety[key], values)
            out["random"][key]["t_test_p"] = t_test_p(safety[key], values)
    return out


# ------------------------------------------------------------------------------------------ inputs
def pick_prompts(records: Sequence[dict], per_class: int, source: str = "records") -> tuple[list[str], list[str]]:
    """Up to ``per_class`` harmful and benign prompts of labelled records, in a fixed order (sha256 of id + prompt)."""

    picked = sample_eval(records, per_class)
    harmful = [r["prompt"] for r in picked if int(r["label"]) == 1]
    benign = [r["prompt"] for r in picked if int(r["label"]) == 0]
    if not harmful or not benign:
        raise UserError(f"{source}: patching needs labelled harmful and benign prompts, found {len(harmful)} harmful "
                        f"and {len(benign)} benign. Give a labelled prompt file with both (e.g. split:test).")
    return harmful, benign


def load_prompts(source: str, per_class: int) -> tuple[list[str], list[str], dict]:
    """:func:`pick_prompts` from a file, dataset name or ``split:NAME``, with provenance."""

    records = data.read_records(source)
    harmful, benign = pick_prompts(records, per_class, str(source))
    return harmful, benign, {"source": str(source), "records_sha256": sha256_json(records),
                             "order": "first per class by sha256 of id + prompt"}


def load_neurons(scores: str | Path | None = None, neurons: str | Path | None = None) -> ChangeScores | NeuronSet:
    """Change scores from a ``contrast`` output directory (any k), or a neuron-set file (k up to its share)."""
    if (scores is None) == (neurons is None):
        raise UserError("Give either --scores (a `safetyneurons contrast` output directory) or --neurons "
                        "(a neuron_set.json), not both.")
    if neurons is not None:
        return NeuronSet.load(neurons)

    return ChangeScores.load(scores)


def patch_step(base: LoadedModel, aligned: LoadedModel, neuron_set: NeuronSet, records: Sequence[dict],
               out_dir: str | Path, quick: bool = False, seed: int = 0, progress: bool = True,
               settings: PatchSettings | None = None) -> dict:
    """The optional ``--patch`` step of ``safetyneurons run`` on the run's safety set (k = its share of the
    neurons): the default slice, 20 + 20 prompts with ``quick``."""
    share = 100.0 * len(neuron_set) / (neuron_set.num_layers * neuron_set.width)
    settings = settings or PatchSettings(k=(share,), per_class=20 if quick else 100, seed=seed)
    harmful, benign = pick_prompts(records, settings.per_class, "the test split")
    result = run_patch(base, aligned, neuron_set, harmful, benign, settings=settings, progress=progress)
    result["data"]["prompts"] = {"source": "test split", "records_sha256": sha256_json(list(records))}
    write_outputs(result, out_dir)
    return {"dir": str(out_dir), "summary": summary_lines(result), "timings": result["timings"]}
