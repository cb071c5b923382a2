"""Feature-set comparison: probes on the safety neurons next to their controls and baselines, on one split.

Feature sets (:data:`FEATURE_SETS`):

- ``safety``: the safety neurons;
- ``pca``: PCA keeping 95% of the variance of all standardised features; ``all``: every neuron;
- neuron controls (:mod:`safetyneurons.neurons.controls`), each with the safety set's size and no safety neuron:
  ``random`` (layer-matched random draws, spilling to the nearest layers where a layer is full),
  ``random_global`` (uniform random draws over all non-safety neurons) and ``magnitude`` (the non-safety
  neurons with the largest mean |pooled activation| on the training store, layer-matched);
- baselines without activations: ``text`` (TF-IDF + logistic regression on the raw prompts) and
  ``length`` (logistic regression on the token count of the formatted prompt alone).

Every drawn control is fitted ``random_draws`` times (20 by default) with the safety probe's classifier,
hyper-parameters and calibration. For each control and classifier the report gives the control's mean ±
sd, the empirical rank p-value of the safety set among the draws, and a paired bootstrap of AUROC(safety)
- mean AUROC(control) that resamples the draws as well as the test prompts (whole near-duplicate clusters
when the records carry a ``cluster`` field, see :mod:`safetyneurons.probes.metrics`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from safetyneurons._io import sha256_json, versions
from safetyneurons.neurons.controls import CONTROLS, DRAWN_CONTROLS, control_sets, describe_control, mean_abs_activation, rank_p_value
from safetyneurons.constants import FEATURE_SETS
from safetyneurons.errors import UserError
from safetyneurons.probes.metrics import (binary_metrics, bootstrap_ci, bootstrap_groups, bootstrap_unit, mean_metrics,
                      paired_bootstrap_diff)
from safetyneurons.neurons.selection import NeuronSet
from safetyneurons.probes.probe import CLASSIFIERS, REPORT_FORMAT, TEXT_CLASSIFIER, Probe, TextProbe, check_labels, parse_list, probe_meta
from safetyneurons.activations.store import Store, check_compatible, describe_store

DEFAULT_FEATURE_SETS = FEATURE_SETS
LENGTH_CLASSIFIER = "tokens-logreg"
BASELINE_CLASSIFIERS = {"text": TEXT_CLASSIFIER, "length": LENGTH_CLASSIFIER}
DEFAULT_RANDOM_DRAWS = 20
_NEEDS_SAFETY_SET = ("safety",) + CONTROLS
_NEEDS_ALL_NEURONS = ("pca", "all") + CONTROLS


@dataclass
class ProbeRun:
    """One fitted probe (or one per control draw) and its test scores."""

    feature_set: str
    classifier: str
    probes: list  # one per draw (one for non-drawn sets)
    neuron_sets: list  # NeuronSet per draw, or [None]
    test_proba: list  # np.ndarray per draw
    metrics: dict
    n_features: int


@dataclass
class CompareResult:
    report: dict
    runs: list[ProbeRun] = field(default_factory=list)
    y_test: np.ndarray | None = None

    def run(self, feature_set: str, classifier: str) -> ProbeRun:
        for r in self.runs:
            if r.feature_set == feature_set and r.classifier == classifier:
                return r
        raise KeyError((feature_set, classifier))


def store_inputs(store: Store, feature_set: str, neuron_set: NeuronSet | None) -> list[str] | np.ndarray:
    """What a probe of ``feature_set`` reads from ``store``: prompts, token counts or feature columns."""
    if feature_set == "text":
        return store.prompts
    if feature_set == "length":
        return store.length_features()
    return store.features if neuron_set is None else store.select(neuron_set)


def _check_inputs(train, test, neuron_set, feature_sets, random_draws):
    if int(random_draws) < 1 and any(f in DRAWN_CONTROLS for f in feature_sets):
        raise UserError("--random-draws must be >= 1 when a random control (random, random_global) is requested.")
    check_compatible(train, test)
    if neuron_set is None and train.layout == "neuron_set":
        neuron_set = train.neuron_set
    needs_ns = [f for f in feature_sets if f in _NEEDS_SAFETY_SET]
    if needs_ns and neuron_set is None:
        raise UserError(f"Feature sets {', '.join(needs_ns)} need the safety neurons: pass --neurons "
                        f"NEURON_SET.json (from `safetyneurons neurons select`).")
    needs_all = [f for f in feature_sets if f in _NEEDS_ALL_NEURONS]
    if needs_all and train.layout != "all":
        raise UserError(f"Feature sets {', '.join(needs_all)} need every neuron at the hook point, but the stores "
                        f"were extracted with a neuron set. Re-extract without --neurons, or use "
                        f"--feature-sets safety,text,length.")
    if neuron_set is not None:
        train.columns_for(neuron_set)  # mismatch (hook point, dims, model) -> UserError
        test.columns_for(neuron_set)
    if "length" in feature_sets:
        train.length_features(), test.length_features()
    return neuron_set


def _fit(train, y, fs: str, clf: str, ns, draw, *, seed: int, cv: int, pca_variance: float):
    meta = probe_meta(train, fs, ns, draw)
    if fs == "text":
        return TextProbe(seed=seed, cv=cv, meta=meta).fit(train.prompts, y)
    probe = Probe("logreg" if fs == "length" else clf, pca_variance=pca_variance if fs == "pca" else None,
                  seed=seed, cv=cv, meta=meta)
    return probe.fit(store_inputs(train, fs, ns), y)


def _score(run: ProbeRun, store, y: np.ndarray, n_boot: int, seed: int, groups) -> tuple[list, dict]:
    """(probabilities per draw, metrics) of a run's probes on a labelled store."""
    probas, per = [], []
    for probe, ns in zip(run.probes, run.neuron_sets):
        X = store_inputs(store, run.feature_set, ns)
        proba = probe.unsafe_probability(X)
        probas.append(proba)
        per.append(binary_metrics(y, proba, probe.predict(X), n_boot=n_boot if len(run.probes) == 1 else 0,
                                  seed=seed, groups=groups))
    if len(per) == 1:
        return probas, per[0]
    m = mean_metrics(per)
    m["auroc_ci"] = list(bootstrap_ci(y, probas, n_boot=n_boot, seed=seed, groups=groups)) \
        if n_boot and y.min() != y.max() else [None, None]
    return probas, m


def _result_row(run: ProbeRun, metrics: dict) -> dict:
    return {"feature_set": run.feature_set, "classifier": run.classifier, "n_features": run.n_features,
            "threshold": float(np.mean([p.threshold for p in run.probes])),
            "threshold_rule": run.probes[0].threshold_rule, "metrics": metrics}


def safety_vs_controls(runs: Sequence[ProbeRun], probas: dict, metrics: dict, y: np.ndarray,
                       classifiers: Sequence[str], n_boot: int, seed: int,
                       groups: np.ndarray | None = None) -> dict:
    """{control: {classifier: comparison}} of the safety probe against each control on one labelled set.

    ``probas``/``metrics`` map (feature set, classifier) to the per-draw probabilities and the metrics on
    that set. A comparison holds the paired bootstrap (``diff``, ``ci``, ``p_le_0``), the safety and control
    AUROC (control mean ± sd over draws), and the empirical rank p-values of the safety set among the draws.
    """
    have = {(r.feature_set, r.classifier) for r in runs}
    out: dict = {}
    if y.min() == y.max():
        return out
    for kind in CONTROLS:
        for clf in classifiers:
            if ("safety", clf) not in have or (kind, clf) not in have:
                continue
            s, c = metrics[("safety", clf)], metrics[(kind, clf)]
            d = paired_bootstrap_diff(y, probas[("safety", clf)][0], probas[(kind, clf)], n_boot=n_boot, seed=seed,
                                      groups=groups)
            d.update({"safety_auroc": s["auroc"], "control_auroc": c["auroc"],
                      "control_auroc_sd": c.get("auroc_std", 0.0), "safety_accuracy": s["accuracy"],
                      "control_accuracy": c["accuracy"], "control_accuracy_sd": c.get("accuracy_std", 0.0),
                      "draws": c.get("draws", 1) if kind in DRAWN_CONTROLS else 0})
            if kind in DRAWN_CONTROLS:
                for key in ("auroc", "accuracy"):
                    d[f"rank_p_{key}"] = rank_p_value(s[key], c.get(f"{key}_per_draw", [c[key]]))
            out.setdefault(kind, {})[clf] = d
    return out


def compare_feature_sets(train: Store, test: Store, neuron_set: NeuronSet | None = None, *,
                         classifiers: Sequence[str] = CLASSIFIERS, feature_sets: Sequence[str] = DEFAULT_FEATURE_SETS,
                         random_draws: int = DEFAULT_RANDOM_DRAWS, seed: int = 0, n_boot: int = 1000, cv: int = 5,
                         pca_variance: float = 0.95, control_cv: int | None = None,
                         progress: bool = True) -> CompareResult:
    """Train every (feature set, classifier) probe on ``train`` and score it on ``test`` (two Stores).

    ``control_cv``: cross-validation folds for the random draws' calibration and threshold (default: ``cv``,
    the safety probe's own protocol). 0 fits each draw once, about 3x faster, but with a 0.5 threshold and,
    for the SVM, a Platt map fitted on in-sample decision values, whose probabilities saturate (ties): the
    draws' accuracy and AUROC then follow another protocol than the safety probe's. For exploration only.
    """
    from tqdm import tqdm

    classifiers = parse_list(classifiers, CLASSIFIERS, "classifier")
    feature_sets = parse_list(feature_sets, FEATURE_SETS, "feature set")
    neuron_set = _check_inputs(train, test, neuron_set, feature_sets, random_draws)
    control_cv = int(cv if control_cv is None else control_cv)
    if cv < 0 or control_cv < 0:
        raise UserError("--cv and --control-cv must be >= 0.")
    y_train = check_labels(train.labels, f"training split ({train.path})")
    y_test = np.asarray(test.labels, dtype=np.int64)
    if len(y_test) == 0:
        raise UserError(f"The test split ({test.path}) is empty.")
    groups = bootstrap_groups(test.records)

    controls: dict[str, list[NeuronSet]] = {}
    for kind in CONTROLS:
        if kind in feature_sets:
            controls[kind] = control_sets(kind, neuron_set, int(random_draws), seed,
                                          mean_abs_activation(train) if kind == "magnitude" else None)
    jobs = [(fs, BASELINE_CLASSIFIERS[fs]) if fs in BASELINE_CLASSIFIERS else (fs, c)
            for fs in feature_sets for c in ([None] if fs in BASELINE_CLASSIFIERS else classifiers)]
    bar = tqdm(total=sum(len(controls.get(fs, [None])) for fs, _ in jobs), unit="probe", desc="train probes",
               disable=not progress, file=sys.stderr)
    runs: list[ProbeRun] = []
    probas, metrics = {}, {}
    try:
        for fs, clf in jobs:
            bar.set_postfix_str(f"{fs}/{clf}")
            sets = controls.get(fs) or [neuron_set if fs == "safety" else None]
            probes = []
            for d, ns in enumerate(sets):
                drawn = fs in DRAWN_CONTROLS
                probes.append(_fit(train, y_train, fs, clf, ns, d if drawn else None, seed=seed,
                                   cv=control_cv if drawn else cv, pca_variance=pca_variance))
                bar.update(1)
            run = ProbeRun(fs, clf, probes, sets, [], {}, probes[0].n_features)
            run.test_proba, run.metrics = _score(run, test, y_test, n_boot, seed, groups)
            if fs == "pca":
                run.metrics["pca_components"] = int(probes[0].arrays["pca_components"].shape[0])
            probas[(fs, clf)], metrics[(fs, clf)] = run.test_proba, run.metrics
            runs.append(run)
    finally:
        bar.close()

    result = CompareResult(report={}, runs=runs, y_test=y_test)
    vs = safety_vs_controls(runs, probas, metrics, y_test, classifiers, n_boot, seed, groups)
    result.report = {
        "format": REPORT_FORMAT,
        "train": describe_store(train),
        "test": describe_store(test),
        "neuron_set": None if neuron_set is None else {
            "sha256": sha256_json(neuron_set.to_json()), "count": len(neuron_set),
            "hook_point": neuron_set.hook_point,
            "per_layer_counts": neuron_set.per_layer_counts().tolist()},
        "settings": {"classifiers": classifiers, "feature_sets": feature_sets, "random_draws": int(random_draws),
                     "seed": int(seed), "bootstrap_resamples": int(n_boot), "cv_folds": int(cv),
                     "control_cv_folds": control_cv,
                     "pca_variance": pca_variance, "positive_label": "1 = unsafe",
                     "bootstrap": bootstrap_unit(groups, len(y_test)),
                     "length_baseline": "logistic regression on the token count of the formatted prompt"},
        "controls": {kind: describe_control(kind, sets) for kind, sets in controls.items()},
        "results": [_result_row(r, r.metrics) for r in runs],
        "safety_vs_controls": vs,
        "safety_vs_random": vs.get("random", {}),
        "versions": versions(),
    }
    return result


def score_store(result: CompareResult, store: Store, n_boot: int = 1000, seed: int = 0) -> dict:
    """Score every trained probe (all draws, no retraining) on another labelled store, e.g. the held-out
    sources: {"store", "bootstrap", "results", "safety_vs_controls"} as in the test report."""
    y = np.asarray(store.labels, dtype=np.int64)
    groups = bootstrap_groups(store.records)
    probas, metrics, rows = {}, {}, []
    for run in result.runs:
        key = (run.feature_set, run.classifier)
        probas[key], metrics[key] = _score(run, store, y, n_boot, seed, groups)
        if "pca_components" in run.metrics:
            metrics[key]["pca_components"] = run.metrics["pca_components"]
        rows.append({"feature_set": run.feature_set, "classifier": run.classifier, "n_features": run.n_features,
                     "metrics": metrics[key]})
    classifiers = result.report.get("settings", {}).get("classifiers", CLASSIFIERS)
    return {"store": str(store.path), "bootstrap": bootstrap_unit(groups, len(y)), "results": rows,
            "safety_vs_controls": safety_vs_controls(result.runs, probas, metrics, y, classifiers, n_boot, seed,
                                                     groups)}
