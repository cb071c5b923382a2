"""Causal validation of the safety neurons: dynamic activation patching against matched controls.

:func:`run_patch` asks, for each k (top k% of neurons by change score) and direction (see
:data:`safetyneurons.causal.patch.DIRECTIONS`), how far patching the safety neurons moves the receiving model
towards the donor's behaviour, compared with

- layer-matched random sets and change-matched random sets (:mod:`safetyneurons.neurons.controls`; never a
  safety neuron). A layer the safety set saturates (:func:`~safetyneurons.neurons.controls.saturated_layers`)
  cannot be matched: both controls are drawn for, and tested against, the safety set without those layers
  (``safety_matched``), and the result names the layers;
- the refusal direction (:mod:`safetyneurons.causal.direction`): ablated in the aligned model (necessity),
  added to the base (sufficiency);
- mean patching and zero ablation of the safety set.

Measures (:mod:`safetyneurons.causal.experiment`): the phrase judge's refusal and answer rates, the refusal score
of Arditi et al. 2024 and the degenerate-text flag (:mod:`safetyneurons.causal.measures`), the causal effect of each
rate, the perplexity of the patched receiver on benign reference text, and the paired bootstrap over prompts and
control draws of (safety effect - control effect) (:mod:`safetyneurons.causal.stats`).

Outputs (:func:`write_outputs`): ``patch.json``, ``patch.png``, ``patch.md`` and ``generations.jsonl``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from safetyneurons.data import splits as data

from safetyneurons.model import judge
from safetyneurons._io import sha256_json, versions
from safetyneurons.results.machine import provenance
from safetyneurons.neurons.contrast import ChangeScores, check_padding_side
from safetyneurons.neurons.controls import matched_part, overlap, random_layer_matched, saturated_layers
from safetyneurons.neurons.controls import control_sets
from safetyneurons.errors import UserError
from safetyneurons.neurons.selection import NeuronSet
from safetyneurons.model.pair import LoadedModel, check_symmetry
from safetyneurons.model.generate import stop_token_ids
from safetyneurons.twin import sample_eval
from safetyneurons.checks import check_batch_size, check_positive_int
from safetyneurons.causal.direction import refusal_direction
from safetyneurons.causal.experiment import CONTROL_NAMES, TESTED, effects_of, outcomes, set_metrics, summarise
from safetyneurons.causal.measures import (DEGENERATE_NOTE, REFUSAL_SCORE_NOTE, mean_activation, opening_ids,
                                           refusal_score, reply_perplexities)
from safetyneurons.causal.report import JUDGE_NOTE, MEASURES, MIN_GAP, summary_lines, write_outputs
from safetyneurons.causal.patch import (DEFAULT_K, DIRECTIONS, PATCH_FORMAT, Patch, decode_reply, generate_patched,
                                        perplexity_patched)
from safetyneurons.causal.sets import check_k, check_neuron_set, top_k_set
from safetyneurons.causal.stats import N_BOOT

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass
class PatchSettings:
    """Settings of :func:`run_patch` (defaults: the default slice)."""

    k: Sequence[float] = DEFAULT_K  # percent of all neurons, by change score
    random_sets: int = 5  # layer-matched random control sets per k
    change_sets: int = 5  # change-matched random control sets per k (needs change scores)
    directions: Sequence[str] = ("sufficiency", "necessity")
    baselines: bool = True  # mean patching and zero ablation of the safety set
    refusal_direction: bool = True  # the refusal-direction baseline (needs contrast prompts)
    harmful: int = 200  # held-out harmful prompts (all when the data has fewer)
    benign: int = 100  # held-out benign prompts
    max_new_tokens: int = 32
    batch_size: int = 8  # prompts per batch (each carries one row per patched set)
    padding_side: str = "left"
    max_length: int = 256
    reference_texts: int = 50  # benign reference texts for the perplexity
    stop_at_refusal: bool = True  # a reply stops once the judge has found a refusal phrase (verdict settled)
    n_boot: int = N_BOOT
    seed: int = 0

    def validate(self) -> "PatchSettings":
        self.k = check_k(self.k)
        self.batch_size = check_batch_size(self.batch_size)
        self.max_length = check_positive_int(self.max_length, "max length (tokens)")
        for name in ("random_sets", "harmful", "benign", "max_new_tokens", "reference_texts", "n_boot"):
            setattr(self, name, check_positive_int(getattr(self, name), name.replace("_", " ")))
        if int(self.change_sets) < 0:
            raise UserError(f"change sets must be 0 or more, got {self.change_sets}.")
        if isinstance(self.directions, str):
            self.directions = [d.strip() for d in self.directions.split(",") if d.strip()]
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad or not self.directions:
            raise UserError(f"Unknown direction(s) {', '.join(bad) or '(none)'}; choose from {', '.join(DIRECTIONS)}.")
        self.directions = [d for d in DIRECTIONS if d in self.directions]
        check_padding_side(self.padding_side)
        return self


def refusal_settled(lm: LoadedModel) -> Callable[[Sequence[int]], bool]:
    """``settled(ids)`` for :func:`generate_patched`: True once the reply so far holds a refusal phrase within the
    judge's window. The judge would then call the whole reply a refusal however it goes on (a phrase inside the
    first ``judge.WINDOW`` characters of a prefix stays there), so generating the rest cannot change a rate
    (the refusal score reads the first position only; the degenerate flag reads the stored reply)."""
    stops = stop_token_ids(lm)
    return lambda ids: judge.matched_phrase(decode_reply(lm, ids, stops)) is not None


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


def neuron_sets(neurons: ChangeScores | NeuronSet, s: PatchSettings,
                change: np.ndarray | None = None) -> dict[float, dict]:
    """Per k: the safety set (top k% by change score), its part outside saturated layers (``matched``) and the
    layer-matched and change-matched controls of that part. The change-matched controls need every neuron's
    change score: those of ``neurons`` when they are change scores, else ``change`` ([layers, width])."""
    if isinstance(neurons, ChangeScores):
        change = neurons.scores
    sets = {}
    for k in s.k:
        safety = top_k_set(neurons, k)
        matched = matched_part(safety)
        layer = [random_layer_matched(matched, d, s.seed, num_layers=matched.num_layers, width=matched.width)
                 for d in range(s.random_sets)]
        change_draws = []
        if change is not None and s.change_sets:
            change_draws = control_sets("change_matched", safety, s.change_sets, s.seed, change=change)
        overlaps = [overlap(safety, r) for r in layer + change_draws]
        if any(overlaps):
            raise RuntimeError(f"a control overlaps the safety set at k={k}")  # never: controls exclude it
        sets[k] = {"safety": safety, "matched": matched, "saturated_layers": saturated_layers(safety),
                   "layer_matched": layer, "change_matched": change_draws}
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
    direction: dict | None  # the refusal direction (causal.direction), None without that baseline
    progress: bool

    @property
    def models(self) -> dict[str, LoadedModel]:
        return {"base": self.base, "aligned": self.aligned}

    def roles(self, direction: str) -> tuple[LoadedModel, LoadedModel, str, str]:
        """(receiver, donor, receiver name, donor name) of a direction."""
        if direction == "sufficiency":
            return self.base, self.aligned, "base", "aligned"
        return self.aligned, self.base, "aligned", "base"

    def direction_patch(self, direction: str) -> list[Patch]:
        """The refusal-direction patch of a direction: ablation in the aligned model, addition in the base."""
        if self.direction is None:
            return []
        v, layer = self.direction["vector"], self.direction["layer"]
        if direction == "necessity":
            return [Patch("direction", "ablate", vector=v, layers=tuple(range(self.direction["num_layers"])))]
        return [Patch("direction", "add", vector=v, layers=(layer,))]


def _patches(group: dict, baselines: bool) -> list[Patch]:
    """The patched sets of one k: the safety set (and its matched part when layers are saturated), the controls
    and (optionally) mean and zero patching."""
    patches = [Patch("safety", "donor", group["safety"])]
    if group["matched"] is not group["safety"]:
        patches.append(Patch("safety_matched", "donor", group["matched"]))
    patches += [Patch(f"layer{i}", "donor", r) for i, r in enumerate(group["layer_matched"])]
    patches += [Patch(f"change{i}", "donor", r) for i, r in enumerate(group["change_matched"])]
    if baselines:
        patches += [Patch("mean", "mean", group["safety"]), Patch("zero", "zero", group["safety"])]
    return patches


def _generate_all(x: _Experiment, timings: dict) -> tuple[dict, dict]:
    """Greedy replies and first-position refusal scores of every patched set per direction, and of each model
    unpatched: ({direction: {(k, name): (replies, scores)}}, {model: (replies, scores)}). The receiver's own
    generation rides as a "none" row in its first batch; the direction patch (k-independent) runs once."""
    s = x.s
    opts = dict(max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, padding_side=s.padding_side,
                max_length=s.max_length, progress=x.progress)
    settled = {who: refusal_settled(lm) if s.stop_at_refusal else None for who, lm in x.models.items()}
    ids = {who: opening_ids(lm) for who, lm in x.models.items()}
    first = {who: (lambda logits, r=ids[who]: refusal_score(logits, *r)) for who in x.models}
    patched: dict[str, dict] = {}
    own: dict[str, tuple] = {}

    def run(receiver, donor, name, patches, hook_point, desc):
        scores: dict[str, list[float]] = {}
        out = generate_patched(receiver, donor, x.prompts, patches, hook_point=hook_point, mean=x.mean, desc=desc,
                               settled=settled[name], first_step=first[name], first_out=scores, **opts)
        return {n: (out[n], scores[n]) for n in out}

    for direction in s.directions:
        receiver, donor, ref_name, _ = x.roles(direction)
        t1 = time.perf_counter()
        patched[direction] = {}
        for k, group in x.sets.items():
            patches = _patches(group, s.baselines)
            if ref_name not in own:
                patches = [Patch("none", "none"), *patches]
            got = run(receiver, donor, ref_name, patches, x.hook_point, f"patch {direction} k={k:g}%")
            if "none" in got:
                own[ref_name] = got.pop("none")
            patched[direction].update({(k, n): v for n, v in got.items()})
        for p in x.direction_patch(direction):
            got = run(receiver, None, ref_name, [p], "resid", f"direction {direction}")
            patched[direction][None, p.name] = got[p.name]
        timings[f"{direction}_s"] = round(time.perf_counter() - t1, 2)
    for who, lm in x.models.items():
        if who not in own:
            own[who] = run(lm, None, who, [Patch("none", "none")], x.hook_point, f"generate {who}")["none"]
    return patched, own


def _perplexities(x: _Experiment) -> tuple[dict, dict]:
    """Perplexity of every patched receiver on the reference texts, and of each model unpatched."""
    s = x.s
    opts = dict(batch_size=s.batch_size, max_length=s.max_length)
    ppls: dict[str, dict] = {}
    own_ppl: dict[str, float] = {}
    for direction in s.directions:
        receiver, donor, ref_name, _ = x.roles(direction)
        ppls[direction] = {}
        for k, group in x.sets.items():
            patches = _patches(group, s.baselines)
            if ref_name not in own_ppl:
                patches = [Patch("none", "none"), *patches]
            ppl = perplexity_patched(receiver, donor, x.texts, patches, hook_point=x.hook_point, mean=x.mean, **opts)
            if "none" in ppl:
                own_ppl[ref_name] = ppl.pop("none")
            ppls[direction].update({(k, n): v for n, v in ppl.items()})
        for p in x.direction_patch(direction):
            ppls[direction][None, p.name] = perplexity_patched(receiver, None, x.texts, [p], hook_point="resid",
                                                               **opts)[p.name]
    for who, lm in x.models.items():
        if who not in own_ppl:
            own_ppl[who] = perplexity_patched(lm, None, x.texts, [Patch("none", "none")], hook_point=x.hook_point,
                                              **opts)["none"]
    return ppls, own_ppl


def _outcomes(x: _Experiment, lm: LoadedModel, generated: dict) -> dict:
    """Per-prompt outcomes of every entry of ``generated`` ({key: (replies, scores)}) for receiver ``lm``."""
    stops = stop_token_ids(lm)
    replies = {key: [list(r[:next((i for i, t in enumerate(r) if t in stops), len(r))]) for r in rows]
               for key, (rows, _) in generated.items()}
    ppl = reply_perplexities(lm, x.prompts, {str(i): replies[key] for i, key in enumerate(replies)},
                             batch_size=x.s.batch_size, max_length=x.s.max_length)
    return {key: outcomes([decode_reply(lm, r, stops) for r in rows], scores, ppl[str(i)], replies[key], x.labels)
            for i, (key, (rows, scores)) in enumerate(generated.items())}


def _generation_rows(direction, k, name, o: dict) -> list[dict]:
    keys = ("label", "reply", "verdict", "refusal_score", "reply_perplexity", "degenerate")
    return [{"direction": direction, "k": k, "set": name, "index": i, **{key: o[key][i] for key in keys}}
            for i in range(len(o["label"]))]


def _measure(x: _Experiment, patched: dict, own: dict, ppls: dict, own_ppl: dict) -> tuple[dict, list[dict], list]:
    """Unpatched metrics, one result per direction and k (:func:`summarise`), and every reply's row."""
    plain, own_out, generations = {}, {}, []
    for who, lm in x.models.items():
        own_out[who] = _outcomes(x, lm, {"none": own[who]})["none"]
        plain[who] = {**set_metrics(own_out[who]), "perplexity": own_ppl[who]}
        generations += _generation_rows(None, None, who, own_out[who])
    base_ppl = plain["base"]["perplexity"]
    for who in x.models:
        plain[who]["perplexity_ratio_to_base"] = plain[who]["perplexity"] / base_ppl
    results = []
    for direction in x.s.directions:
        receiver, _, ref_name, donor_name = x.roles(direction)
        outs = _outcomes(x, receiver, patched[direction])
        for k, group in x.sets.items():
            keys = [key for key in outs if key[0] in (k, None)]
            per_set, by_name = {}, {}
            for key in keys:
                m = effects_of(set_metrics(outs[key]), plain[ref_name], plain[donor_name])
                m["perplexity"] = ppls[direction][key]
                m["perplexity_ratio_to_base"] = m["perplexity"] / base_ppl
                per_set[key[1]], by_name[key[1]] = m, outs[key]
                if key[0] is not None or k == x.s.k[0]:  # a k-independent set (the direction) is stored once
                    generations += _generation_rows(direction, key[0], key[1], outs[key])
            results.append(summarise(direction, k, group, per_set, by_name, own_out[ref_name], x.s.seed,
                                     x.s.n_boot))
    return plain, results, generations


def _direction_info(d: dict | None) -> dict | None:
    return None if d is None else {key: v for key, v in d.items() if key != "vector"}


def _result(x: _Experiment, neurons: ChangeScores | NeuronSet, plain: dict, results: list[dict],
            generations: list[dict], timings: dict, change_sha: str | None = None) -> dict:
    """The JSON-ready record of the experiment: method, settings, pair, data, neuron sets, every number."""
    s, sets, first = x.s, x.sets, x.sets[x.s.k[0]]["safety"]
    return {
        "format": PATCH_FORMAT,
        "method": "dynamic activation patching (Chen et al. 2025, arXiv 2406.14144), lockstep greedy decoding "
                  "with KV caches; the receiving model picks every token",
        "directions": {d: DIRECTIONS[d] for d in s.directions},
        "measures": {**MEASURES, "refusal_score": REFUSAL_SCORE_NOTE, "degenerate_rate": DEGENERATE_NOTE},
        "causal_effect": "(patched - receiver) / (donor - receiver); sufficiency: (patched - base) / "
                         f"(aligned - base); n/a when the two models' rates differ by less than {MIN_GAP:g}",
        "tests": {"controls": CONTROL_NAMES, "measures": TESTED,
                  "statistic": "paired bootstrap over prompts and control draws of mean(safety effect - control "
                               "effect), effects towards the donor (sufficiency: more refusal; necessity: less); "
                               "95% percentile interval and two-sided bootstrap p; declared when the interval "
                               "lies above 0; layer- and change-matched controls are tested against the safety "
                               "set without saturated layers",
                  "rank_p_value": "descriptive only: (1 + #{draws with effect >= safety}) / (1 + n draws)"},
        "perplexity": "of the patched receiver on benign reference text (plain text, no chat template), "
                      "relative to the unpatched base model: an alignment-tax proxy",
        "judge": JUDGE_NOTE,
        "hook_point": x.hook_point,
        "settings": {**asdict(s), "k": list(s.k), "directions": list(s.directions),
                     "dtype": str(next(x.base.model.parameters()).dtype).removeprefix("torch."),
                     "device": str(x.base.device)},
        "pair": {"base": x.base.describe(), "aligned": x.aligned.describe()},
        "data": {"harmful": sum(x.labels), "benign": len(x.labels) - sum(x.labels),
                 "prompts_sha256": sha256_json(x.prompts), "labels_sha256": sha256_json(x.labels),
                 "reference_texts": len(x.texts), "reference_sha256": sha256_json(x.texts)},
        "refusal_direction": _direction_info(x.direction),
        "neurons": {"source": "change scores" if not isinstance(neurons, NeuronSet) else "neuron set",
                    "change_scores_sha256": change_sha,
                    "total": int(first.num_layers * first.width),
                    "per_k": {str(k): {"safety": _set_info(g["safety"]), "matched": _set_info(g["matched"]),
                                       "saturated_layers": g["saturated_layers"],
                                       "change_ratio": [c.settings["change_ratio"] for c in g["change_matched"]]}
                              for k, g in sets.items()}},
        "unpatched": plain,
        "results": results,
        "timings": timings,
        "versions": versions(),
        **provenance(),  # code_version, machine: what the causal table names
        "generations": generations,  # moved to generations.jsonl by write_outputs
    }


def run_patch(base: LoadedModel, aligned: LoadedModel, neurons: ChangeScores | NeuronSet, harmful: Sequence[str],
              benign: Sequence[str], reference: Sequence[str] | None = None, settings: PatchSettings | None = None,
              hook_point: str | None = None, progress: bool = True,
              direction_prompts: tuple[Sequence[str], Sequence[str]] | None = None,
              change: ChangeScores | None = None) -> dict:
    """The causal validation experiment; returns the JSON-ready result (see module doc).

    ``neurons`` is a ``contrast.ChangeScores`` (any k; change-matched controls) or a ``NeuronSet`` (k up to its
    own share; change-matched controls only when ``change``, the change scores at its hook point, is given:
    a set chosen by another rule than top-k, such as a run's layer-budgeted set). The perplexity is measured on ``reference`` texts (default: the
    benign prompts as plain text). ``direction_prompts`` (harmful, benign; the contrast split) give the refusal
    direction; without them that baseline is left out.
    """
    s = (settings or PatchSettings()).validate()
    harmful, benign = list(harmful)[:s.harmful], list(benign)[:s.benign]
    if not harmful or not benign:
        raise UserError(f"Patching needs harmful and benign prompts; got {len(harmful)} harmful and {len(benign)} "
                        f"benign. Give a labelled prompt file with both.")
    _check_pair(base, aligned)
    hp = _check_neurons(neurons, base, hook_point, s)
    if change is not None and change.hook_point != hp:
        raise UserError(f"The change scores are at hook point {change.hook_point} and the neurons at {hp}; give "
                        f"the change scores the neurons were selected from.")
    chosen_from = neurons.settings.get("scores_sha256") if isinstance(neurons, NeuronSet) else None
    if change is not None and chosen_from and chosen_from != change.fingerprint():
        raise UserError(f"The neuron set was selected from other change scores (sha256 {chosen_from[:12]}) than "
                        f"those given ({change.fingerprint()[:12]}); give the contrast output it was selected from.")
    prompts = harmful + benign
    t0 = time.perf_counter()
    sets = neuron_sets(neurons, s, None if change is None else change.scores)
    mean = mean_activation(base, prompts, hp, batch_size=s.batch_size, max_length=s.max_length) if s.baselines else None
    direction = None
    if s.refusal_direction and direction_prompts is not None:
        direction = refusal_direction(aligned, *direction_prompts, batch_size=s.batch_size, max_length=s.max_length)
    x = _Experiment(base, aligned, prompts, [1] * len(harmful) + [0] * len(benign),
                    list(reference if reference is not None else benign)[:s.reference_texts], hp, s, sets, mean,
                    direction, progress)
    timings = {"setup_s": round(time.perf_counter() - t0, 2)}
    patched, own = _generate_all(x, timings)
    t1 = time.perf_counter()
    ppls, own_ppl = _perplexities(x)
    timings["perplexity_s"] = round(time.perf_counter() - t1, 2)
    t1 = time.perf_counter()
    plain, results, generations = _measure(x, patched, own, ppls, own_ppl)
    timings["measures_s"] = round(time.perf_counter() - t1, 2)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    scores = neurons if isinstance(neurons, ChangeScores) else change
    return _result(x, neurons, plain, results, generations, timings,
                   None if scores is None else scores.fingerprint())


# ------------------------------------------------------------------------------------------ inputs
def pick_prompts(records: Sequence[dict], harmful: int, benign: int,
                 source: str = "records") -> tuple[list[str], list[str]]:
    """Up to ``harmful`` harmful and ``benign`` benign prompts of labelled records (all a class has when it has
    fewer), in a fixed order (sha256 of id + prompt)."""
    picked = sample_eval(records, max(harmful, benign))
    h = [r["prompt"] for r in picked if int(r["label"]) == 1][:harmful]
    b = [r["prompt"] for r in picked if int(r["label"]) == 0][:benign]
    if not h or not b:
        raise UserError(f"{source}: patching needs labelled harmful and benign prompts, found {len(h)} harmful "
                        f"and {len(b)} benign. Give a labelled prompt file with both (e.g. split:test).")
    return h, b


def load_prompts(source: str, harmful: int, benign: int) -> tuple[list[str], list[str], dict]:
    """:func:`pick_prompts` from a file, dataset name or ``split:NAME``, with provenance."""
    records = data.read_records(source)
    h, b = pick_prompts(records, harmful, benign, str(source))
    return h, b, {"source": str(source), "records_sha256": sha256_json(records),
                  "order": "first per class by sha256 of id + prompt", "asked": {"harmful": harmful, "benign": benign},
                  "available": {"harmful": sum(int(r["label"]) == 1 for r in records),
                                "benign": sum(int(r["label"]) == 0 for r in records)}}


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
               settings: PatchSettings | None = None, change: ChangeScores | None = None,
               direction_records: Sequence[dict] | None = None) -> dict:
    """The optional ``--patch`` step of ``safetyneurons run`` on the run's safety set (k = its share of the
    neurons): 200 + 100 test prompts, 20 + 20 with ``quick``. ``change`` (the run's change scores) adds the
    change-matched control; ``direction_records`` (the contrast split) the refusal-direction baseline."""
    share = 100.0 * len(neuron_set) / (neuron_set.num_layers * neuron_set.width)
    settings = settings or PatchSettings(k=(share,), harmful=20 if quick else 200, benign=20 if quick else 100,
                                         seed=seed)
    harmful, benign = pick_prompts(records, settings.harmful, settings.benign, "the test split")
    direction = None
    if direction_records is not None:
        direction = pick_prompts(direction_records, len(direction_records), len(direction_records),
                                 "the contrast split")
    result = run_patch(base, aligned, neuron_set, harmful, benign, settings=settings, progress=progress,
                       change=change, direction_prompts=direction)
    result["data"]["prompts"] = {"source": "test split", "records_sha256": sha256_json(list(records))}
    write_outputs(result, out_dir)
    return {"dir": str(out_dir), "summary": summary_lines(result), "timings": result["timings"]}
