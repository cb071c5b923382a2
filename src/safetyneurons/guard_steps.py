"""The steps of `safetyneurons run` from activation stores to probes, the guard and the report.

:func:`train_and_guard` trains every probe with its controls, sets thresholds on the validation store, chooses
the guard's layer budget, calibrates the guard as it scores, benchmarks on the held-out store, fits the
category heads, exports the guard and writes the report. :func:`safetyneurons.pipeline.run` and the `train`
command both call it, so the guard of the step-by-step commands is the guard of `run`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

import numpy as np

from safetyneurons.activations.features import FeatureSpec
from safetyneurons.activations.reader import guard_reading
from safetyneurons.guard.artifact import export_run_guard
from safetyneurons.guard.calibrate import calibrate_guard, guard_probe, guard_validation_scores
from safetyneurons.guard.words import Words
from safetyneurons.errors import UserError
from safetyneurons.probes.budget import guard_neuron_set
from safetyneurons.probes.categories import evaluate_on_store, fit_for_store
from safetyneurons.probes.compare import compare_feature_sets, score_store
from safetyneurons.probes.overrefusal import calibrate_runs, store_overrefusal
from safetyneurons.probes.report import write_report
from safetyneurons.probes.variants import probe_variants, select_variant

if TYPE_CHECKING:
    from safetyneurons.activations.store import Store
    from safetyneurons.model.pair import LoadedModel
    from safetyneurons.neurons.contrast import ChangeScores
    from safetyneurons.neurons.selection import NeuronSet
    from safetyneurons.probes.compare import CompareResult, ProbeRun
    from safetyneurons.run_settings import RunSettings
    from safetyneurons.steps import Selection

#: feature sets whose probes are kept under ``probes/`` (the ones `safetyneurons evaluate` rescores)
SAVED_PROBES = ("safety", "text", "length")
#: the splits whose files the guard names in its provenance
GUARD_DATA = ("train", "val", "test")


@dataclass
class Inputs:
    """What the probes and the guard are built from.

    ``stores``: activation stores by split (``train`` and ``test`` needed; ``val`` sets the thresholds and the
    layer budget; ``heldout`` adds the held-out benchmark); ``records``: the records of those splits with every
    field (hazard labels for the category heads, the validation prompts the guard is calibrated on);
    ``selection``: the safety neurons and every selection variant; ``scores``/``benign_scores``: the change
    scores the layer budget reselects from (None: no budget); ``files``: split-file provenance by split for the
    guard; ``load_model``: the model the stores were read from (loaded only when the guard needs it).
    """

    stores: dict[str, Store]
    records: dict[str, list[dict]]
    neuron_set: NeuronSet | None
    load_model: Callable[[], LoadedModel]
    selection: Selection | None = None
    scores: ChangeScores | None = None
    benign_scores: ChangeScores | None = None
    files: dict[str, dict] = field(default_factory=dict)
    _lm: LoadedModel | None = None

    def lm(self) -> LoadedModel:
        if self._lm is None:
            self._lm = self.load_model()
        return self._lm


@dataclass
class GuardChoice:
    """The guard's probe run and neuron set, how its layer budget was chosen, and its thresholds."""

    run: ProbeRun
    neuron_set: NeuronSet | None
    budget: dict | None
    key: str  # its entry in the report's calibration runs
    budgeted: bool  # its own probe on a budgeted set (calibrated on val)
    calibration: dict | None = None
    words: Words | None = None  # the guard also reads each piece's text (settings.guard_words)


def _no_step(name: str) -> ContextManager[None]:
    return contextlib.nullcontext()


def train_and_guard(s: RunSettings, inputs: Inputs, probes_out: Path, guard_out: Path | None = None, *,
                    run_record: dict | None = None, cv: int = 5, control_cv: int | None = None,
                    save_probes: Sequence[str] = SAVED_PROBES, guard_feature_set: str = "safety",
                    step: Callable[[str], ContextManager[None]] = _no_step,
                    progress: bool = True) -> tuple[CompareResult, dict]:
    """Probes, thresholds, the guard (into ``guard_out`` when given) and the report (into ``probes_out``), with
    the settings ``s`` (classifiers, feature sets, draws, seed, bootstrap, target FPR, guard classifier and layer
    budget, category heads' minimum). ``step(name)`` wraps each step (the pipeline times them). Returns the
    comparison and the report as written."""
    stores = inputs.stores
    with step("train probes"):
        result = compare_feature_sets(stores["train"], stores["test"], inputs.neuron_set, classifiers=s.classifiers,
                                      feature_sets=s.feature_sets, random_draws=s.random_draws, seed=s.seed,
                                      n_boot=s.n_boot, cv=cv, control_cv=control_cv, progress=progress)
        if inputs.selection is not None:
            result.report["selection_variants"] = {
                **inputs.selection.record, "selected": s.selection,
                "probes": probe_variants(stores["train"], stores["test"], inputs.selection.sets, s.classifiers,
                                         s.seed, s.n_boot)}
    # thresholds: the target false-positive rate on the validation split (test figures keep the probes'
    # training thresholds; the held-out figures use these)
    with step("calibrate"):
        calibration = calibrate_runs(result.runs, stores["val"], s.target_fpr) if "val" in stores else {}
        result.report["calibration"] = {"target_fpr": s.target_fpr, "runs": calibration}
    # the guard's neuron set: a layer budget chosen on the validation split (early exit that pays), and its
    # thresholds on the validation split read as the guard reads it
    with step("guard budget"):
        guard = None  # no guard when its probe was not trained (`train --feature-sets` without it)
        if any((r.feature_set, r.classifier) == (guard_feature_set, s.guard_classifier) for r in result.runs):
            guard = _guard_choice(s, result, inputs, calibration, guard_feature_set)
            if s.guard_words and "val" not in inputs.records:
                raise UserError("A guard with words needs the validation split: its thresholds are set on it, "
                                "read with the words. Give a val split, or train without words (guard_words=False, "
                                "`run --no-guard-words`).")
            guard.words = _guard_words(s, inputs, guard) if s.guard_words else None
            guard.calibration = _guard_thresholds(s, inputs, result, guard, calibration.get(guard.key), progress)
    # held-out benchmark (whole sources never seen in training), with over-refusal side by side
    with step("heldout benchmark"):
        if "heldout" in stores:
            _heldout_benchmark(s, inputs, result, guard, progress)
    with step("guard"):
        if guard is not None:
            _category_heads_and_guard(s, inputs, result, guard, guard_out)
    with step("report"):
        if run_record is not None:
            result.report["run"] = run_record
        report = write_report(result, probes_out)
        for r in result.runs:  # keep the probes `safetyneurons evaluate` can rescore
            if r.feature_set in save_probes:
                r.probes[0].save(Path(probes_out) / "probes" / f"{r.feature_set}-{r.classifier}")
    return result, report


def guard_name(s: RunSettings, budget: dict) -> str:
    return f"guard (safety <= L{budget['deepest_layer']}) / {s.guard_classifier}"


def _budgeted_probe(s: RunSettings, result: CompareResult, inputs: Inputs):
    """(probe run, neuron set, budget record) of the guard: the safety probe when the budget keeps the safety
    set, else the same classifier trained (same protocol, test-scored) on the budgeted set."""
    stores, neuron_set = inputs.stores, inputs.neuron_set

    def select_at(max_layer):
        if max_layer is None:
            return neuron_set
        layer = max_layer if s.max_layer is None else min(max_layer, s.max_layer)
        return select_variant(s.selection, inputs.scores, inputs.benign_scores, s.top_percent, layer)

    setting = s.guard_max_layer if inputs.scores is not None else None  # no change scores: no budget
    guard_set, budget = guard_neuron_set(select_at, setting, stores["train"], stores.get("val"),
                                         s.guard_classifier, s.seed)
    same = guard_set.deepest_layer == neuron_set.deepest_layer and \
        bool(np.array_equal(guard_set.flat_indices(), neuron_set.flat_indices()))
    if inputs.scores is None:
        budget["rule"] = "no change scores given to choose a budget from"
    budget["same_as_safety_set"] = same
    if same:
        return result.run("safety", s.guard_classifier), neuron_set, budget
    sub = compare_feature_sets(stores["train"], stores["test"], guard_set, classifiers=[s.guard_classifier],
                               feature_sets=["safety"], random_draws=1, seed=s.seed, n_boot=s.n_boot,
                               progress=False)
    run = sub.run("safety", s.guard_classifier)
    budget["test_metrics"] = {k: run.metrics[k] for k in ("accuracy", "auroc", "auroc_ci") if k in run.metrics}
    budget["neurons"] = len(guard_set)
    return run, guard_set, budget


def _guard_choice(s: RunSettings, result: CompareResult, inputs: Inputs, calibration: dict,
                  feature_set: str) -> GuardChoice:
    """The guard's probe: on the safety neurons under the layer budget (a budgeted probe of its own is calibrated
    on the validation split into ``calibration``), or the ``pca``/``all`` probe as trained."""
    if feature_set != "safety":
        run = result.run(feature_set, s.guard_classifier)
        return GuardChoice(run, run.neuron_sets[0], None, f"{feature_set}/{s.guard_classifier}", False)
    guard_run, guard_set, budget = _budgeted_probe(s, result, inputs)
    result.report["guard_budget"] = budget
    budgeted = not budget["same_as_safety_set"] and "val" in inputs.stores  # its own probe, calibrated on val
    key = f"{'guard' if budgeted else 'safety'}/{s.guard_classifier}"
    if budgeted:
        calibration[key] = calibrate_runs([guard_run], inputs.stores["val"], s.target_fpr)[
            f"safety/{s.guard_classifier}"]
    return GuardChoice(guard_run, guard_set, budget, key, budgeted)


def _guard_words(s: RunSettings, inputs: Inputs, guard: GuardChoice) -> Words:
    """The guard's words: a TF-IDF probe on the training split's prompts, standardised with the guard probe's
    logits on the same prompts (:class:`safetyneurons.guard.words.Words`)."""
    train = inputs.stores["train"]
    X = train.select(guard.neuron_set) if guard.neuron_set is not None else train.features
    return Words.fit(train.prompts, train.labels, guard.run.probes[0].decision_function(X), seed=s.seed)


def _guard_thresholds(s: RunSettings, inputs: Inputs, result: CompareResult, guard: GuardChoice,
                      calibration: dict | None, progress: bool) -> dict | None:
    """The guard's thresholds (operating points strict and loose), set on the validation split read as the guard
    reads it (windows included) and recorded in the report; without a validation split, ``calibration``."""
    if "val" not in inputs.records:
        return calibration
    spec = FeatureSpec.from_meta(inputs.stores["train"].manifest, neuron_set=guard.neuron_set)
    result.report["guard_calibration"] = calibrate_guard(
        inputs.lm(), spec, guard.run.probes[0], inputs.records["val"],
        points={"strict": s.target_fpr, "loose": min(s.target_fpr, 0.01)}, batch_size=s.batch_size,
        progress=progress, words=guard.words, piece_margin=s.guard_piece_margin,
        reading=guard_reading(s.guard_sentence_min_words))
    return result.report["guard_calibration"]


def _served_rows(s: RunSettings, inputs: Inputs, guard: GuardChoice, progress: bool) -> dict:
    """The guard as it serves, on the held-out prompts (each read as the guard reads it, its most unsafe piece),
    at each operating point: ``{row name: (probabilities, threshold)}``."""
    points = (guard.calibration or {}).get("operating_points")
    if not points:
        return {}
    spec = FeatureSpec.from_meta(inputs.stores["train"].manifest, neuron_set=guard.neuron_set)
    p = guard_validation_scores(inputs.lm(), spec, guard.run.probes[0], inputs.stores["heldout"].prompts,
                                s.batch_size, progress, reading=guard.calibration.get("reading"), words=guard.words,
                                piece_margin=float(guard.calibration.get("piece_margin", 0.0)))
    return {f"guard as served ({name})": (p, float(fig["threshold"])) for name, fig in points.items()}


def _heldout_benchmark(s: RunSettings, inputs: Inputs, result: CompareResult, guard: GuardChoice | None,
                       progress: bool) -> None:
    """Every probe on the held-out store, and the over-refusal table (the guard as it serves included)."""
    heldout = inputs.stores["heldout"]
    result.report["heldout"] = score_store(result, heldout, s.n_boot, s.seed)
    guard_row = {guard_name(s, guard.budget): guard.run} if guard is not None and guard.budgeted else {}
    served = _served_rows(s, inputs, guard, progress) if guard is not None else {}
    result.report["overrefusal"] = store_overrefusal(result.runs, heldout, seed=s.seed, extra=guard_row,
                                                     scored=served)


def _category_heads_and_guard(s: RunSettings, inputs: Inputs, result: CompareResult, guard: GuardChoice,
                              guard_out: Path | None) -> None:
    """Category heads on the guard's neurons when the training split labels enough hazards (their figures in the
    report), and the guard (into ``guard_out``) from the guard's probe with its own thresholds."""
    stores, records = inputs.stores, inputs.records
    heads = None
    if guard.neuron_set is not None:
        heads = fit_for_store(stores["train"], records["train"], guard.neuron_set,
                              min_examples=s.category_min_examples, seed=s.seed)
    result.report["categories"] = {"heads": heads.describe() if heads else None, "evaluation": {
        n: evaluate_on_store(heads, stores[n], records[n], guard.neuron_set)
        for n in ("test", "heldout") if heads and n in stores}}
    if guard_out is None:
        return
    guard_run = guard.run
    if "guard_calibration" in result.report:  # the exported probe carries the guard's own threshold
        guard_run = replace(guard_run, probes=[guard_probe(guard_run.probes[0], guard.calibration)])
    export_run_guard(guard_out, guard_run, stores["train"],
                     data={n: f for n, f in inputs.files.items() if n in GUARD_DATA},
                     category_heads=heads, calibration=guard.calibration, budget=guard.budget, words=guard.words)
